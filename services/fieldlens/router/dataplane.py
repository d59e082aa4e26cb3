"""The router's transport-free logic: decode, cache, broad net, dispatch, neighbours, merge."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from fieldlens.backends.cache import ResultCache, cache_key, generations_key
from fieldlens.backends.triton_client import TritonClient
from fieldlens.backends.vector_store import Neighbour, VectorStore
from fieldlens.common.batching import MicroBatcher
from fieldlens.common.errors import FieldlensError, InvalidInput, Unavailable
from fieldlens.common.knowledge import NewTaxonSpec
from fieldlens.common.model_set import ModelSet
from fieldlens.common.settings import DEFAULT_BATCH_IN_FLIGHT, DEFAULT_BATCH_MAX
from fieldlens.common.taxonomy import LEARNED_PREFIX
from fieldlens.common.telemetry import Metrics, StageTimer, get_metrics
from fieldlens.router.clients import CategoriesItem, CategoryAnswer, ClassifierClient
from fieldlens.router.imaging import DecodedImage, ImageLimits, checked_hash, decode
from fieldlens.router.merge import (
    SPECIALIST,
    TINY,
    CategoryResult,
    ImprintRows,
    Suggestion,
    imprint_rows,
    merge,
    pick_categories,
    with_learned_classes,
    with_learned_leaves,
)

if TYPE_CHECKING:
    from fieldlens.router.learning import Learner

logger = logging.getLogger(__name__)

MIN_DISPATCH_PROBABILITY = 0.02  # below this a broad category is not worth a classifier call
# Internal nodes a classifier sends start a little below the least probability that could make
# one the answer: the request's numbers travel as float32.
NODE_FLOOR = 1.0 - 1e-4
MAX_TOP_K = 50
MAX_NEIGHBOURS = 10

_T = TypeVar("_T")
# A classifier's answers for one image, by category.
CategoryScores = dict[str, CategoryAnswer]
ALL_CATEGORIES = "*"  # the knowledge generation every cached answer depends on

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
    # The answer in the cache's encoding (the codec's), without timings and the `cached` flag:
    # encoded once, it is both the cache entry and what the servicer sends.
    wire: bytes = b""


@dataclass
class _ClassifierCalls:
    """The classifier calls of one request, queued and in flight."""

    categories: list[str]
    tiny: list[str]
    special: list[str]
    started: float
    tiny_call: asyncio.Future[CategoryScores] | None = None
    special_call: asyncio.Future[CategoryScores] | None = None

    def abandon(self) -> None:
        """The request is done (or gone): calls not answered yet are not worth sending."""
        for call in (self.tiny_call, self.special_call):
            if call is None:
                continue
            if not call.done():
                call.cancel()
            elif not call.cancelled():
                call.exception()  # retrieved: a failure nobody awaited is not news


@dataclass(frozen=True)
class BroadPass:
    """One image's outputs of the broad net."""

    logits: np.ndarray  # broad-group log-probabilities
    embedding: np.ndarray  # L2-normalised
    fine: np.ndarray | None  # fine logits, when asked for (learned taxa need them)
    feature_norm: float


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
        specialist_min_p: P(broad) below which a specialist-routed category is scored by the
            tiny ensemble instead (saves a second net pass where it matters little).
        batch_max: Most requests whose broad-net (or tiny) calls are coalesced into one.
        batch_in_flight: Most coalesced calls out to one backend at once.
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
        specialist_min_p: float = 0.0,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_in_flight: int = DEFAULT_BATCH_IN_FLIGHT,
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
        self.specialist_min_p = specialist_min_p
        # Calibration of the stated probabilities (router/merge.py); 1 = as the nets say.
        self.power = float(model_set.manifest.get("calibration", {}).get("power", 1.0))
        # Concurrent requests share backend calls (see common/batching.py).
        self._broad: MicroBatcher[np.ndarray, BroadPass] = MicroBatcher(
            self._broad_batch,
            batch_max,
            batch_in_flight,
            self.metrics.batch_observer("router", "triton"),
        )
        self._tiny: MicroBatcher[CategoriesItem, CategoryScores] = MicroBatcher(
            self._tiny_batch,
            batch_max,
            batch_in_flight,
            self.metrics.batch_observer("router", "tiny"),
        )
        self._specialists: MicroBatcher[CategoriesItem, CategoryScores] = MicroBatcher(
            self._specialist_batch,
            batch_max,
            batch_in_flight,
            self.metrics.batch_observer("router", "specialist"),
        )
        # Broad groups holding learned taxa: their specialist net cannot know those taxa.
        self._learned_groups: set[str] = set()
        self._pending_bumps: set[str] = set()  # generation bumps Redis has not taken yet
        self._imprint_rows: ImprintRows | None = None
        self._sync_lock = asyncio.Lock()  # one look-up of taxa learned elsewhere at a time
        self._generations_key = generations_key(model_set.version)
        self._tasks: set[asyncio.Future[object]] = set()
        # Set while exemplars of an older embedding space are re-embedded into this one.
        self.reindexing: str | None = None
        # The write side of this model set (see `learning`); it travels with the plane, so a
        # model-set switch replaces both in one assignment. The plane never calls it.
        self.learner: Learner | None = None

    # -- Classify ------------------------------------------------------------------------------
    def resolve(
        self,
        top_k: int,
        neighbours: int,
        threshold: float,
        skip_cache: bool,
        min_precision: float = 0.0,
    ) -> ClassifyOptions:
        """Request options with zero meaning 'server default', validated. A `min_precision`
        becomes the threshold that reached it on the model set's validation photos."""
        if top_k < 0 or top_k > MAX_TOP_K:
            raise InvalidInput(f"top_k must be between 0 and {MAX_TOP_K}, got {top_k}")
        if neighbours < 0 or neighbours > MAX_NEIGHBOURS:
            raise InvalidInput(
                f"neighbours must be between 0 and {MAX_NEIGHBOURS}, got {neighbours}"
            )
        if not (0.0 <= threshold <= 1.0) or np.isnan(threshold):
            raise InvalidInput(f"threshold must be in [0, 1], got {threshold}")
        if not (0.0 <= min_precision <= 1.0) or np.isnan(min_precision):
            raise InvalidInput(f"min_precision must be in [0, 1], got {min_precision}")
        if min_precision:
            if threshold:
                raise InvalidInput("give threshold or min_precision, not both")
            threshold = self.model_set.threshold_for(min_precision)
        return ClassifyOptions(
            top_k=top_k or self.defaults.top_k,
            neighbours=neighbours or self.defaults.neighbours,
            threshold=threshold or self.defaults.threshold,
            skip_cache=skip_cache,
        )

    async def classify(
        self, image: bytes, options: ClassifyOptions, digest: str | None = None
    ) -> Classification:
        """Answers one image; `digest` is its checked content hash when the caller has it."""
        started = time.perf_counter()
        timer = StageTimer("router", self.metrics)
        degradations: list[Degradation] = []
        digest = digest or checked_hash(image, self.limits)
        key = cache_key(f"{digest}.{self._options_tag(options)}", self.model_set.version)
        generations: dict[str, int] | None = None
        if self.cache is not None and not await self._flush_bumps():
            self._degrade(
                CACHE_UNAVAILABLE,
                "cached answers not read: a generation bump is still waiting for Redis",
                degradations,
            )
        elif self.cache is not None:
            with timer.stage("cache_get"):
                got = await self._optional(
                    self.cache.get_with_generations(key, self._generations_key),
                    "cache_get",
                    CACHE_UNAVAILABLE,
                    degradations,
                )
            if got is not None:
                raw, generations = got
                hit = None if options.skip_cache else self._fresh_hit(raw, generations)
                if hit is not None:
                    self.metrics.record_cache("hit")
                    hit = replace(hit, cached=True, degradations=degradations)
                    hit.timings = _timings(timer, started)
                    return hit
            if not options.skip_cache:
                self.metrics.record_cache("error" if degradations else "miss")
        with timer.stage("decode"):
            img = decode(image, self.limits, digest)
        imprints = self._imprint_rows
        with timer.stage("broad"):
            broad = await self._broad.submit(img.rgb)
        broad_probs = self._broad_probabilities(broad.logits)
        learned_probs: dict[str, float] = {}
        if imprints is not None and broad.fine is not None:
            broad_probs, learned_probs = with_learned_classes(
                broad_probs, broad.fine, broad.feature_norm, broad.embedding, imprints
            )
        categories = pick_categories(broad_probs, self.dispatch_top, MIN_DISPATCH_PROBABILITY)
        with timer.stage("classify"):
            calls = self._start_classifiers(categories, broad_probs, broad.embedding, img, options)
            try:
                results = await self._classified(
                    calls, broad_probs, broad.embedding, degradations, timer
                )
            finally:
                calls.abandon()
        with timer.stage("merge"):
            taxonomy = self.model_set.taxonomy
            if learned_probs:
                results = [
                    with_learned_leaves(taxonomy, r, learned_probs, self.power) for r in results
                ]
            merged = merge(
                taxonomy, broad_probs, results, options.threshold, options.top_k, self.power
            )
        evidence = await self._evidence(
            broad.embedding, merged.suggestions, options.neighbours, degradations, timer
        )
        suggestions = [
            Suggestion(s.taxon_id, s.probability, s.served_by, tuple(found))
            for s, found in zip(merged.suggestions, evidence, strict=True)
        ]
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
        result.wire = self._encode(result)
        # A degraded answer is not cached: it would outlive the outage it reflects. The entry
        # records the knowledge generation of every category it used, as read before computing.
        if self.cache is not None and generations is not None and not degradations:
            used = {d.category: generations.get(d.category, 0) for d in result.dispatch}
            used[ALL_CATEGORIES] = generations.get(ALL_CATEGORIES, 0)
            value = json.dumps(used, separators=(",", ":")).encode() + b"\n" + result.wire
            # Off the response path: the caller does not wait for the write-back.
            self._background(self._write_back(key, value))
        result.timings = _timings(timer, started)
        return result

    async def _broad_batch(self, images: list[np.ndarray]) -> list[BroadPass]:
        """One broad-net call for the images of concurrent requests; the fine logits come too
        while learned taxa exist (their imprinted rows join the fine softmax)."""
        batch = np.stack(images)
        model = self.model_set.broad_model
        if self._imprint_rows is None:
            logits, emb = await self.triton.infer_broad(batch, model=model)
            return [BroadPass(logits[i], emb[i], None, 0.0) for i in range(len(images))]
        logits, emb, fine, norm = await self.triton.infer_broad_full(batch, model=model)
        return [
            BroadPass(logits[i], emb[i], fine[i], float(norm[i, 0])) for i in range(len(images))
        ]

    async def _tiny_batch(self, items: list[CategoriesItem]) -> list[CategoryScores]:
        """One tiny-service call for the categories of concurrent requests."""
        return await self.tiny.classify_batch(items, self.model_set.version)

    async def _specialist_batch(self, items: list[CategoriesItem]) -> list[CategoryScores]:
        """One specialist-service call for the specialist categories of concurrent requests."""
        return await self.specialist.classify_batch(items, self.model_set.version)

    async def _write_back(self, key: str, value: bytes) -> None:
        assert self.cache is not None
        with StageTimer("router", self.metrics).stage("cache_set"):  # metrics only
            await self._optional(
                self.cache.set(key, value, self.cache_ttl_s), "cache_set", CACHE_UNAVAILABLE, []
            )

    def _background(self, aw: Awaitable[object]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    def _fresh_hit(self, raw: bytes | None, generations: dict[str, int]) -> Classification | None:
        """The cached answer, unless a category it used has learned something since."""
        if not raw:
            return None
        header, _, payload = raw.partition(b"\n")
        used = json.loads(header)
        if any(generations.get(c, 0) != g for c, g in used.items()):
            self.metrics.record_cache("stale")
            return None
        return self._decode(payload)

    async def _flush_bumps(self) -> bool:
        """Retries generation bumps Redis missed; until they land, no cached answer is read."""
        if not self._pending_bumps or self.cache is None:
            return True
        for category in sorted(self._pending_bumps):
            try:
                await self.cache.bump_generation(self._generations_key, category)
            except Unavailable:
                return False
            self._pending_bumps.discard(category)
        return True

    def _options_tag(self, options: ClassifyOptions) -> str:
        # Answers differ with the options, so the options are part of the key.
        return f"k{options.top_k}n{options.neighbours}t{options.threshold:.3f}"

    def _broad_probabilities(self, log_probs: np.ndarray) -> dict[str, float]:
        p = np.exp(log_probs - log_probs.max())
        p = p / p.sum()
        return {b: float(v) for b, v in zip(self.model_set.taxonomy.broad_ids, p, strict=True)}

    def _route(self, category: str) -> str:
        if category in self._learned_groups:
            return TINY  # the specialist was trained before these taxa existed
        return self.model_set.routing.get(category, TINY)

    # -- what Learn changes (called by the learner) ----------------------------------------------
    def adopt_taxon(self, spec: NewTaxonSpec | None) -> None:
        """Adds a learned taxon to the taxonomy (ValueError for a parent this set lacks)."""
        if spec is None:
            return
        if spec.id not in self.model_set.taxonomy:
            taxonomy = self.model_set.taxonomy.with_learned([(spec.id, spec.name, spec.parent)])
            self.model_set = replace(self.model_set, taxonomy=taxonomy)
        self._learned_groups.add(self.model_set.taxonomy.broad_of(spec.id) or "")

    def drop_taxa(self, taxon_ids: Iterable[str]) -> None:
        """Removes learned taxa that Forget left without examples: from the taxonomy (and so
        from GetTaxonomy and answers) and from the tiny-only routing of their groups."""
        taxonomy = self.model_set.taxonomy.without_learned(taxon_ids)
        if taxonomy is not self.model_set.taxonomy:
            self.model_set = replace(self.model_set, taxonomy=taxonomy)
        self._learned_groups = {
            taxonomy.broad_of(t.id) or "" for t in taxonomy if t.id.startswith(LEARNED_PREFIX)
        }

    def set_imprints(
        self,
        sums: Mapping[str, tuple[np.ndarray, int]],
        examples: Mapping[str, Sequence[np.ndarray]] | None = None,
    ) -> None:
        """Imprinted fine-softmax rows of the learned taxa, from each one's (embedding sum,
        example count) and its examples' embeddings (merge.imprint_rows); none without the
        model set's imprint parameters."""
        imprint = self.model_set.manifest.get("broad", {}).get("imprint")
        if not imprint or not sums:
            self._imprint_rows = None
            return
        self._imprint_rows = imprint_rows(sums, imprint, self.model_set.taxonomy, examples)

    async def bump(self, categories: set[str]) -> None:
        """Makes cached answers of these categories stale; Redis down -> retried later."""
        if self.cache is None:
            return
        self._pending_bumps |= categories
        await self._flush_bumps()

    async def sync_learned_taxa(self) -> int:
        """Adopts taxa the tiny service learned through another router replica."""
        try:
            specs = await self.tiny.learned_taxa(self.model_set.version)
        except FieldlensError as exc:
            logger.warning("could not read learned taxa from tiny: %s", exc)
            return 0
        known = self.model_set.taxonomy
        added = 0
        for spec in specs:
            if spec.id not in self.model_set.taxonomy:
                try:
                    self.adopt_taxon(spec)
                except ValueError as exc:  # a parent this model set does not have
                    logger.warning("ignoring learned taxon %s: %s", spec.id, exc)
                    continue
                added += 1
        if added:
            logger.info("adopted %d taxa learned elsewhere (%d before)", added, len(known))
        return added

    async def _with_known_taxa(self, scores: dict[str, float]) -> dict[str, float]:
        """Scores mention a taxon this replica has not seen learned: adopt it, or drop it."""
        async with self._sync_lock:
            if any(t not in self.model_set.taxonomy for t in scores):
                await self.sync_learned_taxa()
        taxonomy = self.model_set.taxonomy
        return {t: p for t, p in scores.items() if t in taxonomy}

    def _start_classifiers(
        self,
        categories: Sequence[str],
        broad_probs: dict[str, float],
        emb: np.ndarray,
        img: DecodedImage,
        options: ClassifyOptions,
    ) -> _ClassifierCalls:
        """Queues the specialist categories in one specialist call and the others in one tiny
        call (each call shared with other requests in flight)."""
        special = [
            c
            for c in categories
            if self._route(c) == SPECIALIST and broad_probs[c] >= self.specialist_min_p
        ]
        tiny = [c for c in categories if c not in special]
        calls = _ClassifierCalls(list(categories), tiny, special, time.perf_counter())
        if tiny:
            floors = self._floors(tiny, broad_probs, options)
            calls.tiny_call = self._tiny.enqueue(
                CategoriesItem(tiny, options.top_k, floors, embedding=emb, power=self.power)
            )
        if special:
            floors = self._floors(special, broad_probs, options)
            calls.special_call = self._specialists.enqueue(
                CategoriesItem(special, options.top_k, floors, image=img.rgb, power=self.power)
            )
        return calls

    async def _classified(
        self,
        calls: _ClassifierCalls,
        broad_probs: dict[str, float],
        emb: np.ndarray,
        degradations: list[Degradation],
        timer: StageTimer,
    ) -> list[CategoryResult]:
        """The answers of `_start_classifiers`' calls, one per category in request order."""
        found = await self._tiny_results(
            calls.tiny, calls.tiny_call, broad_probs, degradations, timer, calls.started
        )
        if calls.special_call is not None:
            found += await self._specialist_results(
                calls.special,
                calls.special_call,
                broad_probs,
                emb,
                degradations,
                timer,
                calls.started,
            )
        by_category = {r.category: r for r in found}
        return [by_category[c] for c in calls.categories]

    def _floors(
        self, categories: Sequence[str], broad_probs: dict[str, float], options: ClassifyOptions
    ) -> list[float]:
        """Per category, the least P(node | category) of an internal node worth sending back.

        Suggestions are the top_k leaves overall, so no group needs more leaves than that, and
        an internal node can be the answer only if P(group) x P(node | group) clears the
        threshold. A group holding learned taxa gets every node: learned leaves add their
        probability to their ancestors here (`with_learned_leaves`).
        """
        if self.power != 1.0:  # calibrated: the floor is a share of the tempered mass
            return [
                0.0 if c in self._learned_groups else options.threshold * NODE_FLOOR
                for c in categories
            ]
        return [
            0.0 if c in self._learned_groups else options.threshold / broad_probs[c] * NODE_FLOOR
            for c in categories
        ]

    async def _specialist_results(
        self,
        categories: list[str],
        call: Awaitable[CategoryScores],
        broad_probs: dict[str, float],
        emb: np.ndarray,
        degradations: list[Degradation],
        timer: StageTimer,
        started: float,
    ) -> list[CategoryResult]:
        try:
            got = await call
        except Unavailable as exc:
            timer.observe("specialist", started)
            logger.warning(
                "specialist for %s unavailable, falling back to tiny: %s", categories, exc
            )
            for c in categories:
                degradations.append(Degradation(SPECIALIST_FALLBACK, str(exc), c))
                self.metrics.record_degradation(SPECIALIST_FALLBACK)
            fallback = self._tiny.enqueue(
                CategoriesItem(categories, 0, [], embedding=emb, power=self.power)
            )
            return await self._tiny_results(
                categories, fallback, broad_probs, degradations, timer, time.perf_counter(), True
            )
        timer.observe("specialist", started)
        results = []
        for c in categories:
            a = got[c]
            self.metrics.record_dispatch(c, SPECIALIST, False)
            results.append(
                CategoryResult(
                    c,
                    broad_probs[c],
                    a.scores,
                    a.served_by or SPECIALIST,
                    tempered=a.tempered,
                    tempered_total=a.tempered_total,
                )
            )
        return results

    async def _tiny_results(
        self,
        categories: list[str],
        call: Awaitable[CategoryScores] | None,
        broad_probs: dict[str, float],
        degradations: list[Degradation],
        timer: StageTimer,
        started: float,
        fell_back: bool = False,
    ) -> list[CategoryResult]:
        if call is None:
            return []
        try:
            got = await call
        except Unavailable as exc:
            for c in categories:
                degradations.append(Degradation(CLASSIFIER_UNAVAILABLE, str(exc), c))
                self.metrics.record_degradation(CLASSIFIER_UNAVAILABLE)
            return [CategoryResult(c, broad_probs[c], {}, "", fell_back) for c in categories]
        finally:
            timer.observe("tiny", started)
        results = []
        for c in categories:
            a = got[c]
            scores, tempered = a.scores, a.tempered
            if any(t not in self.model_set.taxonomy for t in scores):
                scores = await self._with_known_taxa(scores)
                tempered = {t: q for t, q in tempered.items() if t in scores}
            self.metrics.record_dispatch(c, TINY, fell_back)
            results.append(
                CategoryResult(
                    c,
                    broad_probs[c],
                    scores,
                    a.served_by or TINY,
                    fell_back,
                    tempered,
                    a.tempered_total,
                )
            )
        return results

    async def _evidence(
        self,
        emb: np.ndarray,
        suggestions: Sequence[Suggestion],
        per_suggestion: int,
        degradations: list[Degradation],
        timer: StageTimer,
    ) -> list[list[Neighbour]]:
        """For each suggestion, the `per_suggestion` stored exemplars of its taxon nearest to
        the photo: one batched query filtered by label, once the suggestions are known."""
        none: list[list[Neighbour]] = [[] for _ in suggestions]
        if self.store is None:
            # The store is part of every deployment; None means it failed to open, or that it
            # is being rebuilt for this embedding space (old vectors are never searched).
            degradations.append(
                Degradation(NEIGHBOURS_UNAVAILABLE, self.reindexing or "no vector store")
            )
            self.metrics.record_degradation(NEIGHBOURS_UNAVAILABLE)
            return none
        store = self.store
        labels = [s.taxon_id for s in suggestions]
        if store.in_process:
            # An in-process search of a few labels takes a few tens of microseconds: run it on
            # the loop rather than pay a thread hand-off.
            with timer.stage("neighbours"):
                try:
                    return store.search_labels(emb, labels, per_suggestion)
                except FieldlensError as exc:
                    degradations.append(Degradation(NEIGHBOURS_UNAVAILABLE, str(exc)))
                    self.metrics.record_degradation(NEIGHBOURS_UNAVAILABLE)
                    return none
        with timer.stage("neighbours"):
            found = await self._optional(
                asyncio.to_thread(store.search_labels, emb, labels, per_suggestion),
                "neighbours",
                NEIGHBOURS_UNAVAILABLE,
                degradations,
            )
        return found or none

    async def _optional(
        self, aw: Awaitable[_T], stage: str, kind: str, degradations: list[Degradation]
    ) -> _T | None:
        """Runs an optional stage under its time budget; failure degrades, never fails. Past
        the budget the degradation is STAGE_TIMEOUT; a backend that fails is `kind`."""
        try:
            async with asyncio.timeout(self.stage_timeout_s):
                return await aw
        except TimeoutError:  # the budget's: backends raise their own failures typed
            kind = STAGE_TIMEOUT
            message = f"{stage} ran past its {self.stage_timeout_s * 1e3:.0f} ms budget"
        except FieldlensError as exc:
            message = str(exc)
        self._degrade(kind, message, degradations)
        return None

    def _degrade(self, kind: str, message: str, degradations: list[Degradation]) -> None:
        logger.warning("%s: %s", kind, message)
        degradations.append(Degradation(kind, message))
        self.metrics.record_degradation(kind)

    async def exemplar_count(self) -> int:
        if self.store is None:
            return 0
        return await asyncio.to_thread(self.store.count)


def _timings(timer: StageTimer, started: float) -> list[tuple[str, float]]:
    """Per-stage milliseconds plus `total`, the request's wall time (stages overlap)."""
    total = (time.perf_counter() - started) * 1e3
    return [(d.stage, d.milliseconds) for d in timer.durations] + [("total", total)]
