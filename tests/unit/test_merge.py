"""Merging per-category answers: cumulative probabilities, best-effort answer, suggestions."""

from __future__ import annotations

import numpy as np
import pytest

from fieldlens.common.taxonomy import ROOT, Taxon, Taxonomy
from fieldlens.router.merge import (
    SPECIALIST,
    TINY,
    CategoryResult,
    cumulative,
    imprint_rows,
    merge,
    pick_categories,
    with_learned_classes,
    with_learned_leaves,
)

# root
# +- domain/animal
# |  +- broad/bird  -> node/bird/raptor -> {eagle, kite};  heron
# |  +- broad/fish  -> {gold, carp}
# +- domain/artifact
#    +- broad/tool  -> {hammer, saw}
_EDGES = [
    (ROOT, "root", None),
    ("domain/animal", "domain", ROOT),
    ("domain/artifact", "domain", ROOT),
    ("broad/bird", "broad", "domain/animal"),
    ("broad/fish", "broad", "domain/animal"),
    ("broad/tool", "broad", "domain/artifact"),
    ("node/bird/raptor", "node", "broad/bird"),
    ("eagle", "class", "node/bird/raptor"),
    ("kite", "class", "node/bird/raptor"),
    ("heron", "class", "broad/bird"),
    ("gold", "class", "broad/fish"),
    ("carp", "class", "broad/fish"),
    ("hammer", "class", "broad/tool"),
    ("saw", "class", "broad/tool"),
]
_DEPTH = {
    ROOT: 0,
    "domain/animal": 1,
    "domain/artifact": 1,
    "broad/bird": 2,
    "broad/fish": 2,
    "broad/tool": 2,
    "node/bird/raptor": 3,
    "eagle": 4,
    "kite": 4,
    "heron": 3,
    "gold": 3,
    "carp": 3,
    "hammer": 3,
    "saw": 3,
}

TAX = Taxonomy(
    [Taxon(i, i, rank, parent, _DEPTH[i]) for i, rank, parent in _EDGES],
    ["broad/bird", "broad/fish", "broad/tool"],
    ["eagle", "kite", "heron", "gold", "carp", "hammer", "saw"],
)

# Dyadic numbers so every product below is exact in binary floating point.
BROAD = {"broad/bird": 0.5, "broad/fish": 0.375, "broad/tool": 0.125}
BIRD = CategoryResult(
    "broad/bird",
    0.5,
    {"node/bird/raptor": 0.875, "eagle": 0.625, "kite": 0.25, "heron": 0.125},
    TINY,
)
FISH = CategoryResult("broad/fish", 0.375, {"gold": 0.75, "carp": 0.25}, SPECIALIST)
RESULTS = [BIRD, FISH]

# By hand: P(taxon) = P(broad) x P(taxon | broad); above the broads, sums of the broads below.
EXPECTED_CUM = {
    ROOT: 1.0,
    "domain/animal": 0.875,
    "domain/artifact": 0.125,
    "broad/bird": 0.5,
    "broad/fish": 0.375,
    "broad/tool": 0.125,
    "node/bird/raptor": 0.4375,
    "eagle": 0.3125,
    "kite": 0.125,
    "heron": 0.0625,
    "gold": 0.28125,
    "carp": 0.09375,
}


def test_cumulative_matches_hand_computation() -> None:
    cum = cumulative(TAX, BROAD, RESULTS)
    # Taxa under a category nobody scored (tool's leaves) are not spoken for.
    assert cum == pytest.approx(EXPECTED_CUM)
    assert set(cum) == set(EXPECTED_CUM)


def test_cumulative_without_classifier_results_covers_only_the_upper_levels() -> None:
    cum = cumulative(TAX, {"broad/bird": 0.25, "broad/tool": 0.5}, [])
    assert cum == pytest.approx(
        {
            ROOT: 0.75,
            "domain/animal": 0.25,
            "domain/artifact": 0.5,
            "broad/bird": 0.25,
            "broad/tool": 0.5,
        }
    )


@pytest.mark.parametrize(
    ("threshold", "answer"),
    [
        (0.1, "eagle"),  # eagle and kite clear it at depth 4: the more probable wins
        (0.3, "eagle"),  # 0.3125
        (0.32, "node/bird/raptor"),  # eagle 0.3125 fails; raptor 0.4375 (gold 0.28 fails)
        (0.45, "broad/bird"),  # raptor 0.4375 fails; bird 0.5
        (0.5, "broad/bird"),  # exactly at the threshold counts
        (0.51, "domain/animal"),  # bird fails; animal 0.875
        (0.875, "domain/animal"),
        (0.9, ROOT),
        (1.0, ROOT),
    ],
)
def test_best_effort_answer_is_deepest_taxon_clearing_threshold(
    threshold: float, answer: str
) -> None:
    merged = merge(TAX, BROAD, RESULTS, threshold, top_k=3)
    assert merged.answer_id == answer
    assert merged.answer_probability == pytest.approx(EXPECTED_CUM[answer])


def test_answer_depth_never_grows_as_the_threshold_rises() -> None:
    depths = []
    for i in range(101):
        t = i / 100
        m = merge(TAX, BROAD, RESULTS, t, top_k=1)
        depths.append(TAX.get(m.answer_id).depth)
        if m.answer_id != ROOT:
            assert m.answer_probability >= t
        # Nothing deeper than the answer clears the threshold.
        deeper = [x for x, p in EXPECTED_CUM.items() if p >= t and _DEPTH[x] > depths[-1]]
        assert deeper == []
    assert depths == sorted(depths, reverse=True)
    assert depths[0] == 4 and depths[-1] == 0


def test_falls_back_to_root_when_nothing_clears() -> None:
    broad = {"broad/bird": 0.5, "broad/fish": 0.25, "broad/tool": 0.125}  # sums to 0.875
    m = merge(TAX, broad, [], threshold=0.9, top_k=5)
    assert m.answer_id == ROOT
    assert m.answer_probability == pytest.approx(0.875)
    assert m.suggestions == []


def test_suggestions_are_leaves_ranked_by_joint_probability() -> None:
    m = merge(TAX, BROAD, RESULTS, threshold=0.5, top_k=10)
    got = [(s.taxon_id, s.probability, s.served_by) for s in m.suggestions]
    # Leaves only (not raptor); P(broad) x P(leaf | broad), descending; served_by of the category.
    assert got == [
        ("eagle", pytest.approx(0.3125), TINY),
        ("gold", pytest.approx(0.28125), SPECIALIST),
        ("kite", pytest.approx(0.125), TINY),
        ("carp", pytest.approx(0.09375), SPECIALIST),
        ("heron", pytest.approx(0.0625), TINY),
    ]


@pytest.mark.parametrize("top_k", [0, 1, 2, 4])
def test_suggestions_are_cut_at_top_k(top_k: int) -> None:
    m = merge(TAX, BROAD, RESULTS, threshold=0.5, top_k=top_k)
    assert [s.taxon_id for s in m.suggestions] == ["eagle", "gold", "kite", "carp"][:top_k]


def test_suggestions_keep_served_by_as_given_even_when_empty() -> None:
    r = CategoryResult("broad/tool", 0.25, {"hammer": 0.5, "saw": 0.5}, "")
    m = merge(TAX, {"broad/tool": 0.25}, [r], threshold=0.2, top_k=5)
    assert {(s.taxon_id, s.probability, s.served_by) for s in m.suggestions} == {
        ("hammer", 0.125, ""),
        ("saw", 0.125, ""),
    }
    assert m.answer_id == "broad/tool"


def test_pick_categories_top_n() -> None:
    probs = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.1}
    assert pick_categories(probs, top=2, min_probability=0.05) == ["b", "c"]
    assert pick_categories(probs, top=1, min_probability=0.0) == ["b"]
    assert set(pick_categories(probs, top=4, min_probability=0.0)) == set(probs)


def test_pick_categories_drops_negligible_ones() -> None:
    probs = {"a": 0.02, "b": 0.9, "c": 0.05, "d": 0.03}
    assert pick_categories(probs, top=3, min_probability=0.04) == ["b", "c"]
    assert pick_categories(probs, top=3, min_probability=0.05) == ["b", "c"]  # inclusive
    assert pick_categories(probs, top=3, min_probability=0.06) == ["b"]


def test_pick_categories_always_returns_at_least_one() -> None:
    probs = {"a": 0.3, "b": 0.35, "c": 0.35 - 0.01}
    assert pick_categories(probs, top=3, min_probability=0.99) == ["b"]
    assert pick_categories(probs, top=0, min_probability=0.0) == ["b"]


def _learned_setup():
    rng = np.random.default_rng(0)
    dim = 16
    mean = rng.normal(size=dim).astype(np.float32) * 0.1
    centre = rng.normal(size=dim).astype(np.float32)
    centre /= np.linalg.norm(centre)
    examples = centre + 0.05 * rng.normal(size=(5, dim)).astype(np.float32)
    examples /= np.linalg.norm(examples, axis=1, keepdims=True)
    tax = TAX.with_learned([("learned/osprey", "osprey", "node/bird/raptor")])
    imprint = {"row_norm": 8.0, "bias": 0.0, "embedding_mean": mean.tolist()}
    rows = imprint_rows({"learned/osprey": (examples.sum(0), 5)}, imprint, tax)
    return rows, centre, mean


def test_imprinted_rows_point_from_the_mean_to_the_examples():
    (rows, bias, groups, taxa), centre, mean = _learned_setup()
    assert taxa == ["learned/osprey"]
    assert groups == ["broad/bird"] and bias.tolist() == [0.0]
    assert np.linalg.norm(rows[0]) == pytest.approx(8.0, rel=1e-5)
    direction = (centre - mean) / np.linalg.norm(centre - mean)
    assert float(rows[0] @ direction) / 8.0 > 0.99


def test_learned_classes_move_broad_mass_only_for_photos_like_them():
    learned, centre, _ = _learned_setup()
    broad = {"broad/bird": 0.05, "broad/fish": 0.15, "broad/tool": 0.80}
    fine = np.zeros(7, dtype=np.float32)  # trained logits: nothing stands out
    near, p_learned = with_learned_classes(broad, fine, 1.0, centre, learned)
    assert p_learned["learned/osprey"] == pytest.approx(
        near["broad/bird"] - 0.05 * (1 - p_learned["learned/osprey"])
    )
    assert sum(near.values()) == pytest.approx(1.0)
    assert near["broad/bird"] > 0.5  # the learned class took most of the mass
    assert near["broad/fish"] / near["broad/tool"] == pytest.approx(0.15 / 0.80)
    far, _ = with_learned_classes(broad, fine, 1.0, -centre, learned)
    assert far["broad/bird"] == pytest.approx(0.05, abs=0.01)
    # A photo the trained net is sure about keeps its answer.
    sure = np.array([0, 0, 0, 0, 0, 30, 0], dtype=np.float32)
    kept, _ = with_learned_classes(broad, sure, 1.0, centre, learned)
    assert kept["broad/tool"] == pytest.approx(0.80, abs=0.01)


def test_example_rows_claim_a_photo_like_one_example_that_the_mean_row_does_not():
    rng = np.random.default_rng(4)
    dim = 16
    # Five examples spread around the taxon: their mean is close to none of them.
    examples = rng.normal(size=(5, dim)).astype(np.float32)
    examples /= np.linalg.norm(examples, axis=1, keepdims=True)
    tax = TAX.with_learned([("learned/osprey", "osprey", "node/bird/raptor")])
    imprint = {"row_norm": 4.0, "bias": -8.0, "embedding_mean": [0.0] * dim}
    sums = {"learned/osprey": (examples.sum(0), 5)}
    plain = imprint_rows(sums, imprint, tax, {"learned/osprey": list(examples)})
    assert plain[3] == ["learned/osprey"], "no example_bias: the mean row alone"
    strict = {**imprint, "example_bias": -10.0}
    rows, bias, groups, taxa = imprint_rows(sums, strict, tax, {"learned/osprey": list(examples)})
    assert taxa == ["learned/osprey"] * 6 and groups == ["broad/bird"] * 6
    assert bias.tolist() == [-8.0] + [-10.0] * 5
    broad = {"broad/bird": 0.05, "broad/fish": 0.15, "broad/tool": 0.80}
    fine = np.zeros(7, dtype=np.float32)
    photo = examples[2]  # one of the learned photos
    _, by_mean = with_learned_classes(broad, fine, 4.0, photo, plain)
    out, by_both = with_learned_classes(broad, fine, 4.0, photo, (rows, bias, groups, taxa))
    assert by_mean["learned/osprey"] < 0.5 < by_both["learned/osprey"]
    assert out["broad/bird"] == pytest.approx(
        0.05 * (1 - by_both["learned/osprey"]) + by_both["learned/osprey"]
    )
    # A photo like none of them is claimed by neither.
    _, unlike = with_learned_classes(broad, fine, 4.0, -photo, (rows, bias, groups, taxa))
    assert unlike["learned/osprey"] < 0.01


def test_learned_leaves_take_their_fine_share_and_trained_leaves_keep_proportions():
    tax = TAX.with_learned([("learned/osprey", "osprey", "node/bird/raptor")])
    scores = {"node/bird/raptor": 0.6, "eagle": 0.4, "kite": 0.2, "heron": 0.4}
    r = CategoryResult("broad/bird", 0.5, scores, TINY)
    out = with_learned_leaves(tax, r, {"learned/osprey": 0.25}).scores
    assert out["learned/osprey"] == pytest.approx(0.5)  # 0.25 of 0.5 of the mass
    assert out["eagle"] / out["kite"] == pytest.approx(2.0)
    assert out["eagle"] + out["kite"] + out["heron"] + out["learned/osprey"] == pytest.approx(1.0)
    assert out["node/bird/raptor"] == pytest.approx(out["eagle"] + out["kite"] + 0.5)
    # Another group's result is untouched.
    fish = CategoryResult("broad/fish", 0.3, {"gold": 0.7, "carp": 0.3}, TINY)
    assert with_learned_leaves(tax, fish, {"learned/osprey": 0.25}) is fish


# -- calibration ----------------------------------------------------------------------------
def _tempered(result: CategoryResult, leaves: dict[str, float], power: float) -> CategoryResult:
    """`result` with the tempered sums a classifier sends: sum of P(leaf | category)^power
    over the leaves below each scored taxon, and over all the category's leaves."""
    below = {
        t: sum(q**power for leaf, q in leaves.items() if t in TAX.path(leaf)) for t in result.scores
    }
    return CategoryResult(
        result.category,
        result.probability,
        result.scores,
        result.served_by,
        tempered=below,
        tempered_total=sum(q**power for q in leaves.values()),
    )


BIRD_LEAVES = {"eagle": 0.625, "kite": 0.25, "heron": 0.125}
FISH_LEAVES = {"gold": 0.75, "carp": 0.25}


@pytest.mark.parametrize("power", [0.5, 1.0, 1.5, 3.0])
def test_calibrated_probabilities_are_the_tempered_leaf_distribution(power: float) -> None:
    results = [_tempered(BIRD, BIRD_LEAVES, power), _tempered(FISH, FISH_LEAVES, power)]
    cum = cumulative(TAX, BROAD, results, power)
    # By brute force: every leaf's P = P(broad) x P(leaf | broad), raised to the power; the
    # unscored tool group's two leaves as if they shared its 0.125 evenly.
    leaf_p = {t: BROAD["broad/bird"] * q for t, q in BIRD_LEAVES.items()}
    leaf_p |= {t: BROAD["broad/fish"] * q for t, q in FISH_LEAVES.items()}
    leaf_p |= {"hammer": 0.0625, "saw": 0.0625}
    z = sum(p**power for p in leaf_p.values())
    expected = {
        t: sum(p**power for leaf, p in leaf_p.items() if t in TAX.path(leaf)) / z
        for t in EXPECTED_CUM
    }
    assert set(cum) == set(EXPECTED_CUM)
    assert cum == pytest.approx(expected)
    if power == 1.0:
        assert cum == pytest.approx(EXPECTED_CUM)


def test_calibration_keeps_the_ranking_and_moves_the_answer() -> None:
    raw = merge(TAX, BROAD, RESULTS, threshold=0.4, top_k=5)
    sharp = [_tempered(BIRD, BIRD_LEAVES, 2.0), _tempered(FISH, FISH_LEAVES, 2.0)]
    cal = merge(TAX, BROAD, sharp, threshold=0.4, top_k=5, power=2.0)
    assert [s.taxon_id for s in cal.suggestions] == [s.taxon_id for s in raw.suggestions]
    # Sharper (power > 1): the leading branch holds more, so the same threshold goes deeper.
    assert raw.answer_id == "node/bird/raptor"
    assert cal.answer_id == "eagle"
    assert cal.suggestions[0].probability > raw.suggestions[0].probability


def test_learned_leaves_join_the_tempered_sums() -> None:
    power = 2.0
    bird = _tempered(BIRD, BIRD_LEAVES, power)
    tax = TAX.with_learned([("learned/osprey", "osprey", "node/bird/raptor")])
    # P(osprey) 0.1 of the bird group's 0.5: it holds 0.2 of the group; the trained leaves
    # share the rest in their proportions.
    added = with_learned_leaves(tax, bird, {"learned/osprey": 0.1}, power)
    leaves = {t: q * 0.8 for t, q in BIRD_LEAVES.items()} | {"learned/osprey": 0.2}
    assert added.tempered_total == pytest.approx(sum(q**power for q in leaves.values()))
    raptor = ("eagle", "kite", "learned/osprey")
    assert added.tempered["node/bird/raptor"] == pytest.approx(
        sum(leaves[t] ** power for t in raptor)
    )
    assert added.tempered["learned/osprey"] == pytest.approx(0.2**power)
