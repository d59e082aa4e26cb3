"""Tiny hierarchical ensemble: tree probabilities, training and persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from small_tree import CLASSES, class_like

from fieldlens.common.taxonomy import Taxonomy
from fieldlens.tiny.ensemble import TinyEnsemble, fit

DIM = 6


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    t = Taxonomy.from_classes(CLASSES)
    # Guard the fixture's intended shape (the test maths below rely on it).
    assert sorted(t.children("broad/a")) == ["node/a/x", "node/a/y"]
    assert sorted(t.children("node/a/y")) == ["a3", "node/a/z"]
    assert sorted(t.children("node/a/z")) == ["a4", "a5"]
    assert t.children("broad/c") == ["c1"]
    return t


def _n_rows(tax: Taxonomy) -> int:
    # One row per parent->child edge at or below a broad group.
    return sum(len(tax.under(b)) for b in tax.broad_ids)


def _random_ensemble(tax: Taxonomy, seed: int = 0, scale: float = 1.0) -> TinyEnsemble:
    rng = np.random.default_rng(seed)
    n = _n_rows(tax)
    return TinyEnsemble(
        tax,
        rng.normal(0, scale, (n, DIM)).astype(np.float32),
        rng.normal(0, scale, n).astype(np.float32),
        "emb-v1",
    )


def _row_index(ens: TinyEnsemble) -> dict[str, int]:
    return {str(t): r for r, t in enumerate(ens.layout.row_taxon)}


def _brute_force(tax: Taxonomy, ens: TinyEnsemble, x: np.ndarray) -> dict[str, float]:
    """P(taxon | broad) as the product of per-node softmaxes down the path, in float64."""
    row = _row_index(ens)
    w = ens.weights.astype(np.float64)
    b = ens.bias.astype(np.float64)
    logit = {t: float(w[r] @ x + b[r]) for t, r in row.items()}
    out: dict[str, float] = {}
    for broad in tax.broad_ids:
        for t in tax.under(broad):
            p = 1.0
            node = t
            while node != broad:
                parent = tax.get(node).parent
                sibs = tax.children(parent)
                p *= np.exp(logit[node]) / sum(np.exp(logit[s]) for s in sibs)
                node = parent
            out[t] = p
    return out


def test_rows_cover_every_edge_below_broad_groups(tax: Taxonomy) -> None:
    ens = _random_ensemble(tax)
    expected = {t for b in tax.broad_ids for t in tax.under(b)}
    assert len(ens.layout.row_taxon) == len(expected) == 11
    assert {str(t) for t in ens.layout.row_taxon} == expected
    with pytest.raises(ValueError, match="do not match the taxonomy's 11 edges"):
        TinyEnsemble(tax, np.zeros((10, DIM), np.float32), np.zeros(10, np.float32), "v")


def test_predict_equals_brute_force_softmax_product(tax: Taxonomy) -> None:
    ens = _random_ensemble(tax, seed=1, scale=1.5)
    xs = np.random.default_rng(2).normal(0, 1, (5, DIM)).astype(np.float32)
    got = ens.predict(xs)
    assert got.shape == (5, 11)
    row = _row_index(ens)
    for i, x in enumerate(xs):
        expected = _brute_force(tax, ens, x.astype(np.float64))
        for t, p in expected.items():
            assert got[i, row[t]] == pytest.approx(p, rel=1e-4, abs=1e-6), t
    # A single embedding (1-D) is treated as a batch of one.
    np.testing.assert_allclose(ens.predict(xs[0]), got[:1], rtol=1e-6)


def test_probabilities_are_consistent_over_the_tree(tax: Taxonomy) -> None:
    ens = _random_ensemble(tax, seed=3, scale=2.0)
    xs = np.random.default_rng(4).normal(0, 1, (7, DIM)).astype(np.float32)
    probs = ens.predict(xs)
    row = _row_index(ens)

    def p(t: str) -> np.ndarray:
        return np.ones(len(xs)) if t in tax.broad_ids else probs[:, row[t]]

    for broad in tax.broad_ids:
        for node in [broad, *tax.under(broad)]:
            kids = tax.children(node)
            if kids:
                np.testing.assert_allclose(sum(p(k) for k in kids), p(node), rtol=1e-5)
        leaves = tax.leaves_under(broad)
        np.testing.assert_allclose(sum(p(leaf) for leaf in leaves), 1.0, rtol=1e-5)
    assert (probs > 0).all() and (probs <= 1).all()


def test_single_child_node_has_conditional_exactly_one(tax: Taxonomy) -> None:
    ens = _random_ensemble(tax, seed=5, scale=10.0)
    xs = np.random.default_rng(6).normal(0, 3, (4, DIM)).astype(np.float32)
    r = _row_index(ens)["c1"]
    assert (ens.conditional(xs)[:, r] == 1.0).all()
    assert (ens.predict(xs)[:, r] == 1.0).all()


def test_scores_for_lists_every_taxon_under_the_broad(tax: Taxonomy) -> None:
    ens = _random_ensemble(tax, seed=7)
    x = np.random.default_rng(8).normal(0, 1, DIM).astype(np.float32)
    scores = ens.scores_for(x[None], "broad/a")
    assert {t for t, _, _ in scores} == set(tax.under("broad/a"))
    expected = _brute_force(tax, ens, x.astype(np.float64))
    for t, p, leaf in scores:
        assert p == pytest.approx(expected[t], rel=1e-4)
        assert leaf == (t in {"a1", "a2", "a3", "a4", "a5"})
    with pytest.raises(KeyError, match="unknown broad group 'broad/nope'"):
        ens.scores_for(x[None], "broad/nope")
    with pytest.raises(KeyError, match="unknown broad group 'node/a/x'"):
        ens.scores_for(x[None], "node/a/x")


def _blobs(tax: Taxonomy, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(100).normal(0, 1, (len(tax.class_ids), DIM)) * 4.0
    emb = np.concatenate([m + rng.normal(0, 0.1, (per_class, DIM)) for m in means])
    leaves = np.repeat(np.asarray(tax.class_ids), per_class)
    return emb.astype(np.float32), leaves


def test_fit_separates_well_separated_classes(tax: Taxonomy) -> None:
    emb, leaves = _blobs(tax, per_class=20, seed=10)
    ens = fit(tax, emb, leaves, "emb-v1", epochs=25)
    assert ens.embedding_version == "emb-v1"
    test_emb, test_leaves = _blobs(tax, per_class=10, seed=11)
    probs = ens.predict(test_emb)
    row = _row_index(ens)
    correct = []
    for i, leaf in enumerate(test_leaves):
        broad = tax.broad_of(str(leaf))
        candidates = tax.leaves_under(broad)
        best = max(candidates, key=lambda c: probs[i, row[c]])
        correct.append(best == leaf)
    assert np.mean(correct) > 0.95
    # The intermediate nodes learnt too: a4/a5 points go to z, a1/a2 points to x.
    for leaf, node in [("a4", "node/a/z"), ("a1", "node/a/x")]:
        idx = test_leaves == leaf
        assert (probs[idx, row[node]] > 0.5).mean() > 0.95


def test_partial_fit_raises_the_target_leaf(tax: Taxonomy) -> None:
    ens = _random_ensemble(tax, seed=12, scale=0.3)
    emb = np.random.default_rng(13).normal(0, 1, (4, DIM)).astype(np.float32)
    r = _row_index(ens)["a4"]
    before = ens.predict(emb)[:, r].copy()
    untouched = [i for i, t in enumerate(ens.layout.row_taxon) if tax.broad_of(str(t)) != "broad/a"]
    w_before = ens.weights[untouched].copy()
    ens.partial_fit(emb, ["a4"] * 4, steps=5)
    after = ens.predict(emb)[:, r]
    assert (after > before).all()
    # Rows of other broad groups' nodes are not on the path: their weights stay as they were.
    np.testing.assert_array_equal(ens.weights[untouched], w_before)


def _path_loss(
    tax: Taxonomy,
    row: dict[str, int],
    w: np.ndarray,
    b: np.ndarray,
    emb: np.ndarray,
    leaves: list[str],
) -> float:
    """Mean over samples of the summed -log P(child | node) along each leaf's path."""
    total = 0.0
    for x, leaf in zip(emb, leaves, strict=True):
        broad = tax.broad_of(leaf)
        node = leaf
        while node != broad:
            parent = tax.get(node).parent
            logits = np.asarray([w[row[s]] @ x + b[row[s]] for s in tax.children(parent)])
            mx = logits.max()
            lse = mx + np.log(np.exp(logits - mx).sum())
            total += lse - (w[row[node]] @ x + b[row[node]])
            node = parent
    return total / len(leaves)


def test_partial_fit_step_is_gradient_descent_on_path_cross_entropy(tax: Taxonomy) -> None:
    ens = _random_ensemble(tax, seed=14, scale=0.5)
    emb = np.random.default_rng(15).normal(0, 1, (3, DIM)).astype(np.float32)
    leaves = ["a5", "a1", "b2"]
    row = _row_index(ens)
    w0 = ens.weights.astype(np.float64)
    b0 = ens.bias.astype(np.float64)
    x64 = emb.astype(np.float64)
    eps = 1e-6
    gw = np.zeros_like(w0)
    for idx in np.ndindex(*w0.shape):
        wp, wm = w0.copy(), w0.copy()
        wp[idx] += eps
        wm[idx] -= eps
        gw[idx] = (
            _path_loss(tax, row, wp, b0, x64, leaves) - _path_loss(tax, row, wm, b0, x64, leaves)
        ) / (2 * eps)
    gb = np.zeros_like(b0)
    for j in range(len(b0)):
        bp, bm = b0.copy(), b0.copy()
        bp[j] += eps
        bm[j] -= eps
        gb[j] = (
            _path_loss(tax, row, w0, bp, x64, leaves) - _path_loss(tax, row, w0, bm, x64, leaves)
        ) / (2 * eps)
    ens.partial_fit(emb, leaves, steps=1)
    np.testing.assert_allclose((w0 - ens.weights) / ens.lr, gw, atol=2e-4)
    np.testing.assert_allclose((b0 - ens.bias) / ens.lr, gb, atol=2e-4)


def test_save_load_roundtrip(tax: Taxonomy, tmp_path: Path) -> None:
    ens = _random_ensemble(tax, seed=16, scale=0.5)
    f = tmp_path / "tiny.npz"
    ens.save(f)
    back = TinyEnsemble.load(f, tax)
    assert back.embedding_version == "emb-v1"
    assert list(back.layout.row_taxon) == list(ens.layout.row_taxon)
    np.testing.assert_array_equal(back.bias, ens.bias)
    # Weights are stored as float16: relative error per weight <= 2**-11.
    np.testing.assert_allclose(back.weights, ens.weights, rtol=2**-11, atol=1e-7)
    xs = np.random.default_rng(17).normal(0, 1, (6, DIM)).astype(np.float32)
    np.testing.assert_allclose(back.predict(xs), ens.predict(xs), atol=5e-3)


def test_load_against_a_different_taxonomy_fails(tax: Taxonomy, tmp_path: Path) -> None:
    ens = _random_ensemble(tax)
    f = tmp_path / "tiny.npz"
    ens.save(f)
    other = Taxonomy.from_classes([*CLASSES, class_like("b3", "b", "e > b > b3")])
    with pytest.raises(ValueError, match="taxonomy"):
        TinyEnsemble.load(f, other)
    # Same number of edges but a different tree still fails.
    renamed = Taxonomy.from_classes([*CLASSES[:-1], class_like("c9", "c", "e > c > c9")])
    assert _n_rows(renamed) == _n_rows(tax)
    with pytest.raises(ValueError, match="was trained for taxonomy"):
        TinyEnsemble.load(f, renamed)


def _reference_top(
    ens: TinyEnsemble, x: np.ndarray, broad: str, top_k: int, floor: float
) -> list[list[tuple[str, float, bool]]]:
    """What the service sent before selection moved into numpy, for each row of `x`: every
    score of the group (layout order), the top_k leaves by a stable sort, internal nodes from
    the floor up, then a stable sort of nodes-then-leaves by probability. (The probabilities
    come from the same batched product: float32 sums differ in their last bit by shape.)"""
    layout = ens.scores_for(x[:1], broad)
    return [
        _select(
            [(t, float(p), leaf) for (t, _, leaf), p in zip(layout, row, strict=True)], top_k, floor
        )
        for row in ens.predict_group(x, broad)
    ]


def _select(
    scores: list[tuple[str, float, bool]], top_k: int, floor: float
) -> list[tuple[str, float, bool]]:
    leaves = sorted((s for s in scores if s[2]), key=lambda s: -s[1])
    if top_k > 0:
        leaves = leaves[:top_k]
    kept = [s for s in scores if not s[2] and s[1] >= floor] + leaves
    return sorted(kept, key=lambda s: -s[1])


@pytest.mark.parametrize("top_k", [0, 1, 2, 10])
@pytest.mark.parametrize("floor", [0.0, 0.3, 0.9, 1.5])
def test_group_top_selects_and_orders_as_the_reference(tax, top_k, floor):
    ens = _random_ensemble(tax, seed=3)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, DIM)).astype(np.float32)
    for broad in tax.broad_ids:
        got = ens.group_top(x, broad, top_k, [floor] * len(x))
        assert _plain(got) == _reference_top(ens, x, broad, top_k, floor)


def test_group_top_keeps_the_layout_order_of_ties(tax):
    # All-zero weights: every softmax is uniform, so siblings tie and a single child ties with
    # its parent; the order must be the layout's, internal nodes before leaves.
    ens = TinyEnsemble(
        tax, np.zeros((_n_rows(tax), DIM), np.float32), np.zeros(_n_rows(tax), np.float32), "emb-v1"
    )
    x = np.ones((1, DIM), np.float32)
    for broad in tax.broad_ids:
        for top_k in (0, 1):
            got = ens.group_top(x, broad, top_k, [0.0])
            assert _plain(got) == _reference_top(ens, x, broad, top_k, 0)
    ((c, _),) = ens.group_top(x, "broad/c", 0, [0.0])
    assert [t for t, *_ in c] == ["c1"] and c[0][1] == 1.0


def _plain(
    got: list[tuple[list[tuple[str, float, bool, float]], float]],
) -> list[list[tuple[str, float, bool]]]:
    return [[(t, p, leaf) for t, p, leaf, _ in scores] for scores, _ in got]


@pytest.mark.parametrize("power", [1.0, 1.6])
def test_group_top_tempers_the_leaf_distribution_for_calibration(tax, power):
    """Tempered: the sum of P(leaf | broad)^power over the leaves at or below each taxon, and
    over the whole group; with power 1 nothing is computed."""
    ens = _random_ensemble(tax, seed=5)
    x = np.random.default_rng(6).normal(size=(3, DIM)).astype(np.float32)
    for broad in tax.broad_ids:
        full = {t: p for t, p, _ in ens.scores_for(x[:1], broad)}
        ((scores, total),) = ens.group_top(x[:1], broad, 0, [0.0], power)
        if power == 1.0:
            assert total == 0.0 and all(q == 0.0 for *_, q in scores)
            continue
        leaves = [t for t in full if tax.is_leaf(t)]
        assert total == pytest.approx(sum(full[t] ** power for t in leaves))
        for t, _, _, q in scores:
            below = [leaf for leaf in tax.leaves_under(t)]
            assert q == pytest.approx(sum(full[leaf] ** power for leaf in below))
        # The floor applies to a node's share of the tempered total.
        ((kept, _),) = ens.group_top(x[:1], broad, 0, [0.5], power)
        assert all(leaf or q >= 0.5 * total for _, _, leaf, q in kept)
