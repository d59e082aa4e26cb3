"""Merging per-category answers: P(taxon) = P(broad) x P(taxon | broad), best-effort answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    taxonomy: Taxonomy, broad_probs: Mapping[str, float], results: Sequence[CategoryResult]
) -> dict[str, float]:
    """Cumulative probability of every taxon the answer can speak for."""
    cum: dict[str, float] = {ROOT: 0.0}
    for broad, p in broad_probs.items():
        for t in taxonomy.path(broad):
            cum[t] = cum.get(t, 0.0) + p if t != broad else p
    for r in results:
        for taxon, p in r.scores.items():
            cum[taxon] = r.probability * p
    return cum


def merge(
    taxonomy: Taxonomy,
    broad_probs: Mapping[str, float],
    results: Sequence[CategoryResult],
    threshold: float,
    top_k: int,
) -> Merged:
    """The best-effort answer (deepest taxon clearing `threshold`) and ranked leaf suggestions."""
    cum = cumulative(taxonomy, broad_probs, results)
    answer = max(
        (t for t, p in cum.items() if p >= threshold),
        key=lambda t: (taxonomy.get(t).depth, cum[t]),
        default=ROOT,
    )
    leaves = [
        Suggestion(taxon, r.probability * p, r.served_by)
        for r in results
        for taxon, p in r.scores.items()
        if not taxonomy.children(taxon)
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
