"""Trainer evaluation maths on a handmade taxonomy with hand-derived expectations."""

from __future__ import annotations

import numpy as np
import pytest

from fieldlens.common.taxonomy import ROOT, Taxon, Taxonomy
from fieldlens.trainer import metrics

# root
# +- domain/animal
# |  +- broad/bird  -> node/bird/raptor -> {eagle, kite};  heron
# |  +- broad/fish  -> {gold, carp}
# +- domain/artifact
#    +- broad/tool  -> {hammer, saw}
_EDGES = [
    (ROOT, "root", None, 0),
    ("domain/animal", "domain", ROOT, 1),
    ("domain/artifact", "domain", ROOT, 1),
    ("broad/bird", "broad", "domain/animal", 2),
    ("broad/fish", "broad", "domain/animal", 2),
    ("broad/tool", "broad", "domain/artifact", 2),
    ("node/bird/raptor", "node", "broad/bird", 3),
    ("eagle", "class", "node/bird/raptor", 4),
    ("kite", "class", "node/bird/raptor", 4),
    ("heron", "class", "broad/bird", 3),
    ("gold", "class", "broad/fish", 3),
    ("carp", "class", "broad/fish", 3),
    ("hammer", "class", "broad/tool", 3),
    ("saw", "class", "broad/tool", 3),
]
CLASSES = ["eagle", "kite", "heron", "gold", "carp", "hammer", "saw"]
TAX = Taxonomy(
    [Taxon(i, i, r, p, d) for i, r, p, d in _EDGES],
    ["broad/bird", "broad/fish", "broad/tool"],
    CLASSES,
)

# Leaf probabilities in class order (dyadic, so exact in float32).
ROW_A = [0.25, 0.125, 0.0625, 0.3125, 0.0625, 0.125, 0.0625]
ROW_B = [0.0, 0.0, 0.0, 0.9375, 0.0625, 0.0, 0.0]
ROW_C = [0.5, 0.375, 0.125, 0.0, 0.0, 0.0, 0.0]
# Summed up the tree by hand.
CUM_A = {
    "eagle": 0.25,
    "kite": 0.125,
    "heron": 0.0625,
    "gold": 0.3125,
    "carp": 0.0625,
    "hammer": 0.125,
    "saw": 0.0625,
    "node/bird/raptor": 0.375,
    "broad/bird": 0.4375,
    "broad/fish": 0.375,
    "broad/tool": 0.1875,
    "domain/animal": 0.8125,
    "domain/artifact": 0.1875,
    ROOT: 1.0,
}


def test_topk_accuracy() -> None:
    scores = np.asarray(
        [
            [0.1, 0.5, 0.4],  # label 2: second best
            [0.7, 0.2, 0.1],  # label 0: best
            [0.2, 0.3, 0.5],  # label 0: worst
            [0.6, 0.1, 0.3],  # label 1: worst
        ]
    )
    labels = np.asarray([2, 0, 0, 1])
    assert metrics.topk_accuracy(scores, labels, 1) == pytest.approx(1 / 4)
    assert metrics.topk_accuracy(scores, labels, 2) == pytest.approx(2 / 4)
    assert metrics.topk_accuracy(scores, labels, 3) == pytest.approx(1.0)


def test_group_matrix() -> None:
    expected = np.asarray(
        [
            [1, 0, 0],  # eagle
            [1, 0, 0],  # kite
            [1, 0, 0],  # heron
            [0, 1, 0],  # gold
            [0, 1, 0],  # carp
            [0, 0, 1],  # hammer
            [0, 0, 1],  # saw
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(metrics.group_matrix(TAX), expected)


def test_softmax() -> None:
    got = metrics.softmax(np.asarray([[0.0, np.log(3.0)], [1000.0, 1000.0]]))
    np.testing.assert_allclose(got, [[0.25, 0.75], [0.5, 0.5]])


def test_cumulative_sums_leaves_up_the_tree() -> None:
    ids, cum = metrics.cumulative(TAX, np.asarray([ROW_A, ROW_C], dtype=np.float32))
    assert sorted(ids) == sorted(t for t, *_ in _EDGES)
    assert cum.shape == (2, len(ids))
    col = {t: j for j, t in enumerate(ids)}
    for t, p in CUM_A.items():
        assert cum[0, col[t]] == pytest.approx(p), t
    assert cum[1, col["node/bird/raptor"]] == pytest.approx(0.875)
    assert cum[1, col["broad/bird"]] == pytest.approx(1.0)
    assert cum[1, col["domain/artifact"]] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("threshold", "answer"),
    [
        (0.2, "eagle"),  # eagle 0.25 at depth 4
        (0.3, "node/bird/raptor"),  # depth 3: raptor 0.375 and gold 0.3125 clear; raptor larger
        (0.38, "broad/bird"),  # depth 3 all fail; bird 0.4375 (fish 0.375 fails)
        (0.5, "domain/animal"),  # 0.8125
        (0.9, ROOT),
    ],
)
def test_best_effort(threshold: float, answer: str) -> None:
    ids, cum = metrics.cumulative(TAX, np.asarray([ROW_A], dtype=np.float32))
    assert metrics.best_effort(TAX, ids, cum, threshold) == [answer]


def test_best_effort_per_row() -> None:
    ids, cum = metrics.cumulative(TAX, np.asarray([ROW_A, ROW_B, ROW_C], dtype=np.float32))
    assert metrics.best_effort(TAX, ids, cum, 0.9) == [ROOT, "gold", "broad/bird"]
    assert metrics.best_effort(TAX, ids, cum, 0.95) == [ROOT, "broad/fish", "broad/bird"]
    # Two depth-4 leaves clear 0.2 in row C: the more probable one wins.
    assert metrics.best_effort(TAX, ids, cum, 0.2) == ["eagle", "gold", "eagle"]


def test_precision_vs_depth() -> None:
    probs = np.asarray([ROW_A, ROW_B, ROW_C], dtype=np.float32)
    labels = np.asarray([CLASSES.index("eagle"), CLASSES.index("carp"), CLASSES.index("kite")])
    rows = metrics.precision_vs_depth(TAX, probs, labels, [0.2, 0.38, 0.9])
    # Answers by hand:
    #   0.2:  eagle (right, depth 4, leaf), gold (wrong, 3, leaf), eagle (wrong, 4, leaf)
    #   0.38: bird (right, 2), gold (wrong, 3, leaf), eagle (wrong, 4, leaf)
    #   0.9:  root (right, 0), gold (wrong, 3, leaf), bird (right, 2)
    expected = [
        {"threshold": 0.2, "precision": 1 / 3, "mean_depth": 11 / 3, "leaf_rate": 1.0},
        {"threshold": 0.38, "precision": 1 / 3, "mean_depth": 3.0, "leaf_rate": 2 / 3},
        {"threshold": 0.9, "precision": 2 / 3, "mean_depth": 5 / 3, "leaf_rate": 1 / 3},
    ]
    assert len(rows) == 3
    for got, exp in zip(rows, expected, strict=True):
        assert got == pytest.approx(exp)
