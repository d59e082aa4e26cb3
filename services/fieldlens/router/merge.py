"""Merging per-category answers: P(taxon) = P(broad) x P(taxon | broad), best-effort answer.

Calibration (the model set's `calibration.power`, a; temperature 1/a) reshapes the leaf
distribution those products define: P*(leaf) = P(leaf)^a / Z, and a taxon's probability is the
sum over the leaves below it. A power on each leaf keeps their order, so the suggestions rank as
before; only the stated probabilities, and so the best-effort answer, change. The classifiers
send, per taxon they score, the sum of P(leaf | category)^a over its leaves ("tempered"), and
the sum over all their category's leaves, so the router has Z exactly for every dispatched
category; a category nobody scored counts as if its leaves shared its probability evenly
(n leaves: P(category)^a n^(1-a)), a small term when a > 1 since it was not among the most
probable. The trainer fits a on validation with this same arithmetic (`calibrated`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fieldlens.backends.vector_store import Neighbour
from fieldlens.common.taxonomy import ROOT, Taxonomy

SPECIALIST = "specialist"
TINY = "tiny"


@dataclass(frozen=True)
class CategoryResult:
    """What one classifier said about one broad category."""

    category: str
    probability: float  # P(category) from the broad net
    scores: Mapping[str, float]  # P(taxon | category) for taxa under the category
    served_by: str  # SPECIALIST or TINY; empty when no classifier answered
    fell_back: bool = False  # the specialist was routed to but unreachable
    # Sum of P(leaf | category)^power over the leaves below each taxon of `scores`, and over
    # all the category's leaves (see the module docstring); empty and 0 when not calibrated.
    tempered: Mapping[str, float] = field(default_factory=dict)
    tempered_total: float = 0.0


@dataclass(frozen=True)
class Suggestion:
    taxon_id: str
    probability: float
    served_by: str
    exemplars: tuple[Neighbour, ...] = ()


@dataclass(frozen=True)
class Merged:
    answer_id: str
    answer_probability: float
    suggestions: list[Suggestion] = field(default_factory=list)


def cumulative(
    taxonomy: Taxonomy,
    broad_probs: Mapping[str, float],
    results: Sequence[CategoryResult],
    power: float = 1.0,
) -> dict[str, float]:
    """Cumulative probability of every taxon the answer can speak for (calibrated by `power`,
    see the module docstring)."""
    if power != 1.0:
        return calibrated(taxonomy, broad_probs, results, power)
    cum: dict[str, float] = {ROOT: 0.0}
    for broad, p in broad_probs.items():
        for t in taxonomy.path(broad):
            cum[t] = cum.get(t, 0.0) + p if t != broad else p
    for r in results:
        for taxon, p in r.scores.items():
            cum[taxon] = r.probability * p
    return cum


def calibrated(
    taxonomy: Taxonomy,
    broad_probs: Mapping[str, float],
    results: Sequence[CategoryResult],
    power: float,
) -> dict[str, float]:
    """`cumulative` of the calibrated leaf distribution P(leaf)^power / Z."""
    scored = {r.category: r for r in results if r.tempered_total > 0.0}
    mass: dict[str, float] = {}
    for broad, p in broad_probs.items():
        r = scored.get(broad)
        spread = r.tempered_total if r is not None else taxonomy.leaf_count(broad) ** (1 - power)
        mass[broad] = p**power * spread
    z = sum(mass.values()) or 1.0
    cum: dict[str, float] = {ROOT: 0.0}
    for broad, m in mass.items():
        for t in taxonomy.path(broad):
            cum[t] = cum.get(t, 0.0) + m / z if t != broad else m / z
    for r in scored.values():
        scale = r.probability**power / z
        for taxon, q in r.tempered.items():
            cum[taxon] = scale * q
    return cum


def merge(
    taxonomy: Taxonomy,
    broad_probs: Mapping[str, float],
    results: Sequence[CategoryResult],
    threshold: float,
    top_k: int,
    power: float = 1.0,
) -> Merged:
    """The best-effort answer (deepest taxon clearing `threshold`) and ranked leaf suggestions,
    with probabilities calibrated by `power` (1: as the nets say)."""
    cum = cumulative(taxonomy, broad_probs, results, power)
    answer = max(
        (t for t, p in cum.items() if p >= threshold),
        key=lambda t: (taxonomy.get(t).depth, cum[t]),
        default=ROOT,
    )
    if power == 1.0:
        leaves = [
            Suggestion(taxon, r.probability * p, r.served_by)
            for r in results
            for taxon, p in r.scores.items()
            if taxonomy.is_leaf(taxon)
        ]
    else:
        leaves = [
            Suggestion(taxon, cum[taxon], r.served_by)
            for r in results
            if r.tempered_total > 0.0
            for taxon in r.scores
            if taxonomy.is_leaf(taxon) and taxon in cum
        ]
    leaves.sort(key=lambda s: -s.probability)
    return Merged(answer, cum.get(answer, 0.0), leaves[:top_k])


def pick_categories(
    broad_probs: Mapping[str, float], top: int, min_probability: float
) -> list[str]:
    """The `top` most probable broad categories, dropping negligible ones (always at least one)."""
    ranked = sorted(broad_probs, key=lambda b: -broad_probs[b])
    chosen = [b for b in ranked[:top] if broad_probs[b] >= min_probability]
    return chosen or ranked[:1]


# (rows [T, dim], biases [T], broad group of each learned taxon, the taxa)
ImprintRows = tuple[np.ndarray, np.ndarray, list[str], list[str]]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (all-zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def imprint_rows(
    sums: Mapping[str, tuple[np.ndarray, int]],
    imprint: Mapping[str, Any],
    taxonomy: Taxonomy,
    examples: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> ImprintRows:
    """Fine-softmax rows for learned taxa by weight imprinting: the mean of a taxon's example
    embeddings, centred on the training embeddings' mean, scaled to the trained rows' median
    norm, with the imprint's `bias`.

    With `examples` and an `example_bias` (a calibrated set's), each example also gets a row
    of its own, with that stricter bias: a photo very like one of the examples (a learned photo
    itself, another shot of the same specimen) is claimed by it even where the taxon's mean row
    is too careful to claim it. A taxon's probability is the sum over its rows.
    """
    mean = np.asarray(imprint["embedding_mean"], dtype=np.float32)
    taxa = sorted(sums)
    vectors = [sums[t][0] / sums[t][1] for t in taxa]
    biases = [float(imprint["bias"])] * len(taxa)
    if examples and "example_bias" in imprint:
        for t in sorted(examples):
            vectors.extend(examples[t])
            taxa.extend([t] * len(examples[t]))
            biases.extend([float(imprint["example_bias"])] * len(examples[t]))
    rows = unit_rows(np.stack(vectors).astype(np.float32) - mean) * float(imprint["row_norm"])
    bias = np.asarray(biases, dtype=np.float32)
    return rows, bias, [taxonomy.broad_of(t) or "" for t in taxa], taxa


def with_learned_classes(
    broad_probs: Mapping[str, float],
    fine_logits: np.ndarray,
    feature_norm: float,
    embedding: np.ndarray,
    learned: ImprintRows,
) -> tuple[dict[str, float], dict[str, float]]:
    """(P(broad), P(learned taxon)) with learned taxa added to the fine softmax as imprinted
    classes (a taxon with several rows holds their sum).

    A learned logit (feature norm x row . embedding + bias, the trained logits' form) competes
    with the trained ones; the mass it takes goes to its group and the rest keeps the net's
    proportions. A photo like the learned examples lifts their group into the dispatch; a photo
    unlike them leaves P(broad) as it was.
    """
    rows, bias, groups, taxa = learned
    z = np.concatenate(
        [np.asarray(fine_logits, np.float32), feature_norm * (rows @ embedding) + bias]
    )
    p = np.exp(z - z.max())
    p_learned = p[len(fine_logits) :] / p.sum()
    out = {g: v * (1.0 - float(p_learned.sum())) for g, v in broad_probs.items()}
    by_taxon: dict[str, float] = {}
    for g, t, v in zip(groups, taxa, p_learned.tolist(), strict=True):
        out[g] += v
        by_taxon[t] = by_taxon.get(t, 0.0) + v
    return out, by_taxon


MAX_LEARNED_SHARE = 0.999


def with_learned_leaves(
    taxonomy: Taxonomy,
    result: CategoryResult,
    learned: Mapping[str, float],
    power: float = 1.0,
) -> CategoryResult:
    """A category's scores with its learned taxa at their fine-softmax probability.

    A learned taxon is a class of the fine softmax, so its P(taxon | category) is its share of
    the category's mass there; the trained taxa keep the classifier's proportions of the rest,
    and every ancestor inside the category gains what its learned descendants hold. The
    tempered sums (calibration) follow the same leaves.
    """
    mine = {t: p for t, p in learned.items() if taxonomy.broad_of(t) == result.category}
    if not mine or result.probability <= 0 or not result.scores:
        return result
    q = {t: min(p / result.probability, MAX_LEARNED_SHARE) for t, p in mine.items()}
    total = sum(q.values())
    if total > MAX_LEARNED_SHARE:
        q = {t: v * MAX_LEARNED_SHARE / total for t, v in q.items()}
        total = MAX_LEARNED_SHARE
    scores = {t: p * (1.0 - total) for t, p in result.scores.items() if t not in q}
    shrink = (1.0 - total) ** power
    tempered = {t: v * shrink for t, v in result.tempered.items() if t not in q}
    tempered_total = result.tempered_total * shrink
    for t, v in q.items():
        scores[t] = v
        for ancestor in taxonomy.path(t)[:-1]:
            if ancestor in scores:
                scores[ancestor] += v
        if result.tempered_total > 0.0:
            vt = v**power
            tempered[t] = vt
            tempered_total += vt
            for ancestor in taxonomy.path(t)[:-1]:
                if ancestor in tempered:
                    tempered[ancestor] += vt
    return replace(result, scores=scores, tempered=tempered, tempered_total=tempered_total)
