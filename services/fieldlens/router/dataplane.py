"""The router's transport-free logic: decode, cache, broad net, dispatch, neighbours, merge."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from fieldlens.backends.blob_store import FolderBlobStore
from fieldlens.backends.cache import ResultCache, cache_key, generations_key
from fieldlens.backends.triton_client import TritonClient
from fieldlens.backends.vector_store import Exemplar, Neighbour, StoredExemplar, VectorStore
from fieldlens.common.errors import FieldlensError, InvalidInput, Unavailable
from fieldlens.common.knowledge import KnowledgeJournal, LearnedExample, NewTaxonSpec
from fieldlens.common.model_set import ModelSet
from fieldlens.common.taxonomy import LEARNED_PREFIX, check_learn_parent, learned_taxon_id
from fieldlens.common.telemetry import Metrics, StageTimer, get_metrics
from fieldlens.router.clients import ClassifierClient
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
    unit_rows,
    with_learned_classes,
    with_learned_leaves,
)

logger = logging.getLogger(__name__)

MIN_DISPATCH_PROBABILITY = 0.02  # below this a broad category is not worth a classifier call
NEIGHBOUR_POOL = 64  # candidates fetched once, then shared out to the suggestions
MAX_TOP_K = 50
MAX_NEIGHBOURS = 10
INDEX_BATCH = 64
# Examples re-learned per Learn batch when a model set re-learns what older sets learned.
RELEARN_BATCH = 64

_T = TypeVar("_T")
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


@dataclass
class IndexReport:
    received: int = 0
    indexed: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LearnItem:
    """One labelled image for Learn: an existing leaf id, or (name, parent) of a new taxon."""

    image: bytes
    taxon_id: str = ""
    new_name: str = ""
    new_parent: str = ""
    source: str = ""


@dataclass(frozen=True)
class LearnOutcome:
    exemplar_id: str
    taxon_id: str
    created_taxon: bool
    duplicate: bool
    learned_total: int


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
        journal: The router's knowledge journal (Learn); None disables Learn.
        blobs: Where exemplar image bytes are kept for re-indexing.
        specialist_min_p: P(broad) below which a specialist-routed category is scored by the
            tiny ensemble instead (saves a second net pass where it matters little).
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
        journal: KnowledgeJournal | None = None,
        blobs: FolderBlobStore | None = None,
        specialist_min_p: float = 0.0,
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
        self.journal = journal
        self.blobs = blobs
        self.specialist_min_p = specialist_min_p
        self._learn_lock = asyncio.Lock()  # Learn writes are ordered: journal order = apply order
        self._learned: dict[str, str] = {}  # exemplar id -> taxon id, everything learned
        # Broad groups holding learned taxa: their specialist net cannot know those taxa.
        self._learned_groups: set[str] = set()
        self._pending_bumps: set[str] = set()  # generation bumps Redis has not taken yet
        # Learned taxon -> (sum of its examples' embeddings, count): their imprinted rows.
        self._taxon_sums: dict[str, tuple[np.ndarray, int]] = {}
        self._imprint_rows: ImprintRows | None = None
        self._generations_key = generations_key(model_set.version)
        self._tasks: set[asyncio.Future[object]] = set()
        # Set while exemplars of an older embedding space are re-embedded into this one.
        self.reindexing: str | None = None
        # Set while the router switches to another model set: writes wait for the new one.
        self.writes_paused: str | None = None

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
        digest = checked_hash(image, self.limits)
        key = cache_key(f"{digest}.{self._options_tag(options)}", self.model_set.version)
        generations: dict[str, int] | None = None
        if self.cache is not None and await self._flush_bumps():
            with timer.stage("cache_get"):
                got = await self._optional(
                    self.cache.get_with_generations(key, self._generations_key),
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
        with timer.stage("broad"):
            if self._imprint_rows is not None:
                logits, emb, fine, norm = await self.triton.infer_broad_full(
                    img.rgb[None], model=self.model_set.broad_model
                )
            else:
                logits, emb = await self.triton.infer_broad(
                    img.rgb[None], model=self.model_set.broad_model
                )
        broad_probs = self._broad_probabilities(logits[0])
        learned_probs: dict[str, float] = {}
        if self._imprint_rows is not None:
            broad_probs, learned_probs = with_learned_classes(
                broad_probs, fine[0], float(norm[0, 0]), emb[0], self._imprint_rows
            )
        categories = pick_categories(broad_probs, self.dispatch_top, MIN_DISPATCH_PROBABILITY)
        with timer.stage("classify"):
            results, neighbours = await asyncio.gather(
                self._classify_categories(
                    categories, broad_probs, emb[0], img, degradations, timer, options.top_k
                ),
                self._neighbours(emb[0], categories, degradations, timer),
            )
        with timer.stage("merge"):
            if learned_probs:
                taxonomy = self.model_set.taxonomy
                results = [with_learned_leaves(taxonomy, r, learned_probs) for r in results]
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
        # A degraded answer is not cached: it would outlive the outage it reflects. The entry
        # records the knowledge generation of every category it used, as read before computing.
        if self.cache is not None and generations is not None and not degradations:
            used = {d.category: generations.get(d.category, 0) for d in result.dispatch}
            used[ALL_CATEGORIES] = generations.get(ALL_CATEGORIES, 0)
            value = json.dumps(used, separators=(",", ":")).encode() + b"\n" + self._encode(result)
            # Off the response path: the caller does not wait for the write-back.
            self._background(self._write_back(key, value))
        result.timings = _timings(timer, started)
        return result

    async def _write_back(self, key: str, value: bytes) -> None:
        assert self.cache is not None
        with StageTimer("router", self.metrics).stage("cache_set"):  # metrics only
            await self._optional(
                self.cache.set(key, value, self.cache_ttl_s), CACHE_UNAVAILABLE, []
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

    def _rebuild_imprints(self) -> None:
        """Imprinted fine-softmax rows of the learned taxa (needs the model set's imprint)."""
        imprint = self.model_set.manifest.get("broad", {}).get("imprint")
        if not imprint or not self._taxon_sums:
            self._imprint_rows = None
            return
        self._imprint_rows = imprint_rows(self._taxon_sums, imprint, self.model_set.taxonomy)

    async def _classify_categories(
        self,
        categories: Sequence[str],
        broad_probs: dict[str, float],
        emb: np.ndarray,
        img: DecodedImage,
        degradations: list[Degradation],
        timer: StageTimer,
        top_k: int,
    ) -> list[CategoryResult]:
        """Specialist categories one call each, every tiny category in one call, in parallel."""
        special = [
            c
            for c in categories
            if self._route(c) == SPECIALIST and broad_probs[c] >= self.specialist_min_p
        ]
        tiny = [c for c in categories if c not in special]
        from_specialists, from_tiny = await asyncio.gather(
            asyncio.gather(
                *(
                    self._specialist_category(c, broad_probs, emb, img, degradations, timer)
                    for c in special
                )
            ),
            self._tiny_categories(tiny, broad_probs, emb, degradations, timer, top_k=top_k),
        )
        by_category = {r.category: r for r in [*from_specialists, *from_tiny]}
        return [by_category[c] for c in categories]

    async def _specialist_category(
        self,
        category: str,
        broad_probs: dict[str, float],
        emb: np.ndarray,
        img: DecodedImage,
        degradations: list[Degradation],
        timer: StageTimer,
    ) -> CategoryResult:
        try:
            with timer.stage("specialist"):
                scores, served = await self.specialist.classify(
                    category, emb, img.rgb, self.model_set.version
                )
            self.metrics.record_dispatch(category, SPECIALIST, False)
            return CategoryResult(category, broad_probs[category], scores, served or SPECIALIST)
        except Unavailable as exc:
            logger.warning("specialist for %s unavailable, falling back to tiny: %s", category, exc)
            degradations.append(Degradation(SPECIALIST_FALLBACK, str(exc), category))
            self.metrics.record_degradation(SPECIALIST_FALLBACK)
        (result,) = await self._tiny_categories(
            [category], broad_probs, emb, degradations, timer, fell_back=True
        )
        return result

    async def _tiny_categories(
        self,
        categories: list[str],
        broad_probs: dict[str, float],
        emb: np.ndarray,
        degradations: list[Degradation],
        timer: StageTimer,
        fell_back: bool = False,
        top_k: int = 0,
    ) -> list[CategoryResult]:
        if not categories:
            return []
        try:
            with timer.stage("tiny"):
                # Suggestions are the top_k leaves overall, so no group needs more than that.
                got = await self.tiny.classify_categories(
                    categories, emb, self.model_set.version, top_k
                )
        except Unavailable as exc:
            for c in categories:
                degradations.append(Degradation(CLASSIFIER_UNAVAILABLE, str(exc), c))
                self.metrics.record_degradation(CLASSIFIER_UNAVAILABLE)
            return [CategoryResult(c, broad_probs[c], {}, "", fell_back) for c in categories]
        results = []
        for c in categories:
            scores, served = got[c]
            if any(t not in self.model_set.taxonomy for t in scores):
                scores = await self._with_known_taxa(scores)
            self.metrics.record_dispatch(c, TINY, fell_back)
            results.append(CategoryResult(c, broad_probs[c], scores, served or TINY, fell_back))
        return results

    async def _neighbours(
        self,
        emb: np.ndarray,
        categories: Sequence[str],
        degradations: list[Degradation],
        timer: StageTimer,
    ) -> list[Neighbour]:
        if self.store is None:
            # The store is part of every deployment; None means it failed to open, or that it
            # is being rebuilt for this embedding space (old vectors are never searched).
            degradations.append(
                Degradation(NEIGHBOURS_UNAVAILABLE, self.reindexing or "no vector store")
            )
            self.metrics.record_degradation(NEIGHBOURS_UNAVAILABLE)
            return []
        store = self.store
        if store.in_process:
            # An in-process HNSW search takes a fraction of a millisecond: run it on the loop
            # while the classifier calls are in flight (yield once so they go out first),
            # rather than pay a thread hand-off and GIL contention with them.
            await asyncio.sleep(0)
            with timer.stage("neighbours"):
                try:
                    return store.search(emb, NEIGHBOUR_POOL, list(categories))
                except FieldlensError as exc:
                    degradations.append(Degradation(NEIGHBOURS_UNAVAILABLE, str(exc)))
                    self.metrics.record_degradation(NEIGHBOURS_UNAVAILABLE)
                    return []
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

    def _check_writable(self) -> None:
        blocked = self.reindexing or self.writes_paused
        if blocked:
            raise Unavailable(f"{blocked}; retry when it is done")

    # -- IndexExemplars ------------------------------------------------------------------------
    async def index_exemplars(self, items: Sequence[tuple[bytes, str, str]]) -> IndexReport:
        """Embeds labelled images through Triton and upserts them (id = content hash)."""
        self._check_writable()
        if self.store is None:
            raise Unavailable("no vector store is configured")
        report = IndexReport(received=len(items))
        if self.blobs is not None:  # kept for re-embedding when the backbone changes
            blobs = self.blobs
            await asyncio.to_thread(lambda: [blobs.put(data) for data, _, _ in items if data])
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
            _, emb = await self.triton.infer_broad(
                np.stack([img.rgb for img, _, _ in chunk]), model=self.model_set.broad_model
            )
            points = [
                self._point(img.content_hash, emb[j], label, source)
                for j, (img, label, source) in enumerate(chunk)
            ]
            async with self._store_lock:
                await asyncio.to_thread(self.store.upsert, points)
            report.indexed += len(points)
        if report.indexed:
            async with self._store_lock:
                await asyncio.to_thread(self.store.flush)
        return report

    # -- Learn -------------------------------------------------------------------------------
    @property
    def learned_total(self) -> int:
        return len(self._learned)

    async def restore_knowledge(self) -> int:
        """Replays the journal: learned taxa, routing, exemplars; re-sends examples to tiny.

        The tiny service keeps its own journal and skips examples it already has, so the
        re-send only repairs what a failed Learn left half-done. Returns the examples replayed.
        """
        if self.journal is None:
            return 0
        examples = await asyncio.to_thread(lambda: list(self.journal.replay()))  # type: ignore[union-attr]
        if not examples:
            return 0
        for e in examples:
            self._apply_locally(e, rebuild=False)
        self._rebuild_imprints()
        if self.store is not None:
            async with self._store_lock:
                await asyncio.to_thread(self.store.upsert, [self._exemplar(e) for e in examples])
        try:
            for i in range(0, len(examples), INDEX_BATCH):
                await self.tiny.learn(examples[i : i + INDEX_BATCH], self.model_set.version)
        except FieldlensError as exc:
            logger.warning("could not re-send %d learned examples to tiny: %s", len(examples), exc)
        logger.info(
            "knowledge restored: %d examples, %d learned taxa",
            len(self._learned),
            sum(1 for t in self.model_set.taxonomy if t.id.startswith("learned/")),
        )
        return len(examples)

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
                    self._ensure_taxon(spec)
                except ValueError as exc:  # a parent this model set does not have
                    logger.warning("ignoring learned taxon %s: %s", spec.id, exc)
                    continue
                added += 1
        if added:
            logger.info("adopted %d taxa learned elsewhere (%d before)", added, len(known))
        return added

    async def _with_known_taxa(self, scores: dict[str, float]) -> dict[str, float]:
        """Scores mention a taxon this replica has not seen learned: adopt it, or drop it."""
        async with self._learn_lock:
            if any(t not in self.model_set.taxonomy for t in scores):
                await self.sync_learned_taxa()
        taxonomy = self.model_set.taxonomy
        return {t: p for t, p in scores.items() if t in taxonomy}

    def _resolve_label(
        self, item: LearnItem, pending: dict[str, NewTaxonSpec]
    ) -> tuple[str, NewTaxonSpec | None]:
        """(leaf id, creating spec); `pending` holds taxa that earlier items of the call create."""
        taxonomy = self.model_set.taxonomy
        if bool(item.taxon_id) == bool(item.new_name):
            raise InvalidInput("give either an existing taxon id or a new taxon (name and parent)")
        if item.taxon_id in pending:
            return item.taxon_id, pending[item.taxon_id]
        if item.taxon_id:
            if item.taxon_id not in taxonomy:
                raise InvalidInput(f"unknown taxon {item.taxon_id!r}")
            if taxonomy.children(item.taxon_id):
                raise InvalidInput(
                    f"taxon {item.taxon_id!r} is not a leaf; learn a new taxon under it instead"
                )
            return item.taxon_id, self._spec_of(item.taxon_id)
        try:
            tid = learned_taxon_id(item.new_name)
            check_learn_parent(taxonomy, item.new_parent)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if tid in taxonomy and taxonomy.get(tid).parent != item.new_parent:
            raise InvalidInput(
                f"taxon {tid!r} already exists under {taxonomy.get(tid).parent!r}, not "
                f"{item.new_parent!r}"
            )
        if tid in pending and pending[tid].parent != item.new_parent:
            raise InvalidInput(f"taxon {tid!r} is created under {pending[tid].parent!r} already")
        if tid in taxonomy:
            return tid, self._spec_of(tid)
        spec = pending.setdefault(tid, NewTaxonSpec(tid, item.new_name.strip(), item.new_parent))
        return tid, spec

    def _spec_of(self, taxon_id: str) -> NewTaxonSpec | None:
        """The creating spec of a learned taxon (sent along so any replica can create it)."""
        if not taxon_id.startswith("learned/"):
            return None
        t = self.model_set.taxonomy.get(taxon_id)
        return NewTaxonSpec(t.id, t.name, t.parent or "")

    def _exemplar(self, e: LearnedExample) -> Exemplar:
        return self._point(e.id, e.vector, e.taxon_id, e.source or "learn")

    def _point(self, exemplar_id: str, vector: np.ndarray, label: str, source: str) -> Exemplar:
        """A stored exemplar of this model set: taxonomy path and embedding version attached."""
        taxonomy = self.model_set.taxonomy
        return Exemplar(
            id=exemplar_id,
            vector=vector,
            label=label,
            broad=taxonomy.broad_of(label) or "",
            path=taxonomy.path(label),
            source=source,
            embedding_version=self.model_set.embedding_version,
        )

    def _ensure_taxon(self, spec: NewTaxonSpec | None) -> None:
        """Adds a learned taxon (ValueError for a parent this model set lacks)."""
        if spec is None:
            return
        if spec.id not in self.model_set.taxonomy:
            taxonomy = self.model_set.taxonomy.with_learned([(spec.id, spec.name, spec.parent)])
            self.model_set = replace(self.model_set, taxonomy=taxonomy)
        self._learned_groups.add(self.model_set.taxonomy.broad_of(spec.id) or "")

    def _apply_locally(self, e: LearnedExample, rebuild: bool = True) -> None:
        self._ensure_taxon(e.new_taxon)
        previous = self._learned.get(e.id)
        self._learned[e.id] = e.taxon_id
        if previous == e.taxon_id or len(e.vector) == 0:
            return
        # Examples of learned taxa shape their imprinted rows (a relabel moves the example).
        for taxon, sign in ((previous, -1.0), (e.taxon_id, 1.0)):
            if taxon is None or not taxon.startswith(LEARNED_PREFIX):
                continue
            total, n = self._taxon_sums.get(taxon, (np.zeros_like(e.vector), 0))
            total, n = total + sign * e.vector, n + int(sign)
            if n > 0:
                self._taxon_sums[taxon] = (total, n)
            else:
                self._taxon_sums.pop(taxon, None)
        if rebuild:
            self._rebuild_imprints()

    async def learn(self, items: Sequence[LearnItem]) -> list[LearnOutcome | FieldlensError]:
        """Learns labelled images; one outcome (or the item's error) per item, in order.

        Writes, in order: image bytes to the blob store, the example to the journal (the
        durable record), the exemplar to the vector store, the tiny classifiers (which journal
        it too), then the category's knowledge generation. An item is acknowledged only after
        all of them; the first failure of a shared backend fails the rest as Unavailable.
        """
        self._check_writable()
        if self.store is None or self.journal is None or self.blobs is None:
            raise Unavailable("learning needs the vector store, the journal and the blob store")
        results: list[LearnOutcome | FieldlensError | None] = [None] * len(items)
        todo: list[tuple[int, DecodedImage, str, NewTaxonSpec | None, str]] = []
        pending: dict[str, NewTaxonSpec] = {}
        async with self._learn_lock:
            self._check_writable()  # a model-set switch may have begun while this waited
            for n, item in enumerate(items):
                try:
                    tid, spec = self._resolve_label(item, pending)
                    img = decode(item.image, self.limits)
                except InvalidInput as exc:
                    results[n] = exc
                    continue
                if self._learned.get(img.content_hash) == tid:
                    results[n] = LearnOutcome(
                        img.content_hash, tid, False, True, self.learned_total
                    )
                    continue
                todo.append((n, img, tid, spec, item.source))
            for i in range(0, len(todo), INDEX_BATCH):
                chunk = todo[i : i + INDEX_BATCH]
                try:
                    outcomes = await self._learn_batch(
                        [(img, tid, spec, src) for _, img, tid, spec, src in chunk],
                        [items[n].image for n, *_ in chunk],
                    )
                except FieldlensError as exc:
                    for n, *_ in todo[i:]:
                        results[n] = exc
                    break
                for (n, *_), outcome in zip(chunk, outcomes, strict=True):
                    results[n] = outcome
        return [r for r in results if r is not None]

    async def _learn_embeddings(self, rgb: np.ndarray) -> np.ndarray:
        """A learned example's vector: the unit mean of the photo's and its mirror image's
        embeddings (few examples, so each counts for two views)."""
        n = len(rgb)
        _, emb = await self.triton.infer_broad(
            np.concatenate([rgb, rgb[:, :, ::-1]]), model=self.model_set.broad_model
        )
        return unit_rows(emb[:n] + emb[n:])

    async def _learn_batch(
        self,
        chunk: list[tuple[DecodedImage, str, NewTaxonSpec | None, str]],
        raw_images: list[bytes],
    ) -> list[LearnOutcome]:
        assert self.store is not None and self.journal is not None and self.blobs is not None
        started = time.perf_counter()
        emb = await self._learn_embeddings(np.stack([img.rgb for img, *_ in chunk]))
        taxonomy = self.model_set.taxonomy
        created = {spec.id for _, tid, spec, _ in chunk if spec and spec.id not in taxonomy}
        examples = [
            LearnedExample(img.content_hash, tid, emb[j].astype(np.float32), spec, src or "learn")
            for j, (img, tid, spec, src) in enumerate(chunk)
        ]
        blobs = self.blobs
        await asyncio.to_thread(lambda: [blobs.put(b) for b in raw_images])
        await asyncio.to_thread(self.journal.append, examples)
        for e in examples:  # the taxa must exist before their exemplars get paths
            self._ensure_taxon(e.new_taxon)
        points = [self._exemplar(e) for e in examples]
        async with self._store_lock:
            await asyncio.to_thread(self.store.upsert, points)
            await asyncio.to_thread(self.store.flush)
        await self.tiny.learn(examples, self.model_set.version)
        for e in examples:
            self._apply_locally(e)
        # Examples of learned taxa move their imprinted rows, which shift P(broad) for any
        # photo: every cached answer goes stale. Others change only their group's classifiers.
        touched = {p.broad for p in points}
        if any(e.taxon_id.startswith(LEARNED_PREFIX) for e in examples):
            touched.add(ALL_CATEGORIES)
        await self._bump(touched)
        self.metrics.record_learn(len(examples), time.perf_counter() - started)
        outcomes = []
        for e in examples:  # "created" goes to the first example of a new taxon only
            outcomes.append(
                LearnOutcome(e.id, e.taxon_id, e.taxon_id in created, False, self.learned_total)
            )
            created.discard(e.taxon_id)
        return outcomes

    async def _bump(self, categories: set[str]) -> None:
        """Makes cached answers of these categories stale; Redis down -> retried later."""
        if self.cache is None:
            return
        self._pending_bumps |= categories
        await self._flush_bumps()

    # -- re-index ----------------------------------------------------------------------------
    async def reindex(
        self,
        sources: Sequence[VectorStore],
        staging: VectorStore,
        final_name: str,
        old_journals: Sequence[KnowledgeJournal] = (),
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, int]:
        """Re-embeds the exemplars of older embedding spaces into `staging` with this model
        set's backbone (image bytes from the blob store), publishes it as `final_name` once
        complete, and only then serves neighbours from it. Then re-learns what the older model
        sets learned. Old vectors are never searched or copied."""
        assert self.blobs is not None
        blobs = self.blobs
        taxonomy = self.model_set.taxonomy
        counts = {"seen": 0, "indexed": 0, "no_blob": 0, "unknown_label": 0, "relearned": 0}
        self.reindexing = f"re-indexing exemplars into {final_name}"
        logger.info("%s from %d older collection(s)", self.reindexing, len(sources))
        for src in sources:
            pages = src.scroll(INDEX_BATCH)
            while (page := await asyncio.to_thread(next, pages, None)) is not None:
                todo: list[tuple[StoredExemplar, DecodedImage]] = []
                for ex in page:
                    counts["seen"] += 1
                    if ex.label not in taxonomy or taxonomy.children(ex.label):
                        counts["unknown_label"] += 1  # learned labels come back via journals
                        continue
                    if ex.id not in blobs:
                        counts["no_blob"] += 1
                        continue
                    data = await asyncio.to_thread(blobs.get, ex.id)
                    todo.append((ex, decode(data, self.limits, ex.id)))
                if not todo:
                    continue
                _, emb = await self.triton.infer_broad(
                    np.stack([img.rgb for _, img in todo]), model=self.model_set.broad_model
                )
                points = [
                    self._point(ex.id, emb[j], ex.label, ex.source)
                    for j, (ex, _) in enumerate(todo)
                ]
                await asyncio.to_thread(staging.upsert, points)
                counts["indexed"] += len(points)
                self.reindexing = (
                    f"re-indexing exemplars into {final_name} ({counts['indexed']} done)"
                )
                if progress is not None:
                    progress(self.reindexing)
        await asyncio.to_thread(staging.flush)
        await asyncio.to_thread(staging.publish_as, final_name)
        self.store, self.reindexing = staging, None
        logger.info("re-index into %s complete: %s", final_name, counts)
        counts["relearned"] = await self.relearn(old_journals, progress)
        return counts

    async def relearn(
        self,
        journals: Sequence[KnowledgeJournal],
        progress: Callable[[str], None] | None = None,
    ) -> int:
        """Learns again, with this backbone, what older model sets learned (last label wins),
        in batches of RELEARN_BATCH; `progress` hears "re-learning <done>/<total> examples"
        after each one."""
        assert self.blobs is not None
        blobs = self.blobs
        latest: dict[str, LearnedExample] = {}
        for journal in journals:
            for e in await asyncio.to_thread(lambda j=journal: list(j.replay())):
                latest[e.id] = e
        todo = [e for e in latest.values() if e.id in blobs]
        done = relearned = 0
        for start in range(0, len(todo), RELEARN_BATCH):
            items = []
            for e in todo[start : start + RELEARN_BATCH]:
                data = await asyncio.to_thread(blobs.get, e.id)
                if e.new_taxon is not None:
                    t = e.new_taxon
                    items.append(LearnItem(data, "", t.name, t.parent, e.source))
                else:
                    items.append(LearnItem(data, e.taxon_id, source=e.source))
            outcomes = await self.learn(items)
            failed = [o for o in outcomes if isinstance(o, FieldlensError)]
            for o in failed[:5]:
                logger.warning("could not re-learn an example: %s", o)
            done += len(items)
            relearned += len(items) - len(failed)
            if progress is not None:
                progress(f"re-learning {done}/{len(todo)} examples")
        if todo:
            logger.info("re-learned %d of %d examples of older model sets", relearned, len(todo))
        return relearned

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
