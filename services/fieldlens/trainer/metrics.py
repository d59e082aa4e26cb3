"""Evaluation maths for the report and the tests: top-k, rollup, best-effort answer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fieldlens.common.taxonomy import Taxonomy


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def group_matrix(taxonomy: Taxonomy) -> np.ndarray:
    """(classes, broad groups) 0/1 matrix: which broad group each fine class belongs to."""
    m = np.zeros((len(taxonomy.class_ids), len(taxonomy.broad_ids)), dtype=np.float32)
    col = {b: j for j, b in enumerate(taxonomy.broad_ids)}
    for i, c in enumerate(taxonomy.class_ids):
        m[i, col[taxonomy.broad_of(c)]] = 1.0
    return m


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cumulative(taxonomy: Taxonomy, leaf_probs: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Sums leaf probabilities (columns in class order) up to every taxon: (ids, (N, taxa))."""
    ids = [t.id for t in taxonomy]
    col = {t: j for j, t in enumerate(ids)}
    m = np.zeros((len(taxonomy.class_ids), len(ids)), dtype=np.float32)
    for i, c in enumerate(taxonomy.class_ids):
        for t in taxonomy.path(c):
            m[i, col[t]] = 1.0
    return ids, leaf_probs @ m


def best_effort(
    taxonomy: Taxonomy, ids: Sequence[str], cum: np.ndarray, threshold: float
) -> list[str]:
    """Per row, the deepest taxon whose cumulative probability clears `threshold`."""
    depth = np.asarray([taxonomy.get(t).depth for t in ids], dtype=np.float64)
    # Deeper wins; among equal depth the more probable one (only one can exceed 0.5 anyway).
    key = np.where(cum >= threshold, depth[None, :] + cum, -1.0)
    return [ids[j] for j in key.argmax(axis=1)]


def precision_vs_depth(
    taxonomy: Taxonomy, leaf_probs: np.ndarray, labels: np.ndarray, thresholds: Sequence[float]
) -> list[dict[str, float]]:
    """For each threshold: how often the best-effort answer is right, and how deep it goes."""
    ids, cum = cumulative(taxonomy, leaf_probs)
    rows = []
    for t in thresholds:
        answers = best_effort(taxonomy, ids, cum, t)
        truth = [taxonomy.class_ids[y] for y in labels]
        correct = [taxonomy.is_ancestor_or_self(a, c) for a, c in zip(answers, truth, strict=True)]
        depths = [taxonomy.get(a).depth for a in answers]
        rows.append(
            {
                "threshold": float(t),
                "precision": float(np.mean(correct)),
                "mean_depth": float(np.mean(depths)),
                "leaf_rate": float(np.mean([taxonomy.get(a).rank == "class" for a in answers])),
            }
        )
    return rows
