"""RouterDataPlane and its learner with small in-process backends: the result cache (write-back,
staleness, degraded answers, generation bumps Redis missed), stage time budgets, and writes
refused during a model-set switch or a re-index."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from small_tree import CLASSES

from fieldlens.backends.blob_store import FolderBlobStore
from fieldlens.backends.cache import ResultCache, generations_key
from fieldlens.backends.vector_store import (
    Exemplar,
    Neighbour,
    QdrantClientVectorStore,
    StoredExemplar,
    VectorStore,
    open_vector_store,
)
from fieldlens.common.errors import Unavailable
from fieldlens.common.knowledge import ForgetRecord, KnowledgeJournal, LearnedExample
from fieldlens.common.model_set import ModelSet
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.common.telemetry import Metrics, get_metrics
from fieldlens.router.clients import CategoriesItem, CategoryAnswer
from fieldlens.router.dataplane import (
    ALL_CATEGORIES,
    CACHE_UNAVAILABLE,
    CLASSIFIER_UNAVAILABLE,
    NEIGHBOURS_UNAVAILABLE,
    STAGE_TIMEOUT,
    Classification,
    ClassifyOptions,
    RouterDataPlane,
)
from fieldlens.router.imaging import ImageLimits
from fieldlens.router.learning import Learner, LearnItem
from fieldlens.router.servicer import codec

pytestmark = pytest.mark.timeout(60)

_Store = TypeVar("_Store", bound=QdrantClientVectorStore)

DIM = 8
SIZE = 8  # model input: 8 x 8 RGB
VERSION = "ms-test"
OPTIONS = ClassifyOptions(top_k=3, neighbours=2, threshold=0.5)
# Long enough that a loaded machine never runs a healthy stage past it. The budget tests stall
# one stage until the test lets it go, under a budget the other (healthy) stages still meet.
ROOMY_BUDGET_S = 30.0
SHORT_BUDGET_S = 0.25
# The broad net is sure of broad/a: it alone is dispatched (the others are below 2%).
BROAD_LOG_PROBS = np.array([0.0, -6.0, -6.0], dtype=np.float32)
EMBEDDING = np.eye(DIM, dtype=np.float32)[0]
# What tiny says, P(taxon | category): the answer is a1 (0.995 x 0.9).
TINY_SCORES = {
    "broad/a": {"node/a/x": 0.95, "node/a/y": 0.05, "a1": 0.9, "a2": 0.05, "a3": 0.05},
    "broad/b": {"b1": 0.5, "b2": 0.5},
    "broad/c": {"c1": 1.0},
}


# -- backends -------------------------------------------------------------------------------------
class MemoryCache:
    """A `ResultCache` in dicts that keeps the real one's failure contract: while `down`, every
    call raises Unavailable (as RedisCache does with Redis gone); given a `stalled` event,
    look-ups wait until it is set (Redis hung)."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.generations: dict[str, dict[str, int]] = {}
        self.down = False
        self.stalled: asyncio.Event | None = None
        self.writes: list[str] = []  # keys, in order
        self.bumps: list[str] = []  # categories, in order

    def _admit(self, op: str) -> None:
        if self.down:
            raise Unavailable(f"cache memory {op} failed: ConnectionError('Connection refused')")

    async def get(self, key: str) -> bytes | None:
        self._admit("get")
        return self.entries.get(key)

    async def get_with_generations(
        self, key: str, generations: str
    ) -> tuple[bytes | None, dict[str, int]]:
        self._admit("get")
        if self.stalled is not None:
            await self.stalled.wait()
        return self.entries.get(key), dict(self.generations.get(generations, {}))

    async def bump_generation(self, generations: str, category: str) -> int:
        self._admit("bump")
        seen = self.generations.setdefault(generations, {})
        seen[category] = seen.get(category, 0) + 1
        self.bumps.append(category)
        return seen[category]

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._admit("set")
        self.entries[key] = value
        self.writes.append(key)

    async def ping(self) -> bool:
        return not self.down

    async def close(self) -> None:
        return None


class FakeTriton:
    """The broad net: every image is broad/a, embedded at EMBEDDING."""

    def __init__(self) -> None:
        self.images = 0

    async def infer_broad(self, batch: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray]:
        assert batch.shape[1:] == (SIZE, SIZE, 3), batch.shape
        self.images += len(batch)
        n = len(batch)
        return np.tile(BROAD_LOG_PROBS, (n, 1)), np.tile(EMBEDDING, (n, 1))


class FakeClassifier:
    """The tiny service: TINY_SCORES for every image; raises `failure` while it is set."""

    def __init__(self) -> None:
        self.failure: Unavailable | None = None
        self.calls = 0
        self.learned: list[LearnedExample] = []

    async def classify_batch(
        self, items: list[CategoriesItem], model_set_version: str
    ) -> list[dict[str, CategoryAnswer]]:
        assert model_set_version == VERSION
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        return [
            {c: CategoryAnswer(TINY_SCORES[c], "tiny", {}, 0.0) for c in item.categories}
            for item in items
        ]

    async def learned_taxa(self, model_set_version: str = "") -> list[object]:
        return []

    async def learn(
        self, examples: list[LearnedExample], model_set_version: str
    ) -> tuple[int, int, int]:
        self.learned += examples
        return len(examples), 0, len(self.learned)

    async def forget(
        self, ids: list[str], taxon_id: str, model_set_version: str
    ) -> tuple[int, list[str], int]:
        self.learned = [e for e in self.learned if e.id not in ids]
        return 0, [], len(self.learned)


class FailingStore(QdrantClientVectorStore):
    """A vector store whose server is gone: searches raise Unavailable."""

    def search_labels(
        self, vector: np.ndarray, labels: Sequence[str], k: int
    ) -> list[list[Neighbour]]:
        raise Unavailable("qdrant search on exemplars_test failed: [Errno 111] Connection refused")


class StalledStore(QdrantClientVectorStore):
    """A vector store whose searches wait until `release` is set (a server that hangs)."""

    def __init__(self, collection: str, **where: str) -> None:
        super().__init__(collection, **where)
        self.release = threading.Event()

    def search_labels(
        self, vector: np.ndarray, labels: Sequence[str], k: int
    ) -> list[list[Neighbour]]:
        self.release.wait()
        return super().search_labels(vector, labels, k)


class StalledSource(QdrantClientVectorStore):
    """An older collection whose scroll waits for `release` once `started` is set."""

    def __init__(self, collection: str, **where: str) -> None:
        super().__init__(collection, **where)
        self.started = threading.Event()
        self.release = threading.Event()

    def scroll(self, batch: int = 256) -> Iterator[list[StoredExemplar]]:
        self.started.set()
        self.release.wait()
        yield from super().scroll(batch)


def _store(kind: type[_Store]) -> _Store:
    """An in-process qdrant-client store of `kind` holding one exemplar of a1."""
    store = kind("exemplars_test", location=":memory:")
    store.ensure_collection(DIM)
    store.upsert(
        [
            Exemplar(
                id=hashlib.sha256(b"a1 exemplar").hexdigest(),
                vector=EMBEDDING,
                label="a1",
                broad="broad/a",
                path=["root", "domain/thing", "broad/a", "node/a/x", "a1"],
                source="unit",
                embedding_version="emb-test",
            )
        ]
    )
    return store


@dataclass
class Rig:
    plane: RouterDataPlane
    cache: MemoryCache
    triton: FakeTriton
    tiny: FakeClassifier
    metrics: Metrics
    image: bytes  # the photo a request sends unless it names another

    async def classify(
        self, image: bytes | None = None, options: ClassifyOptions = OPTIONS
    ) -> Classification:
        """A Classify of `image` (the rig's photo unless given), its write-back done."""
        answer = await self.plane.classify(image or self.image, options)
        await _drain()
        return answer

    def degradations(self, kind: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "fieldlens_degradations_total", {"kind": kind.lower()}
        )
        return value or 0.0


def _rig(store: VectorStore | None = None, stage_timeout_s: float = ROOMY_BUDGET_S) -> Rig:
    taxonomy = Taxonomy.from_classes(CLASSES)
    model_set = ModelSet(
        version=VERSION,
        embedding_version="emb-test",
        taxonomy=taxonomy,
        routing={b: "tiny" for b in taxonomy.broad_ids},
        specialists={},
        image_size=SIZE,
        embedding_dim=DIM,
        manifest={},
    )
    cache, triton, tiny = MemoryCache(), FakeTriton(), FakeClassifier()
    metrics = get_metrics(CollectorRegistry())
    plane: RouterDataPlane

    def current_taxonomy() -> Taxonomy:
        return plane.model_set.taxonomy

    plane = RouterDataPlane(
        model_set,
        triton,  # type: ignore[arg-type]
        tiny,  # type: ignore[arg-type]  # never called: every group routes to tiny
        tiny,  # type: ignore[arg-type]
        store if store is not None else _store(QdrantClientVectorStore),
        cache,
        codec(current_taxonomy),
        ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20, size=SIZE),
        OPTIONS,
        dispatch_top=2,
        cache_ttl_s=60.0,
        stage_timeout_s=stage_timeout_s,
        metrics=metrics,
    )
    return Rig(plane, cache, triton, tiny, metrics, _png(0))


def _png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


async def _drain() -> None:
    """Lets the background work of a request (the cache write-back) finish."""
    await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))


def _kinds(answer: Classification) -> list[str]:
    return [d.kind for d in answer.degradations]


def test_the_fake_cache_is_a_result_cache() -> None:
    assert isinstance(MemoryCache(), ResultCache)


# -- evidence ------------------------------------------------------------------------------------
def test_every_suggestion_gets_the_nearest_exemplars_of_its_own_taxon() -> None:
    """Evidence is searched per suggested taxon: a2's only exemplar, pointing away from the
    photo, is found although 70 exemplars of a3 lie nearer (a shared pool of the photo's
    nearest neighbours would hold none of a2's), and a3 shows its two nearest of 70."""

    def exemplar(name: str, label: str, vector: np.ndarray) -> Exemplar:
        return Exemplar(
            id=hashlib.sha256(name.encode()).hexdigest(),
            vector=vector,
            label=label,
            broad="broad/a",
            path=["root", "domain/thing", "broad/a", "node/a/y", label],
            source="unit",
            embedding_version="emb-test",
        )

    rng = np.random.default_rng(0)
    near = EMBEDDING + rng.normal(scale=0.1, size=(70, DIM)).astype(np.float32)
    a3 = [exemplar(f"a3 {i}", "a3", v) for i, v in enumerate(near)]
    store = _store(QdrantClientVectorStore)
    store.upsert([*a3, exemplar("a2 far", "a2", -EMBEDDING)])
    sims = near @ EMBEDDING / np.linalg.norm(near, axis=1)
    nearest_a3 = [a3[i].id for i in np.argsort(-sims)[:2]]

    async def body() -> None:
        answer = await _rig(store).classify()
        got = {s.taxon_id: [(n.label, n.id) for n in s.exemplars] for s in answer.suggestions}
        assert set(got) == {"a1", "a2", "a3"}
        assert [label for label, _ in got["a1"]] == ["a1"]
        assert got["a2"] == [("a2", hashlib.sha256(b"a2 far").hexdigest())]
        assert got["a3"] == [("a3", i) for i in nearest_a3]

    asyncio.run(body())


# -- the result cache -----------------------------------------------------------------------------
def test_a_full_answer_is_written_back_and_the_next_identical_request_is_served_from_it() -> None:
    async def body() -> None:
        rig = _rig()
        first = await rig.classify()
        assert (first.cached, first.degradations, first.answer_id) == (False, [], "a1")
        assert [s.exemplars[0].label for s in first.suggestions[:1]] == ["a1"]
        assert len(rig.cache.writes) == 1

        again = await rig.classify()
        assert again.cached
        assert (rig.triton.images, rig.tiny.calls) == (1, 1)  # no backend asked twice
        assert again.answer_id == first.answer_id
        assert [s.taxon_id for s in again.suggestions] == [s.taxon_id for s in first.suggestions]
        assert [t for t, _ in again.timings] == ["cache_get", "total"]

        # Another photo, or the same one with the cache skipped, is computed afresh.
        assert not (await rig.classify(_png(1))).cached
        skipped = await rig.classify(options=ClassifyOptions(3, 2, 0.5, skip_cache=True))
        assert not skipped.cached and rig.triton.images == 3

    asyncio.run(body())


@pytest.mark.parametrize("bumped", ["broad/a", ALL_CATEGORIES])
def test_a_cached_answer_is_not_served_once_a_category_it_used_learned_something(
    bumped: str,
) -> None:
    async def body() -> None:
        rig = _rig()
        await rig.classify()
        assert (await rig.classify()).cached
        # Another replica learned something: the generation moves in Redis, not through us.
        await rig.cache.bump_generation(generations_key(VERSION), bumped)

        fresh = await rig.classify()
        assert not fresh.cached and rig.triton.images == 2
        # The fresh answer is cached under the new generation.
        assert (await rig.classify()).cached

    asyncio.run(body())


def test_a_category_the_answer_did_not_use_leaves_it_cached() -> None:
    async def body() -> None:
        rig = _rig()
        first = await rig.classify()
        assert [d.category for d in first.dispatch] == ["broad/a"]
        await rig.cache.bump_generation(generations_key(VERSION), "broad/b")
        assert (await rig.classify()).cached

    asyncio.run(body())


def test_an_answer_without_a_classifier_is_degraded_and_not_cached() -> None:
    async def body() -> None:
        rig = _rig()
        rig.tiny.failure = Unavailable("classifier tiny:50052: UNAVAILABLE connection refused")
        degraded = await rig.classify()
        assert _kinds(degraded) == [CLASSIFIER_UNAVAILABLE]
        assert degraded.degradations[0].category == "broad/a"
        assert rig.cache.writes == [] and rig.cache.entries == {}
        assert rig.degradations(CLASSIFIER_UNAVAILABLE) == 1

        # Once tiny is back the answer is computed, whole, and only then cached.
        rig.tiny.failure = None
        whole = await rig.classify()
        assert not whole.cached and whole.degradations == [] and whole.answer_id == "a1"
        assert len(rig.cache.writes) == 1

    asyncio.run(body())


def test_an_answer_without_neighbours_is_degraded_and_not_cached() -> None:
    async def body() -> None:
        rig = _rig(_store(FailingStore))
        degraded = await rig.classify()
        assert _kinds(degraded) == [NEIGHBOURS_UNAVAILABLE]
        assert "Connection refused" in degraded.degradations[0].message
        assert degraded.answer_id == "a1" and degraded.suggestions[0].exemplars == ()
        assert rig.cache.writes == []
        assert not (await rig.classify()).cached

    asyncio.run(body())


def test_with_the_cache_down_the_answer_is_computed_and_flagged_cache_unavailable() -> None:
    async def body() -> None:
        rig = _rig()
        rig.cache.down = True
        answer = await rig.classify()
        assert _kinds(answer) == [CACHE_UNAVAILABLE]
        assert answer.answer_id == "a1" and not answer.cached
        assert "Connection refused" in answer.degradations[0].message
        assert rig.degradations(CACHE_UNAVAILABLE) == 1

        rig.cache.down = False
        back = await rig.classify()
        assert back.degradations == [] and len(rig.cache.writes) == 1

    asyncio.run(body())


def test_a_bump_made_while_the_cache_is_down_is_retried_before_the_cache_is_read() -> None:
    async def body() -> None:
        rig = _rig()
        await rig.classify()
        assert (await rig.classify()).cached

        rig.cache.down = True
        await rig.plane.bump({"broad/a"})  # Redis is down: never raises, remembered
        assert rig.cache.bumps == []
        rig.cache.down = False

        # The bump lands first; the stale entry is not served.
        fresh = await rig.classify()
        assert rig.cache.bumps == ["broad/a"]
        assert not fresh.cached and rig.triton.images == 2
        # Landed once: the answer cached after it is served again, with no second bump.
        assert (await rig.classify()).cached
        assert rig.cache.bumps == ["broad/a"]

    asyncio.run(body())


def test_answers_while_a_bump_waits_for_redis_say_the_cache_was_not_read() -> None:
    async def body() -> None:
        rig = _rig()
        await rig.classify()
        rig.cache.down = True
        await rig.plane.bump({"broad/a"})  # remembered; the cache is not read until it lands

        answer = await rig.classify()
        assert not answer.cached and rig.triton.images == 2
        assert _kinds(answer) == [CACHE_UNAVAILABLE]
        assert "generation bump" in answer.degradations[0].message
        assert rig.degradations(CACHE_UNAVAILABLE) == 1

    asyncio.run(body())


# -- stage time budgets ---------------------------------------------------------------------------
def test_a_neighbour_search_past_its_budget_is_a_stage_timeout() -> None:
    async def body() -> None:
        store = _store(StalledStore)
        rig = _rig(store, stage_timeout_s=SHORT_BUDGET_S)
        try:
            answer = await rig.plane.classify(rig.image, OPTIONS)
        finally:
            store.release.set()
        await _drain()
        assert _kinds(answer) == [STAGE_TIMEOUT]
        assert answer.degradations[0].message == "neighbours ran past its 250 ms budget"
        assert rig.degradations(STAGE_TIMEOUT) == 1
        assert rig.degradations(NEIGHBOURS_UNAVAILABLE) == 0
        # The rest of the answer is whole; being degraded, it is not cached.
        assert answer.answer_id == "a1" and answer.suggestions[0].exemplars == ()
        assert rig.cache.writes == []

    asyncio.run(body())


def test_a_cache_look_up_past_its_budget_is_a_stage_timeout() -> None:
    async def body() -> None:
        rig = _rig(stage_timeout_s=SHORT_BUDGET_S)
        rig.cache.stalled = asyncio.Event()
        answer = await rig.classify()
        assert _kinds(answer) == [STAGE_TIMEOUT]
        assert answer.degradations[0].message == "cache_get ran past its 250 ms budget"
        assert answer.answer_id == "a1" and not answer.cached
        assert rig.cache.writes == []
        assert rig.degradations(CACHE_UNAVAILABLE) == 0

    asyncio.run(body())


# -- writes refused during a switch or a re-index -------------------------------------------------
def _learner(rig: Rig, tmp_path: Path) -> Learner:
    journal = KnowledgeJournal(tmp_path / "router.jsonl", VERSION, "emb-test")
    learner = Learner(rig.plane, journal, FolderBlobStore(tmp_path / "blobs"))
    rig.plane.learner = learner
    return learner


def test_writes_are_refused_while_the_model_set_switches_and_accepted_after(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        rig = _rig()
        learner = _learner(rig, tmp_path)
        store = rig.plane.store
        assert store is not None and learner.journal is not None
        photo = _png(7)
        learner.writes_paused = "switching to model set ms-next"
        refused = "switching to model set ms-next; retry when it is done"
        with pytest.raises(Unavailable, match=refused):
            await learner.learn([LearnItem(photo, taxon_id="a2")])
        with pytest.raises(Unavailable, match=refused):
            await learner.index_exemplars([(photo, "a2", "unit")])
        with pytest.raises(Unavailable, match=refused):
            await learner.forget([hashlib.sha256(photo).hexdigest()])
        # Nothing of the refused writes reached a backend.
        assert list(learner.journal.records()) == []
        assert (store.count(), rig.tiny.learned, rig.cache.bumps) == (1, [], [])

        learner.writes_paused = None
        (outcome,) = await learner.learn([LearnItem(photo, taxon_id="a2")])
        assert not isinstance(outcome, Exception) and outcome.taxon_id == "a2"
        assert len(list(learner.journal.records())) == 1
        assert (store.count(), len(rig.tiny.learned), rig.cache.bumps) == (2, 1, ["broad/a"])

    asyncio.run(body())


def test_exemplars_record_who_wrote_them_and_keep_it_through_a_reindex(tmp_path: Path) -> None:
    async def body() -> None:
        rig = _rig()
        learner = _learner(rig, tmp_path)
        store = rig.plane.store
        assert store is not None and learner.journal is not None
        learned, indexed = _png(11), _png(12)
        indexed_id = hashlib.sha256(indexed).hexdigest()
        (outcome,) = await learner.learn([LearnItem(learned, taxon_id="a2", client="alice")])
        assert not isinstance(outcome, Exception)
        report = await learner.index_exemplars([(indexed, "a3", "gallery")], client="bob")
        assert report.indexed == 1
        clients = {e.id: e.client for page in store.scroll() for e in page}
        assert clients[outcome.exemplar_id] == "alice" and clients[indexed_id] == "bob"
        (record,) = learner.journal.records()
        assert isinstance(record, LearnedExample) and record.client == "alice"

        await learner.forget([outcome.exemplar_id], client="ops")
        assert list(learner.journal.records())[-1] == ForgetRecord(
            (outcome.exemplar_id,), "", "ops"
        )
        staging = open_vector_store(":memory:", "exemplars_staging", DIM)
        counts = await learner.reindex([store], staging, "exemplars_emb2")
        assert counts["indexed"] == 1
        assert {e.id: e.client for page in staging.scroll() for e in page} == {indexed_id: "bob"}

    asyncio.run(body())


def test_writes_are_refused_while_a_reindex_runs_and_accepted_after(tmp_path: Path) -> None:
    async def body() -> None:
        rig = _rig()
        learner = _learner(rig, tmp_path)
        source = _store(StalledSource)
        staging = open_vector_store(":memory:", "exemplars_staging", DIM)
        reindex = asyncio.ensure_future(learner.reindex([source], staging, "exemplars_emb2"))
        try:
            await asyncio.to_thread(source.started.wait, 10)
            assert learner.writes_blocked == "re-indexing exemplars into exemplars_emb2"
            with pytest.raises(Unavailable, match="re-indexing exemplars into exemplars_emb2"):
                await learner.learn([LearnItem(_png(8), taxon_id="a2")])
            assert rig.tiny.learned == []
        finally:
            source.release.set()
        counts = await reindex
        assert counts["seen"] == 1 and counts["no_blob"] == 1  # its photo was never kept
        assert learner.writes_blocked == "" and rig.plane.store is staging
        (outcome,) = await learner.learn([LearnItem(_png(8), taxon_id="a2")])
        assert not isinstance(outcome, Exception) and staging.count() == 1

    asyncio.run(body())
