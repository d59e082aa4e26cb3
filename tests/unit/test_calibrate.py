"""The trainer's calibration: its arithmetic is the router's, and its rules do what they say."""

from __future__ import annotations

import numpy as np
import pytest
from test_merge import TAX

from fieldlens.common.errors import FailedPrecondition
from fieldlens.common.model_set import ModelSet, threshold_for
from fieldlens.router import merge as served
from fieldlens.router.merge import CategoryResult
from fieldlens.trainer import calibrate
from fieldlens.trainer.calibrate import LearnOutcome, Served, Tree


def _served(rng: np.random.Generator, n: int, dispatch: int) -> Served:
    """Random broad probabilities, the `dispatch` most probable groups dispatched, and random
    P(leaf | group) for every leaf."""
    tree = Tree(TAX)
    groups = rng.dirichlet(np.ones(len(TAX.broad_ids)), size=n)
    dispatched = np.zeros(groups.shape, dtype=bool)
    for i, row in enumerate(groups):
        dispatched[i, np.argsort(-row)[:dispatch]] = True
    within = np.zeros((n, len(TAX.class_ids)))
    for g in range(len(TAX.broad_ids)):
        cols = np.flatnonzero(tree.group_of == g)
        within[:, cols] = rng.dirichlet(np.ones(len(cols)), size=n)
    return Served(groups, dispatched, within)


def _router_cum(s: Served, i: int, power: float) -> dict[str, float]:
    """What router/merge.py states for photo `i`, from the classifiers' tempered sums."""
    broad = dict(zip(TAX.broad_ids, s.groups[i].tolist(), strict=True))
    results = []
    for g, b in enumerate(TAX.broad_ids):
        if not s.dispatched[i, g]:
            continue
        leaves = {c: s.within[i, j] for j, c in enumerate(TAX.class_ids) if TAX.broad_of(c) == b}
        taxa = {t for c in leaves for t in TAX.path(c)[TAX.path(c).index(b) + 1 :]}
        scores = {t: sum(q for c, q in leaves.items() if t in TAX.path(c)) for t in taxa}
        tempered = {t: sum(q**power for c, q in leaves.items() if t in TAX.path(c)) for t in taxa}
        total = sum(q**power for q in leaves.values())
        results.append(CategoryResult(b, broad[b], scores, "tiny", False, tempered, total))
    return served.cumulative(TAX, broad, results, power)


@pytest.mark.parametrize("power", [1.0, 1.6])
def test_trainer_states_what_the_router_states(power: float) -> None:
    """The power is fitted with the vectorised arithmetic; the router serves merge.py's."""
    s = _served(np.random.default_rng(1), 40, dispatch=2)
    tree = Tree(TAX)
    cum, _ = calibrate.calibrated(tree, s, power)
    for i in range(len(s.groups)):
        router = _router_cum(s, i, power)
        mine = {t: cum[i, j] for j, t in enumerate(tree.ids) if t in router}
        assert mine == pytest.approx(router)


def test_fitted_power_recovers_the_power_the_labels_were_drawn_with() -> None:
    rng = np.random.default_rng(7)
    s = _served(rng, 6000, dispatch=3)  # every group dispatched: the likelihood is exact
    tree = Tree(TAX)
    _, leaf = calibrate.calibrated(tree, s, 1.6)
    y = np.asarray([rng.choice(len(TAX.class_ids), p=row / row.sum()) for row in leaf])
    assert calibrate.fit_power(tree, s, y) == pytest.approx(1.6, abs=0.15)


def test_nll_counts_an_undispatched_class_at_its_share_of_the_stated_group() -> None:
    s = _served(np.random.default_rng(3), 30, dispatch=1)
    tree = Tree(TAX)
    saw = TAX.class_ids.index("saw")
    tool = TAX.broad_ids.index("broad/tool")
    idx = np.flatnonzero(~s.dispatched[:, tool])
    expected = [
        -np.log(_router_cum(s, i, 1.3)["broad/tool"] / TAX.leaf_count("broad/tool")) for i in idx
    ]
    sub = Served(s.groups[idx], s.dispatched[idx], s.within[idx])
    assert calibrate.nll(tree, sub, 1.3, np.full(len(idx), saw)) == pytest.approx(np.mean(expected))


def test_threshold_for_is_the_lowest_from_which_every_threshold_reaches_the_target() -> None:
    curve = [
        {"threshold": 0.5, "precision": 0.80},
        {"threshold": 0.6, "precision": 0.92},
        {"threshold": 0.7, "precision": 0.89},
        {"threshold": 0.8, "precision": 0.95},
    ]
    assert threshold_for(curve, 0.9) == 0.8  # 0.6 reaches 90%, but 0.7 falls back below
    assert threshold_for(curve, 0.85) == 0.6
    assert threshold_for(curve, 0.5) == 0.5
    assert threshold_for(curve, 0.99) == 0.8  # unreachable: the most careful threshold


def test_min_precision_needs_a_calibrated_model_set() -> None:
    ms = ModelSet(
        version="ms-x",
        embedding_version="e",
        taxonomy=TAX,
        routing={},
        specialists={},
        image_size=64,
        embedding_dim=8,
        manifest={"_dir": "."},
    )
    with pytest.raises(FailedPrecondition, match="not calibrated"):
        ms.threshold_for(0.9)
    assert ms.default_threshold == 0.5


def _outcome(offset: float, recall: float, drop: float) -> LearnOutcome:
    return LearnOutcome(offset, recall, 0.5, 0.5, 0.5, drop, 0)


def test_bias_rule_takes_the_most_recall_within_the_group_loss_budget() -> None:
    outcomes = [_outcome(-3, 0.2, 0.005), _outcome(-2, 0.3, 0.019), _outcome(-1, 0.5, 0.06)]
    assert calibrate.choose_bias(outcomes).bias_offset == -2
    too_costly = [_outcome(-1, 0.5, 0.06), _outcome(0, 0.6, 0.1)]
    assert calibrate.choose_bias(too_costly).bias_offset == -1


def test_example_rows_take_the_most_careful_offset_that_wins_the_learned_photos_back() -> None:
    sweep = {-8.0: 0.2, -7.0: 0.85, -6.0: 0.92, -5.0: 0.97}
    assert calibrate.choose_example_offset(sweep) == -6.0
    assert calibrate.choose_example_offset({-8.0: 0.1, -7.0: 0.5}) == -7.0


def test_halves_split_every_class_in_two_disjoint_seeded_halves() -> None:
    labels = np.repeat(np.asarray(["a", "b", "c"]), [10, 7, 4])
    fit, report = calibrate.halves(labels, seed=5)
    assert not set(fit) & set(report)
    assert sorted([*fit, *report]) == list(range(len(labels)))
    for c in "abc":
        n = int(np.sum(labels == c))
        assert np.sum(labels[fit] == c) == n // 2
    again = calibrate.halves(labels, seed=5)
    assert np.array_equal(again[0], fit)
