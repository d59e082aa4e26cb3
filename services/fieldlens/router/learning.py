"""The router's write side: Learn, Forget, IndexExemplars, journal replay, re-learning and
re-indexing.

A `Learner` belongs to one data plane (one model set). It owns the durable records (the
knowledge journal, the blob store) and every write into the vector store, and it tells the plane
what changed: new taxa, taxa gone, the imprinted rows of learned taxa, and which cached answers
went stale. The plane itself only answers Classify.

Learn's input rules are checked here, before anything is written: a new taxon's name is 1-100
printable characters, `source` at most MAX_SOURCE_BYTES of UTF-8, and a photo already learned
under another label is refused (relabelling is Forget, then Learn). Journals written before
these rules may hold relabels; replaying them still applies each record in order.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fieldlens.backends.blob_store import FolderBlobStore
from fieldlens.backends.vector_store import Exemplar, StoredExemplar, VectorStore
from fieldlens.common.errors import FailedPrecondition, FieldlensError, InvalidInput, Unavailable
from fieldlens.common.knowledge import (
    ForgetRecord,
    KnowledgeJournal,
    LearnedExample,
    NewTaxonSpec,
    forgotten_ids,
    still_learned,
    still_learned_across,
)
from fieldlens.common.taxonomy import (
    LEARNED_PREFIX,
    check_learn_parent,
    check_taxon_name,
    learned_taxon_id,
)
from fieldlens.router.dataplane import ALL_CATEGORIES, RouterDataPlane
from fieldlens.router.imaging import DecodedImage, decode
from fieldlens.router.merge import unit_rows

logger = logging.getLogger(__name__)

INDEX_BATCH = 64
# Examples re-learned per Learn batch when a model set re-learns what older sets learned.
RELEARN_BATCH = 64
MAX_SOURCE_BYTES = 256  # a Learn item's `source`, UTF-8
MAX_ID_CHARS = 256  # no taxon id is longer; longer ones are refused without a look-up
MAX_FORGET_IDS = 10_000  # exemplar ids per Forget call
FORGET_BATCH = 1_000  # ids per call to tiny when a restart repeats a Forget
_EXEMPLAR_ID = re.compile(r"^[0-9a-f]{64}$")


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
    client: str = ""  # who teaches it (a write token's name), kept with the example


@dataclass(frozen=True)
class LearnOutcome:
    exemplar_id: str
    taxon_id: str
    created_taxon: bool
    duplicate: bool
    learned_total: int


@dataclass(frozen=True)
class ForgetOutcome:
    forgotten: int  # exemplars removed: learned examples and indexed exemplars
    learned_forgotten: int  # of those, learned examples (tiny's count if it held more)
    not_found: list[str]  # requested exemplar ids that were nowhere
    removed_taxa: list[str]  # learned taxa left without examples, now gone
    learned_total: int


def shown(text: str, limit: int = 60) -> str:
    """`text` quoted for an error message, cut short: a client's 100,000-character input must
    not come back in the status details (they travel in a size-limited trailer)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def check_source(source: str) -> None:
    """InvalidInput unless `source` fits MAX_SOURCE_BYTES of UTF-8."""
    size = len(source.encode())
    if size > MAX_SOURCE_BYTES:
        raise InvalidInput(f"source is {size} bytes of UTF-8; at most {MAX_SOURCE_BYTES}")


def exemplar_ids(ids: Sequence[str]) -> list[str]:
    """Forget's exemplar ids, lower-cased and de-duplicated (InvalidInput for a bad one)."""
    if len(ids) > MAX_FORGET_IDS:
        raise InvalidInput(f"at most {MAX_FORGET_IDS} exemplar ids per Forget; split it")
    out: dict[str, None] = {}
    for raw in ids:
        i = raw.strip().lower()
        if not _EXEMPLAR_ID.match(i):
            raise InvalidInput(
                f"exemplar id {shown(raw)} is not an image's SHA-256 content hash (64 hex digits)"
            )
        out[i] = None
    return list(out)


def _in_order_sum(vectors: Iterable[np.ndarray]) -> np.ndarray:
    """Sum of vectors added one by one, as Learn adds them: a taxon's sum after a Forget is
    bit for bit the sum it would have had without the forgotten examples."""
    it = iter(vectors)
    first = next(it)
    total = np.zeros_like(first) + first
    for v in it:
        total = total + v
    return total


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
        # Learned taxon -> its examples' embeddings, in learning order (Forget takes one out).
        self._members: dict[str, dict[str, np.ndarray]] = {}
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
    async def index_exemplars(
        self, items: Sequence[tuple[bytes, str, str]], client: str = ""
    ) -> IndexReport:
        """Embeds labelled images through Triton and upserts them (id = content hash), each
        recording `client` (who indexed it)."""
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
                self._point(img.content_hash, emb[j], label, source, client)
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
        records = await asyncio.to_thread(lambda: list(journal.records()))
        examples = still_learned(records)  # forgotten examples are not learned again
        await self._repeat_forgets(forgotten_ids(records))
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

    async def _repeat_forgets(self, ids: list[str]) -> None:
        """Sends the journal's forgets to tiny again: a crash between the journal and tiny
        (never acknowledged) must not leave tiny holding what the router forgot."""
        if not ids:
            return
        plane = self.plane
        repaired = 0
        try:
            for i in range(0, len(ids), FORGET_BATCH):
                n, _, _ = await plane.tiny.forget(
                    ids[i : i + FORGET_BATCH], "", plane.model_set.version
                )
                repaired += n
        except FieldlensError as exc:
            logger.warning("could not repeat %d forgets to tiny: %s", len(ids), exc)
        if repaired:
            logger.warning("tiny still held %d forgotten examples; forgotten now", repaired)
            await plane.bump({ALL_CATEGORIES})

    def _resolve_label(
        self, item: LearnItem, pending: dict[str, NewTaxonSpec]
    ) -> tuple[str, NewTaxonSpec | None]:
        """(leaf id, creating spec); `pending` holds taxa that earlier items of the call create.
        Also checks the input rules (name, source); InvalidInput for a broken one."""
        taxonomy = self.plane.model_set.taxonomy
        if bool(item.taxon_id) == bool(item.new_name):
            raise InvalidInput("give either an existing taxon id or a new taxon (name and parent)")
        check_source(item.source)
        if item.taxon_id in pending:
            return item.taxon_id, pending[item.taxon_id]
        if item.taxon_id:
            if len(item.taxon_id) > MAX_ID_CHARS or item.taxon_id not in taxonomy:
                raise InvalidInput(f"unknown taxon {shown(item.taxon_id)}")
            if taxonomy.children(item.taxon_id):
                raise InvalidInput(
                    f"taxon {item.taxon_id!r} is not a leaf; learn a new taxon under it instead"
                )
            return item.taxon_id, self._spec_of(item.taxon_id)
        if len(item.new_parent) > MAX_ID_CHARS:
            raise InvalidInput(f"unknown parent taxon {shown(item.new_parent)}")
        try:
            name = check_taxon_name(item.new_name)
            tid = learned_taxon_id(name)
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
        spec = pending.setdefault(tid, NewTaxonSpec(tid, name, item.new_parent))
        return tid, spec

    def _spec_of(self, taxon_id: str) -> NewTaxonSpec | None:
        """The creating spec of a learned taxon (sent along so any replica can create it)."""
        if not taxon_id.startswith(LEARNED_PREFIX):
            return None
        t = self.plane.model_set.taxonomy.get(taxon_id)
        return NewTaxonSpec(t.id, t.name, t.parent or "")

    def _exemplar(self, e: LearnedExample) -> Exemplar:
        return self._point(e.id, e.vector, e.taxon_id, e.source or "learn", e.client)

    def _point(
        self, exemplar_id: str, vector: np.ndarray, label: str, source: str, client: str = ""
    ) -> Exemplar:
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
            client=client,
        )

    def _apply_locally(self, e: LearnedExample, rebuild: bool = True) -> None:
        self.plane.adopt_taxon(e.new_taxon)
        previous = self._learned.get(e.id)
        self._learned[e.id] = e.taxon_id
        if previous == e.taxon_id or len(e.vector) == 0:
            return
        # Examples of learned taxa shape their imprinted rows (a relabel, which only journals
        # written before the input rules hold, moves the example).
        if previous is not None:
            self._drop_member(previous, e.id)
        if e.taxon_id.startswith(LEARNED_PREFIX):
            self._members.setdefault(e.taxon_id, {})[e.id] = e.vector
            total, n = self._taxon_sums.get(e.taxon_id, (np.zeros_like(e.vector), 0))
            self._taxon_sums[e.taxon_id] = (total + e.vector, n + 1)
        if rebuild:
            self._rebuild_imprints()

    def _drop_member(self, taxon: str, example_id: str) -> None:
        """Takes an example out of its learned taxon's imprint (its sum is added up again)."""
        members = self._members.get(taxon)
        if members is None or members.pop(example_id, None) is None:
            return
        if members:
            self._taxon_sums[taxon] = (_in_order_sum(members.values()), len(members))
        else:
            del self._members[taxon]
            self._taxon_sums.pop(taxon, None)

    def _rebuild_imprints(self) -> None:
        self.plane.set_imprints(
            self._taxon_sums, {t: list(m.values()) for t, m in self._members.items()}
        )

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
        todo: list[tuple[int, DecodedImage, str, NewTaxonSpec | None, str, str]] = []
        pending: dict[str, NewTaxonSpec] = {}
        async with self.lock:
            self._check_writable()  # a model-set switch may have begun while this waited
            claimed: dict[str, str] = {}  # photo -> label, for earlier items of this call
            for n, item in enumerate(items):
                try:
                    tid, spec = self._resolve_label(item, pending)
                    img = decode(item.image, self.plane.limits)
                except InvalidInput as exc:
                    results[n] = exc
                    continue
                known = self._learned.get(img.content_hash)
                if known == tid:
                    results[n] = LearnOutcome(
                        img.content_hash, tid, False, True, self.learned_total
                    )
                    continue
                if known is not None:
                    results[n] = self._relabel_refused(img.content_hash, known, pending, False)
                    continue
                if claimed.setdefault(img.content_hash, tid) != tid:
                    label = claimed[img.content_hash]
                    results[n] = self._relabel_refused(img.content_hash, label, pending, True)
                    continue
                todo.append((n, img, tid, spec, item.source, item.client))
            for i in range(0, len(todo), INDEX_BATCH):
                chunk = todo[i : i + INDEX_BATCH]
                try:
                    outcomes = await self._learn_batch(
                        [(img, tid, spec, src, who) for _, img, tid, spec, src, who in chunk],
                        [items[n].image for n, *_ in chunk],
                    )
                except FieldlensError as exc:
                    for n, *_ in todo[i:]:
                        results[n] = exc
                    break
                for (n, *_), outcome in zip(chunk, outcomes, strict=True):
                    results[n] = outcome
        return [r for r in results if r is not None]

    def _relabel_refused(
        self, exemplar_id: str, label: str, pending: dict[str, NewTaxonSpec], in_call: bool
    ) -> FailedPrecondition:
        """A photo has one label: another one is refused, naming the label it has."""
        taxonomy = self.plane.model_set.taxonomy
        name = (
            taxonomy.get(label).name
            if label in taxonomy
            else pending[label].name
            if label in pending
            else label
        )
        if in_call:
            return FailedPrecondition(
                f"this photo is labelled {name!r} ({label}) by an earlier item of this call; "
                "a photo is learned under one label"
            )
        return FailedPrecondition(
            f"this photo is already learned as {name!r} ({label}); to relabel it, Forget it "
            f"(exemplar {exemplar_id}), then Learn it again"
        )

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
        chunk: list[tuple[DecodedImage, str, NewTaxonSpec | None, str, str]],
        raw_images: list[bytes],
    ) -> list[LearnOutcome]:
        plane = self.plane
        store, journal, blobs = plane.store, self.journal, self.blobs
        assert store is not None and journal is not None and blobs is not None
        started = time.perf_counter()
        emb = await self._learn_embeddings(np.stack([img.rgb for img, *_ in chunk]))
        taxonomy = plane.model_set.taxonomy
        created = {spec.id for _, _, spec, *_ in chunk if spec and spec.id not in taxonomy}
        examples = [
            LearnedExample(
                img.content_hash, tid, emb[j].astype(np.float32), spec, src or "learn", who
            )
            for j, (img, tid, spec, src, who) in enumerate(chunk)
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

    # -- Forget ------------------------------------------------------------------------------
    async def forget(
        self, ids: Sequence[str], taxon_id: str = "", client: str = ""
    ) -> ForgetOutcome:
        """Forgets exemplars by id (content hash), or every example of a learned taxon.

        Writes, in order: the vector store (removed), this model set's journal (a forget
        record, the durable one), the older model sets' journals (so switching back does not
        bring it back), the tiny classifiers (which journal it too, then rebuild), then this
        plane's imprinted rows and taxonomy, the blob store (the photo's bytes go, so no
        re-index re-embeds it) and the knowledge generations. Acknowledged after all of them;
        any step may be retried: forgetting what is gone changes nothing.
        """
        if bool(ids) == bool(taxon_id):
            raise InvalidInput("give exemplar ids or a learned taxon id to forget, not both")
        if taxon_id and not taxon_id.startswith(LEARNED_PREFIX):
            raise InvalidInput(
                f"{shown(taxon_id)} is not a learned taxon: only taxa created by Learn "
                f"({LEARNED_PREFIX}...) can be forgotten; forget single exemplars by id"
            )
        if len(taxon_id) > MAX_ID_CHARS:
            raise InvalidInput(f"unknown taxon {shown(taxon_id)}")
        wanted = exemplar_ids(ids)
        self._check_writable()
        if self.plane.store is None or self.journal is None or self.blobs is None:
            raise Unavailable("forgetting needs the vector store, the journal and the blob store")
        async with self.lock:
            self._check_writable()
            return await self._forget(wanted, taxon_id, client)

    async def _forget(self, wanted: list[str], taxon_id: str, client: str) -> ForgetOutcome:
        plane = self.plane
        store, journal, blobs = plane.store, self.journal, self.blobs
        assert store is not None and journal is not None and blobs is not None
        if taxon_id:
            wanted = [i for i, t in self._learned.items() if t == taxon_id]
        labels = {i: self._learned[i] for i in wanted if i in self._learned}
        taxonomy = plane.model_set.taxonomy
        # Cached answers that may show them: their groups', read while their taxa still exist.
        touched = {taxonomy.broad_of(t) or "" for t in labels.values() if t in taxonomy}
        removed: list[StoredExemplar] = []
        if wanted:
            async with self._store_lock:
                removed = await asyncio.to_thread(store.delete, wanted)
                await asyncio.to_thread(store.flush)
        gone = list(dict.fromkeys([*labels, *(r.id for r in removed)]))
        if gone:
            record = ForgetRecord(tuple(gone), taxon_id, client)
            await asyncio.to_thread(journal.append, [record])
            await asyncio.to_thread(self._journal_elsewhere, record)
        version = plane.model_set.version
        tiny_forgotten, tiny_removed, _ = await plane.tiny.forget(wanted, taxon_id, version)
        for i, t in labels.items():
            del self._learned[i]
            self._drop_member(t, i)
        self._rebuild_imprints()
        left = set(self._learned.values())
        candidates = {*labels.values(), *tiny_removed, *([taxon_id] if taxon_id else [])}
        dropped = sorted(
            t
            for t in candidates
            if t.startswith(LEARNED_PREFIX) and t not in left and t in plane.model_set.taxonomy
        )
        plane.drop_taxa(dropped)
        # Every photo asked for by id, found or not: a retry after a crash finds nothing left
        # to remove but the bytes, which a re-index from an older collection would re-embed.
        photos = gone if taxon_id else wanted
        await asyncio.to_thread(lambda: [blobs.delete(i) for i in photos])
        touched |= {r.broad for r in removed if r.broad}
        # A learned taxon's examples shape P(broad) of every photo (imprinted rows); tiny may
        # also have forgotten examples learned through another replica, group unknown.
        if (
            dropped
            or any(t.startswith(LEARNED_PREFIX) for t in labels.values())
            or tiny_forgotten > len(labels)
        ):
            touched.add(ALL_CATEGORIES)
        touched.discard("")
        if touched:
            await plane.bump(touched)
        logger.info(
            "forgot %d exemplars (%d learned; taxa removed: %s) for %s",
            len(gone),
            len(labels),
            ", ".join(dropped) or "none",
            client or "an unnamed client",
        )
        return ForgetOutcome(
            forgotten=max(len(gone), tiny_forgotten),
            learned_forgotten=max(len(labels), tiny_forgotten),
            not_found=[] if taxon_id else [i for i in wanted if i not in set(gone)],
            removed_taxa=dropped,
            learned_total=self.learned_total,
        )

    def _journal_elsewhere(self, record: ForgetRecord) -> None:
        """Appends a forget record to the older model sets' journals too, so that switching
        back to one of them (its own journal is replayed) does not learn the photo again."""
        assert self.journal is not None
        for other in self.journal.others():
            try:
                other.append([record])
            except OSError as exc:  # the current journal holds it; a switch-back may not
                logger.warning("could not record a forget in %s: %s", other.path, exc)

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
                    self._point(ex.id, emb[j], ex.label, ex.source, ex.client)
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
        # Forget records count across journals: forgotten under a later set stays forgotten.
        latest = await asyncio.to_thread(still_learned_across, journals)
        todo = [e for e in latest.values() if e.id in blobs]
        done = relearned = 0
        for start in range(0, len(todo), RELEARN_BATCH):
            items = []
            for e in todo[start : start + RELEARN_BATCH]:
                data = await asyncio.to_thread(blobs.get, e.id)
                # Journals written before the input rules may hold longer sources.
                source = e.source.encode()[:MAX_SOURCE_BYTES].decode(errors="ignore")
                if e.new_taxon is not None:
                    t = e.new_taxon
                    items.append(LearnItem(data, "", t.name, t.parent, source, e.client))
                else:
                    items.append(LearnItem(data, e.taxon_id, source=source, client=e.client))
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
