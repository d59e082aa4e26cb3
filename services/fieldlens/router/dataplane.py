"""The router's transport-free logic: decode, cache, broad net, dispatch, neighbours, merge."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from fieldlens.backends.cache import ResultCache, cache_key
from fieldlens.backends.triton_client import TritonClient
from fieldlens.backends.vector_store import Exemplar, Neighbour, VectorStore
from fieldlens.common.errors import FieldlensError, InvalidInput, Unavailable
from fieldlens.common.model_set import ModelSet
from fieldlens.common.telemetry import Metrics, StageTimer, get_metrics
from fieldlens.router.clients import ClassifierClient
from fieldlens.router.imaging import DecodedImage, ImageLimits, decode
from fieldlens.router.merge import (
    SPECIALIST,
    TINY,
    CategoryResult,
    Suggestion,
    merge,
    pick_categories,
)

logger = logging.getLogger(__name__)

MIN_DISPATCH_PROBABILITY = 0.02  # below this a broad category is not worth a classifier call
NEIGHBOUR_POOL = 64  # candidates fetched once, then shared out to the suggestions
MAX_TOP_K = 50
MAX_NEIGHBOURS = 10
INDEX_BATCH = 64

_T = TypeVar("_T")

# Degradation kinds, as named in the protocol's DegradationKind.
CACHE_UNAVAILABLE = "CACHE_UNAVAILABLE"
NEIGHBOURS_UNAVAILABLE = "NEIGHBOURS_UNAVAILABLE"
SPECIALIST_FALLBACK = "SPECIALIST_FALLBACK"
CLASSIFIER_UNAVAILABLE = "CLASSIFIER_UNAVAILABLE"
STAGE_TIMEOUT = "STAGE_TIMEOUT"


@dataclass(frozen=True)
class ClassifyOptions:
    top_k: int
    neighbours: int
    threshold: float
    skip_cache: bool = False


@dataclass(frozen=True)
class Dispatch:
    category: str
    probability: float
    served_by: str
    fell_back: bool


@dataclass(frozen=True)
class Degradation:
    kind: str
    message: str
    category: str = ""


@dataclass
class Classification:
    """One answer, as the router's API returns it (and the cache stores it)."""

    answer_id: str
    answer_probability: float
    suggestions: list[Suggestion]
    dispatch: list[Dispatch]
    timings: list[tuple[str, float]] = field(default_factory=list)  # (stage, milliseconds)
    cached: bool = False
    degradations: list[Degradation] = field(default_factory=list)
    model_set_version: str = ""
    embedding_version: str = ""


@dataclass
class IndexReport:
    received: int = 0
    indexed: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)


Codec = tuple[Callable[[Classification], bytes], Callable[[bytes], Classification]]


class RouterDataPlane:
    """Everything the Router service does, behind plain Python calls.

    Args:
        model_set: The loaded manifest, taxonomy and routing table.
        triton: Client of the Triton server hosting `broad`.
        specialist: Classifier client for categories routed to a specialist.
        tiny: Classifier client for every other category (and the fallback).
        store: Exemplar vector store, or None when neighbours are disabled.
        cache: Result cache, or None when caching is disabled.
        codec: (encode, decode) of a Classification for the cache.
        limits: Image size limits.
        defaults: Options applied where a request leaves a field at zero.
        dispatch_top: How many of the most probable broad categories are classified.
        cache_ttl_s: Lifetime of a cached answer.
        stage_timeout_s: Budget of each optional stage (cache, neighbours).
    """

    def __init__(
        self,
        model_set: ModelSet,
        triton: TritonClient,
        specialist: ClassifierClient,
        tiny: ClassifierClient,
        store: VectorStore | None,
        cache: ResultCache | None,
        codec: Codec,
        limits: ImageLimits,
        defaults: ClassifyOptions,
        dispatch_top: int,
        cache_ttl_s: float,
        stage_timeout_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.model_set = model_set
        self.triton = triton
        self.specialist = specialist
        self.tiny = tiny
        self.store = store
        self.cache = cache
        self._encode, self._decode = codec
        self.limits = limits
        self.defaults = defaults
        self.dispatch_top = dispatch_top
        self.cache_ttl_s = cache_ttl_s
        self.stage_timeout_s = stage_timeout_s
        self.metrics = metrics or get_metrics()
        self._store_lock = asyncio.Lock()  # one writer at a time into the in-process store

    # -- Classify ------------------------------------------------------------------------------
    def resolve(
        self, top_k: int, neighbours: int, threshold: float, skip_cache: bool
    ) -> ClassifyOptions:
        """Request options with zero meaning 'server default', validated."""
        if top_k < 0 or top_k > MAX_TOP_K:
            raise InvalidInput(f"top_k must be between 0 and {MAX_TOP_K}, got {top_k}")
        if neighbours < 0 or neighbours > MAX_NEIGHBOURS:
            raise InvalidInput(
                f"neighbours must be between 0 and {MAX_NEIGHBOURS}, got {neighbours}"
            )
        if not (0.0 <= threshold <= 1.0) or np.isnan(threshold):
            raise InvalidInput(f"threshold must be in [0, 1], got {threshold}")
        return ClassifyOptions(
            top_k=top_k or self.defaults.top_k,
            neighbours=neighbours or self.defaults.neighbours,
            threshold=threshold or self.defaults.threshold,
            skip_cache=skip_cache,
        )

    async def classify(self, image: bytes, options: ClassifyOptions) -> Classification:
        started = time.perf_counter()
        timer = StageTimer("router", self.metrics)
        degradations: list[Degradation] = []
        with timer.stage("decode"):
            img = decode(image, self.limits)
        key = cache_key(f"{img.content_hash}.{self._options_tag(options)}", self.model_set.version)
        if self.cache is not None and not options.skip_cache:
            with timer.stage("cache_get"):
                raw = await self._optional(self.cache.get(key), CACHE_UNAVAILABLE, degradations)
            if raw:
                self.metrics.record_cache("hit")
                hit = replace(self._decode(raw), cached=True, degradations=degradations)
                hit.timings = _timings(timer, started)
                return hit
            self.metrics.record_cache("error" if degradations else "miss")
        with timer.stage("broad"):
            logits, emb = await self.triton.infer_broad(img.rgb[None])
        broad_probs = self._broad_probabilities(logits[0])
        categories = pick_categories(broad_probs, self.dispatch_top, MIN_DISPATCH_PROBABILITY)
        with timer.stage("classify"):
            results, neighbours = await asyncio.gather(
                asyncio.gather(
                    *(
                        self._classify_category(c, broad_probs[c], emb[0], img, degradations, timer)
                        for c in categories
                    )
                ),
                self._neighbours(emb[0], categories, degradations, timer),
            )
        with timer.stage("merge"):
            merged = merge(
                self.model_set.taxonomy, broad_probs, results, options.threshold, options.top_k
            )
            suggestions = _attach_exemplars(merged.suggestions, neighbours, options.neighbours)
        result = Classification(
            answer_id=merged.answer_id,
            answer_probability=merged.answer_probability,
            suggestions=suggestions,
            dispatch=[
                Dispatch(r.category, r.probability, r.served_by, r.fell_back) for r in results
            ],
            degradations=degradations,
            model_set_version=self.model_set.version,
            embedding_version=self.model_set.embedding_version,
        )
        # A degraded answer is not cached: it would outlive the outage it reflects.
        if self.cache is not None and not degradations:
            with timer.stage("cache_set"):
                await self._optional(
                    self.cache.set(key, self._encode(result), self.cache_ttl_s),
                    CACHE_UNAVAILABLE,
                    degradations,
                )
        result.timings = _timings(timer, started)
        return result

    def _options_tag(self, options: ClassifyOptions) -> str:
        # Answers differ with the options, so the options are part of the key.
        return f"k{options.top_k}n{options.neighbours}t{options.threshold:.3f}"

    def _broad_probabilities(self, log_probs: np.ndarray) -> dict[str, float]:
        p = np.exp(log_probs - log_probs.max())
        p = p / p.sum()
        return {b: float(v) for b, v in zip(self.model_set.taxonomy.broad_ids, p, strict=True)}

    async def _classify_category(
        self,
        category: str,
        probability: float,
        emb: np.ndarray,
        img: DecodedImage,
        degradations: list[Degradation],
        timer: StageTimer,
    ) -> CategoryResult:
        route = self.model_set.routing.get(category, TINY)
        if route == SPECIALIST:
            try:
                with timer.stage("specialist"):
                    scores, served = await self.specialist.classify(
                        category, emb, img.rgb, self.model_set.version
                    )
                self.metrics.record_dispatch(category, SPECIALIST, False)
                return CategoryResult(category, probability, scores, served or SPECIALIST)
            except Unavailable as exc:
                logger.warning(
                    "specialist for %s unavailable, falling back to tiny: %s", category, exc
                )
                degradations.append(Degradation(SPECIALIST_FALLBACK, str(exc), category))
                self.metrics.record_degradation(SPECIALIST_FALLBACK)
        fell_back = route == SPECIALIST
        try:
            with timer.stage("tiny"):
                scores, served = await self.tiny.classify(
                    category, emb, img.rgb, self.model_set.version
                )
        except Unavailable as exc:
            degradations.append(Degradation(CLASSIFIER_UNAVAILABLE, str(exc), category))
            self.metrics.record_degradation(CLASSIFIER_UNAVAILABLE)
            return CategoryResult(category, probability, {}, "", fell_back)
        self.metrics.record_dispatch(category, TINY, fell_back)
        return CategoryResult(category, probability, scores, served or TINY, fell_back)

    async def _neighbours(
        self,
        emb: np.ndarray,
        categories: Sequence[str],
        degradations: list[Degradation],
        timer: StageTimer,
    ) -> list[Neighbour]:
        if self.store is None:
            # The store is part of every deployment; None means it failed to open.
            degradations.append(Degradation(NEIGHBOURS_UNAVAILABLE, "no vector store"))
            self.metrics.record_degradation(NEIGHBOURS_UNAVAILABLE)
            return []
        store = self.store
        with timer.stage("neighbours"):
            found = await self._optional(
                asyncio.to_thread(store.search, emb, NEIGHBOUR_POOL, list(categories)),
                NEIGHBOURS_UNAVAILABLE,
                degradations,
            )
        return found or []

    async def _optional(
        self, aw: Awaitable[_T], kind: str, degradations: list[Degradation]
    ) -> _T | None:
        """Runs an optional stage under its time budget; failure degrades, never fails."""
        try:
            return await asyncio.wait_for(aw, self.stage_timeout_s)
        except (TimeoutError, FieldlensError) as exc:
            message = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            logger.warning("%s: %s", kind, message)
            degradations.append(Degradation(kind, message))
            self.metrics.record_degradation(kind)
            return None

    # -- IndexExemplars ------------------------------------------------------------------------
    async def index_exemplars(self, items: Sequence[tuple[bytes, str, str]]) -> IndexReport:
        """Embeds labelled images through Triton and upserts them (id = content hash)."""
        if self.store is None:
            raise Unavailable("no vector store is configured")
        report = IndexReport(received=len(items))
        taxonomy = self.model_set.taxonomy
        seen: set[str] = set()
        batch: list[tuple[DecodedImage, str, str]] = []
        for n, (data, label, source) in enumerate(items):
            try:
                if label not in taxonomy or taxonomy.children(label):
                    raise InvalidInput(f"label {label!r} is not a leaf taxon id")
                img = decode(data, self.limits)
            except InvalidInput as exc:
                report.rejected += 1
                if len(report.errors) < 10:
                    report.errors.append(f"item {n}: {exc}")
                continue
            if img.content_hash in seen:
                report.duplicates += 1
                continue
            seen.add(img.content_hash)
            batch.append((img, label, source))
        for i in range(0, len(batch), INDEX_BATCH):
            chunk = batch[i : i + INDEX_BATCH]
            _, emb = await self.triton.infer_broad(np.stack([img.rgb for img, _, _ in chunk]))
            points = [
                Exemplar(
                    id=img.content_hash,
                    vector=emb[j],
                    label=label,
                    broad=taxonomy.broad_of(label) or "",
                    path=taxonomy.path(label),
                    source=source,
                    embedding_version=self.model_set.embedding_version,
                )
                for j, (img, label, source) in enumerate(chunk)
            ]
            async with self._store_lock:
                await asyncio.to_thread(self.store.upsert, points)
            report.indexed += len(points)
        if report.indexed:
            async with self._store_lock:
                await asyncio.to_thread(self.store.flush)
        return report

    async def exemplar_count(self) -> int:
        if self.store is None:
            return 0
        return await asyncio.to_thread(self.store.count)


def _timings(timer: StageTimer, started: float) -> list[tuple[str, float]]:
    """Per-stage milliseconds plus `total`, the request's wall time (stages overlap)."""
    total = (time.perf_counter() - started) * 1e3
    return [(d.stage, d.milliseconds) for d in timer.durations] + [("total", total)]


def _attach_exemplars(
    suggestions: Sequence[Suggestion], neighbours: Sequence[Neighbour], per_suggestion: int
) -> list[Suggestion]:
    by_label: dict[str, list[Neighbour]] = {}
    for n in neighbours:  # already best first
        by_label.setdefault(n.label, []).append(n)
    return [
        replace(s, exemplars=tuple(by_label.get(s.taxon_id, [])[:per_suggestion]))
        for s in suggestions
    ]
