"""The router's write side: Learn, IndexExemplars, journal replay, re-learning and re-indexing.

A `Learner` belongs to one data plane (one model set). It owns the durable records (the
knowledge journal, the blob store) and every write into the vector store, and it tells the plane
what changed: new taxa, the imprinted rows of learned taxa, and which cached answers went stale.
The plane itself only answers Classify.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fieldlens.backends.blob_store import FolderBlobStore
from fieldlens.backends.vector_store import Exemplar, StoredExemplar, VectorStore
from fieldlens.common.errors import FieldlensError, InvalidInput, Unavailable
from fieldlens.common.knowledge import KnowledgeJournal, LearnedExample, NewTaxonSpec
from fieldlens.common.taxonomy import LEARNED_PREFIX, check_learn_parent, learned_taxon_id
from fieldlens.router.dataplane import ALL_CATEGORIES, RouterDataPlane
from fieldlens.router.imaging import DecodedImage, decode
from fieldlens.router.merge import unit_rows

logger = logging.getLogger(__name__)

INDEX_BATCH = 64
# Examples re-learned per Learn batch when a model set re-learns what older sets learned.
RELEARN_BATCH = 64


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


class Learner:
    """Learns labelled examples into one data plane, durably.

    Args:
        plane: The data plane (model set) the examples are learned into.
        journal: The router's knowledge journal of that model set; None disables Learn.
        blobs: Where exemplar image bytes are kept for re-embedding after a backbone change.
    """

    def __init__(
        self,
        plane: RouterDataPlane,
        journal: KnowledgeJournal | None,
        blobs: FolderBlobStore | None,
    ) -> None:
        self.plane = plane
        self.journal = journal
        self.blobs = blobs
        # Writes are ordered (journal order = apply order); a model-set switch holds it too.
        self.lock = asyncio.Lock()
        self._store_lock = asyncio.Lock()  # one writer at a time into the in-process store
        self._learned: dict[str, str] = {}  # exemplar id -> taxon id, everything learned
        # Learned taxon -> (sum of its examples' embeddings, count): their imprinted rows.
        self._taxon_sums: dict[str, tuple[np.ndarray, int]] = {}
        # Set while the router switches to another model set: writes wait for the new one.
        self.writes_paused: str | None = None

    @property
    def learned_total(self) -> int:
        return len(self._learned)

    @property
    def writes_blocked(self) -> str:
        """Why writes are refused right now (a re-index, a switch); empty when they are not."""
        return self.plane.reindexing or self.writes_paused or ""

    def _check_writable(self) -> None:
        if self.writes_blocked:
            raise Unavailable(f"{self.writes_blocked}; retry when it is done")

    # -- IndexExemplars ------------------------------------------------------------------------
    async def index_exemplars(self, items: Sequence[tuple[bytes, str, str]]) -> IndexReport:
        """Embeds labelled images through Triton and upserts them (id = content hash)."""
        self._check_writable()
        plane = self.plane
        store = plane.store
        if store is None:
            raise Unavailable("no vector store is configured")
        report = IndexReport(received=len(items))
        if self.blobs is not None:  # kept for re-embedding when the backbone changes
            blobs = self.blobs
            await asyncio.to_thread(lambda: [blobs.put(data) for data, _, _ in items if data])
        taxonomy = plane.model_set.taxonomy
        seen: set[str] = set()
        batch: list[tuple[DecodedImage, str, str]] = []
        for n, (data, label, source) in enumerate(items):
            try:
                if label not in taxonomy or taxonomy.children(label):
                    raise InvalidInput(f"label {label!r} is not a leaf taxon id")
                img = decode(data, plane.limits)
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
            _, emb = await plane.triton.infer_broad(
                np.stack([img.rgb for img, _, _ in chunk]), model=plane.model_set.broad_model
            )
            points = [
                self._point(img.content_hash, emb[j], label, source)
                for j, (img, label, source) in enumerate(chunk)
            ]
            async with self._store_lock:
                await asyncio.to_thread(store.upsert, points)
            report.indexed += len(points)
        if report.indexed:
            async with self._store_lock:
                await asyncio.to_thread(store.flush)
        return report

    # -- Learn -------------------------------------------------------------------------------
    async def restore(self) -> int:
        """Replays the journal: learned taxa, routing, exemplars; re-sends examples to tiny.

        The tiny service keeps its own journal and skips examples it already has, so the
        re-send only repairs what a failed Learn left half-done. Returns the examples replayed.
        """
        journal = self.journal
        if journal is None:
            return 0
        examples = await asyncio.to_thread(lambda: list(journal.replay()))
        if not examples:
            return 0
        plane = self.plane
        for e in examples:
            self._apply_locally(e, rebuild=False)
        self._rebuild_imprints()
        store = plane.store
        if store is not None:
            async with self._store_lock:
                await asyncio.to_thread(store.upsert, [self._exemplar(e) for e in examples])
        try:
            for i in range(0, len(examples), INDEX_BATCH):
                await plane.tiny.learn(examples[i : i + INDEX_BATCH], plane.model_set.version)
        except FieldlensError as exc:
            logger.warning("could not re-send %d learned examples to tiny: %s", len(examples), exc)
        logger.info(
            "knowledge restored: %d examples, %d learned taxa",
            len(self._learned),
            sum(1 for t in plane.model_set.taxonomy if t.id.startswith(LEARNED_PREFIX)),
        )
        return len(examples)

    def _resolve_label(
        self, item: LearnItem, pending: dict[str, NewTaxonSpec]
    ) -> tuple[str, NewTaxonSpec | None]:
        """(leaf id, creating spec); `pending` holds taxa that earlier items of the call create."""
        taxonomy = self.plane.model_set.taxonomy
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
        if not taxon_id.startswith(LEARNED_PREFIX):
            return None
        t = self.plane.model_set.taxonomy.get(taxon_id)
        return NewTaxonSpec(t.id, t.name, t.parent or "")

    def _exemplar(self, e: LearnedExample) -> Exemplar:
        return self._point(e.id, e.vector, e.taxon_id, e.source or "learn")

    def _point(self, exemplar_id: str, vector: np.ndarray, label: str, source: str) -> Exemplar:
        """A stored exemplar of this model set: taxonomy path and embedding version attached."""
        ms = self.plane.model_set
        return Exemplar(
            id=exemplar_id,
            vector=vector,
            label=label,
            broad=ms.taxonomy.broad_of(label) or "",
            path=ms.taxonomy.path(label),
            source=source,
            embedding_version=ms.embedding_version,
        )

    def _apply_locally(self, e: LearnedExample, rebuild: bool = True) -> None:
        self.plane.adopt_taxon(e.new_taxon)
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

    def _rebuild_imprints(self) -> None:
        self.plane.set_imprints(self._taxon_sums)

    async def learn(self, items: Sequence[LearnItem]) -> list[LearnOutcome | FieldlensError]:
        """Learns labelled images; one outcome (or the item's error) per item, in order.

        Writes, in order: image bytes to the blob store, the example to the journal (the
        durable record), the exemplar to the vector store, the tiny classifiers (which journal
        it too), then the category's knowledge generation. An item is acknowledged only after
        all of them; the first failure of a shared backend fails the rest as Unavailable.
        """
        self._check_writable()
        if self.plane.store is None or self.journal is None or self.blobs is None:
            raise Unavailable("learning needs the vector store, the journal and the blob store")
        results: list[LearnOutcome | FieldlensError | None] = [None] * len(items)
        todo: list[tuple[int, DecodedImage, str, NewTaxonSpec | None, str]] = []
        pending: dict[str, NewTaxonSpec] = {}
        async with self.lock:
            self._check_writable()  # a model-set switch may have begun while this waited
            for n, item in enumerate(items):
                try:
                    tid, spec = self._resolve_label(item, pending)
                    img = decode(item.image, self.plane.limits)
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
        _, emb = await self.plane.triton.infer_broad(
            np.concatenate([rgb, rgb[:, :, ::-1]]), model=self.plane.model_set.broad_model
        )
        return unit_rows(emb[:n] + emb[n:])

    async def _learn_batch(
        self,
        chunk: list[tuple[DecodedImage, str, NewTaxonSpec | None, str]],
        raw_images: list[bytes],
    ) -> list[LearnOutcome]:
        plane = self.plane
        store, journal, blobs = plane.store, self.journal, self.blobs
        assert store is not None and journal is not None and blobs is not None
        started = time.perf_counter()
        emb = await self._learn_embeddings(np.stack([img.rgb for img, *_ in chunk]))
        taxonomy = plane.model_set.taxonomy
        created = {spec.id for _, tid, spec, _ in chunk if spec and spec.id not in taxonomy}
        examples = [
            LearnedExample(img.content_hash, tid, emb[j].astype(np.float32), spec, src or "learn")
            for j, (img, tid, spec, src) in enumerate(chunk)
        ]
        await asyncio.to_thread(lambda: [blobs.put(b) for b in raw_images])
        await asyncio.to_thread(journal.append, examples)
        for e in examples:  # the taxa must exist before their exemplars get paths
            plane.adopt_taxon(e.new_taxon)
        points = [self._exemplar(e) for e in examples]
        async with self._store_lock:
            await asyncio.to_thread(store.upsert, points)
            await asyncio.to_thread(store.flush)
        await plane.tiny.learn(examples, plane.model_set.version)
        for e in examples:
            self._apply_locally(e)
        # Examples of learned taxa move their imprinted rows, which shift P(broad) for any
        # photo: every cached answer goes stale. Others change only their group's classifiers.
        touched = {p.broad for p in points}
        if any(e.taxon_id.startswith(LEARNED_PREFIX) for e in examples):
            touched.add(ALL_CATEGORIES)
        await plane.bump(touched)
        plane.metrics.record_learn(len(examples), time.perf_counter() - started)
        outcomes = []
        for e in examples:  # "created" goes to the first example of a new taxon only
            outcomes.append(
                LearnOutcome(e.id, e.taxon_id, e.taxon_id in created, False, self.learned_total)
            )
            created.discard(e.taxon_id)
        return outcomes

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
        blobs, plane = self.blobs, self.plane
        taxonomy = plane.model_set.taxonomy
        counts = {"seen": 0, "indexed": 0, "no_blob": 0, "unknown_label": 0, "relearned": 0}
        plane.reindexing = f"re-indexing exemplars into {final_name}"
        logger.info("%s from %d older collection(s)", plane.reindexing, len(sources))
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
                    todo.append((ex, decode(data, plane.limits, ex.id)))
                if not todo:
                    continue
                _, emb = await plane.triton.infer_broad(
                    np.stack([img.rgb for _, img in todo]), model=plane.model_set.broad_model
                )
                points = [
                    self._point(ex.id, emb[j], ex.label, ex.source)
                    for j, (ex, _) in enumerate(todo)
                ]
                await asyncio.to_thread(staging.upsert, points)
                counts["indexed"] += len(points)
                plane.reindexing = (
                    f"re-indexing exemplars into {final_name} ({counts['indexed']} done)"
                )
                if progress is not None:
                    progress(plane.reindexing)
        await asyncio.to_thread(staging.flush)
        await asyncio.to_thread(staging.publish_as, final_name)
        plane.store, plane.reindexing = staging, None
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
