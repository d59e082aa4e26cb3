"""Qdrant Edge store on disk, and its congruence with qdrant-client's reference local mode."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fieldlens.backends.vector_store import (
    EdgeVectorStore,
    Exemplar,
    QdrantClientVectorStore,
    VectorStore,
    _neighbour,
    list_collections,
    open_vector_store,
)
from fieldlens.common.errors import FailedPrecondition

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DIM = 256
N_GROUPS = 20
COLLECTION = "exemplars_emb-test-v1"


def _hash(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def _dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[Exemplar]]:
    """Clustered unit vectors (one cluster per broad group), like real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_GROUPS, DIM))
    groups = rng.integers(0, N_GROUPS, size=n)
    vectors = centres[groups] + rng.normal(scale=0.8, size=(n, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    exemplars = [
        Exemplar(
            id=_hash(i),
            vector=vectors[i],
            label=f"n{int(groups[i]):02d}{i % 7:06d}",
            broad=f"broad/g{int(groups[i])}",
            path=["entity", f"broad/g{int(groups[i])}", f"n{int(groups[i]):02d}{i % 7:06d}"],
            source="test",
            embedding_version="emb-test-v1",
        )
        for i in range(n)
    ]
    return vectors, exemplars


def _queries(vectors: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = vectors[rng.choice(len(vectors), size=n, replace=False)]
    noisy = picked + rng.normal(scale=0.05, size=picked.shape)
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def edge_store(tmp_path: Path) -> VectorStore:
    store = open_vector_store(str(tmp_path / "qdrant"), COLLECTION, DIM)
    assert isinstance(store, EdgeVectorStore)
    return store


def test_upsert_count_self_query_and_filter(edge_store: VectorStore) -> None:
    vectors, exemplars = _dataset(300)
    with edge_store:
        edge_store.upsert(exemplars)
        assert edge_store.count() == 300

        hit = edge_store.search(vectors[7], k=1)[0]
        assert hit.id == exemplars[7].id
        assert hit.similarity == pytest.approx(1.0, abs=1e-4)
        assert (hit.label, hit.broad, hit.path) == (
            exemplars[7].label,
            exemplars[7].broad,
            exemplars[7].path,
        )

        allowed = ["broad/g1", "broad/g2", "broad/g3"]
        for query in _queries(vectors, 10):
            hits = edge_store.search(query, k=10, broad_in=allowed)
            assert hits and all(h.broad in allowed for h in hits)
            assert [h.similarity for h in hits] == sorted(
                (h.similarity for h in hits), reverse=True
            )
        assert edge_store.search(vectors[0], k=5, broad_in=[]) == []
        assert edge_store.search(vectors[0], k=5, broad_in=["broad/none"]) == []


def test_upsert_is_idempotent_by_id(edge_store: VectorStore) -> None:
    vectors, exemplars = _dataset(50)
    with edge_store:
        edge_store.upsert(exemplars)
        edge_store.upsert(exemplars[:10])
        relabelled = Exemplar(
            id=exemplars[3].id,
            vector=exemplars[3].vector,
            label="n99999999",
            broad=exemplars[3].broad,
            path=["entity", exemplars[3].broad, "n99999999"],
        )
        edge_store.upsert([relabelled])
        assert edge_store.count() == 50
        assert edge_store.search(vectors[3], k=1)[0].label == "n99999999"


def test_survives_close_and_reopen(tmp_path: Path) -> None:
    root = str(tmp_path / "qdrant")
    vectors, exemplars = _dataset(120)
    store = open_vector_store(root, COLLECTION, DIM)
    store.upsert(exemplars[:100])
    store.flush()
    store.upsert(exemplars[100:])  # only in the write-ahead log until close() flushes
    store.close()

    reopened = open_vector_store(root, COLLECTION, DIM)
    with reopened:
        assert reopened.count() == 120
        assert reopened.search(vectors[110], k=1)[0].id == exemplars[110].id
    with pytest.raises(FailedPrecondition, match="vector size|dim"):
        open_vector_store(root, COLLECTION, DIM // 2)


def test_one_owner_per_shard(edge_store: VectorStore, tmp_path: Path) -> None:
    with edge_store, pytest.raises(FailedPrecondition, match="owned by another"):
        open_vector_store(str(tmp_path / "qdrant"), COLLECTION, DIM)


def _top_ids(
    store: VectorStore, queries: np.ndarray, broad_in: list[str] | None
) -> list[list[str]]:
    return [[h.id for h in store.search(q, k=5, broad_in=broad_in)] for q in queries]


def test_edge_and_qdrant_client_agree(tmp_path: Path) -> None:
    vectors, exemplars = _dataset(2000, seed=3)
    queries = np.concatenate([_queries(vectors, 10, seed=4), vectors[:10]])
    # A small indexing threshold makes optimize() build a real HNSW graph over 2000 points.
    edge = EdgeVectorStore(tmp_path / "edge", COLLECTION, indexing_threshold_kb=200)
    reference = QdrantClientVectorStore(COLLECTION, location=":memory:")
    with edge, reference:
        for store in (edge, reference):
            store.ensure_collection(DIM)
            for start in range(0, len(exemplars), 500):
                store.upsert(exemplars[start : start + 500])
        edge.optimize()
        assert edge.count() == reference.count() == 2000

        for broad_in in (None, ["broad/g2", "broad/g7", "broad/g11"]):
            got, want = _top_ids(edge, queries, broad_in), _top_ids(reference, queries, broad_in)
            assert all(len(ids) == 5 for ids in want)
            agree = sum(len(set(g) & set(w)) for g, w in zip(got, want, strict=True))
            assert agree >= 0.95 * 5 * len(queries), (broad_in, agree)
            assert sum(g[0] == w[0] for g, w in zip(got, want, strict=True)) >= len(queries) - 1

        edge_hits = edge.search(queries[0], k=5)
        ref_hits = {h.id: h.similarity for h in reference.search(queries[0], k=5)}
        for hit in edge_hits:
            if hit.id in ref_hits:
                assert hit.similarity == pytest.approx(ref_hits[hit.id], abs=1e-4)


def test_vectors_of_another_embedding_version_are_never_compared(tmp_path: Path) -> None:
    """The router opens one collection per embedding version: an old-version vector is not
    even visible to a new-version query, however similar."""
    from fieldlens.router.service import collection_name

    root = str(tmp_path / "qdrant")
    vectors, points = _dataset(50)
    old = open_vector_store(root, collection_name("emb-old"), DIM)
    old.upsert(points)
    old.close()
    new = open_vector_store(root, collection_name("emb-new"), DIM)
    try:
        assert collection_name("emb-old") != collection_name("emb-new")
        assert new.count() == 0
        assert new.search(vectors[0], 5) == []
    finally:
        new.close()
    reopened = open_vector_store(root, collection_name("emb-old"), DIM)
    try:
        assert reopened.count() == 50  # still there for a re-index
        assert reopened.search(vectors[0], 1)[0].id == points[0].id
    finally:
        reopened.close()


def test_scroll_returns_every_exemplar_once(edge_store: VectorStore, tmp_path: Path) -> None:
    _, points = _dataset(300)
    edge_store.upsert(points)
    ref = open_vector_store(":memory:", COLLECTION, DIM)
    ref.upsert(points)
    for store in (edge_store, ref):
        pages = list(store.scroll(batch=64))
        seen = [e.id for page in pages for e in page]
        assert sorted(seen) == sorted(p.id for p in points), type(store).__name__
        assert max(len(p) for p in pages) <= 64
        first = next(e for page in pages for e in page if e.id == points[0].id)
        assert (first.label, first.source, first.embedding_version) == (
            points[0].label,
            "test",
            "emb-test-v1",
        )
    ref.close()


def test_edge_publish_renames_atomically_and_reopens(tmp_path: Path) -> None:
    root = str(tmp_path / "qdrant")
    vectors, points = _dataset(20)
    staging = open_vector_store(root, "exemplars_new__reindex", DIM)
    staging.upsert(points)
    staging.publish_as("exemplars_new")
    assert list_collections(root) == ["exemplars_new"]
    assert staging.count() == 20 and staging.search(vectors[3], 1)[0].id == points[3].id
    staging.close()
    with pytest.raises(FailedPrecondition):
        other = open_vector_store(root, "exemplars_other", DIM)
        try:
            other.publish_as("exemplars_new")
        finally:
            other.close()


def test_delete_agrees_between_edge_and_qdrant_client_and_lasts(tmp_path: Path) -> None:
    vectors, points = _dataset(300, seed=5)
    root = str(tmp_path / "qdrant")
    edge = open_vector_store(root, COLLECTION, DIM)
    reference = open_vector_store(":memory:", COLLECTION, DIM)
    gone = [p.id for p in points[10:20]]
    unknown = _hash(10_000)
    for store in (edge, reference):
        store.upsert(points)
        removed = store.delete([*gone, gone[0].upper(), unknown])
        assert sorted(r.id for r in removed) == sorted(gone), type(store).__name__
        by_id = {r.id: r for r in removed}
        assert (by_id[points[12].id].label, by_id[points[12].id].broad) == (
            points[12].label,
            points[12].broad,
        )
        assert store.count() == 290
        assert store.delete(gone) == []  # idempotent
        for i in (10, 15, 19):
            assert all(h.id not in gone for h in store.search(vectors[i], k=10))
    queries = _queries(vectors, 10, seed=6)
    assert _top_ids(edge, queries, None) == _top_ids(reference, queries, None)
    reference.close()
    edge.upsert(points[10:11])  # a deleted exemplar can be stored again
    edge.close()  # the deletes (and the re-upsert) survive a reopen
    reopened = open_vector_store(root, COLLECTION, DIM)
    with reopened:
        assert reopened.count() == 291
        assert reopened.search(vectors[10], k=1)[0].id == points[10].id
        assert {e.id for page in reopened.scroll(100) for e in page}.isdisjoint(gone[1:])


def test_edge_search_answers_from_memory_what_the_payloads_say(tmp_path: Path) -> None:
    """Edge searches read exemplar ids and labels from the store's own memory, not from the
    engine's payloads: the two must agree after upserts, an overwrite, a delete, and a
    reopen (when the memory is rebuilt from the shard)."""
    vectors, exemplars = _dataset(400, seed=5)
    relabelled = [
        Exemplar(e.id, e.vector, "n99999999", e.broad, [*e.path[:-1], "n99999999"], "t", "v")
        for e in exemplars[:10]
    ]
    root = str(tmp_path / "qdrant")

    def from_payloads(store: EdgeVectorStore, q: np.ndarray, groups: list[str]) -> list[tuple]:
        import qdrant_edge as qe

        request = qe.QueryRequest(
            limit=64,
            query=qe.Query.Nearest(q.tolist()),
            filter=qe.Filter(must=[qe.FieldCondition(key="broad", match=qe.MatchAny(any=groups))]),
            with_payload=True,
        )
        return [
            (n.id, n.label, n.broad, n.path, round(n.similarity, 6))
            for n in (_neighbour(h.id, h.score, h.payload) for h in store._require().query(request))
        ]

    def from_memory(store: EdgeVectorStore, q: np.ndarray, groups: list[str]) -> list[tuple]:
        return [
            (n.id, n.label, n.broad, n.path, round(n.similarity, 6))
            for n in store.search(q, 64, groups)
        ]

    queries = _queries(vectors, 20)
    groups = [f"broad/g{g}" for g in range(0, N_GROUPS, 3)]
    with open_vector_store(root, COLLECTION, DIM) as store:
        assert isinstance(store, EdgeVectorStore)
        store.upsert(exemplars)
        store.upsert(relabelled)
        store.delete([e.id for e in exemplars[10:20]])
        for q in queries:
            assert from_memory(store, q, groups) == from_payloads(store, q, groups)
        found = {n.id for q in queries for n in store.search(q, 400)}
        assert not found & {e.id for e in exemplars[10:20]}
        assert {n.label for q in queries for n in store.search(q, 400)} >= {"n99999999"}
    with open_vector_store(root, COLLECTION, DIM) as store:
        assert isinstance(store, EdgeVectorStore)
        for q in queries:
            assert from_memory(store, q, groups) == from_payloads(store, q, groups)


def _nearest_of_label(exemplars: list[Exemplar], q: np.ndarray, label: str, k: int) -> list[str]:
    """Exact answer: the k exemplars labelled `label` with the highest cosine similarity."""
    mine = [e for e in exemplars if e.label == label]
    sims = [float(np.dot(e.vector, q)) for e in mine]
    return [mine[i].id for i in np.argsort(sims)[::-1][:k]]


def test_search_labels_finds_each_labels_nearest_exemplars(tmp_path: Path) -> None:
    """The evidence of a suggestion: its own taxon's nearest exemplars, exactly (a label holds
    few points, so the engine scans them), in one batch, for Edge and qdrant-client alike;
    after a relabel an exemplar answers for its new label only, also once reopened."""
    vectors, exemplars = _dataset(600, seed=7)
    queries = _queries(vectors, 8, seed=8)
    labels = sorted({e.label for e in exemplars})[:6] + ["n-unknown"]
    relabelled = [
        Exemplar(e.id, e.vector, "n99999999", e.broad, [*e.path[:-1], "n99999999"], "t", "v")
        for e in exemplars
        if e.label == labels[0]
    ][:2]
    now = {e.id: e for e in exemplars} | {e.id: e for e in relabelled}
    root = str(tmp_path / "qdrant")
    reference = QdrantClientVectorStore(COLLECTION, location=":memory:")
    reference.ensure_collection(DIM)
    with open_vector_store(root, COLLECTION, DIM) as edge, reference:
        for store in (edge, reference):
            store.upsert(exemplars)
            store.upsert(relabelled)
        for q in queries:
            for store in (edge, reference):
                found = store.search_labels(q, [*labels, "n99999999"], 3)
                want = [
                    _nearest_of_label(list(now.values()), q, label, 3)
                    for label in [*labels, "n99999999"]
                ]
                assert [[n.id for n in hits] for hits in found] == want
                named = [*labels, "n99999999"]
                assert all(
                    n.label == lab for lab, hits in zip(named, found, strict=True) for n in hits
                )
                assert found[len(labels) - 1] == []  # the unknown label
                assert len(found[-1]) == 2  # the relabelled pair, under its new label only
        assert edge.search_labels(queries[0], labels, 0) == [[] for _ in labels]
        assert edge.search_labels(queries[0], [], 3) == []
    with open_vector_store(root, COLLECTION, DIM) as edge:
        got = edge.search_labels(queries[0], ["n99999999"], 5)
        assert sorted(n.id for n in got[0]) == sorted(e.id for e in relabelled)


def test_an_edge_store_without_a_label_index_gets_one_when_opened(tmp_path: Path) -> None:
    """Stores made before searches filtered on labels have no index on them: opening adds it."""
    import qdrant_edge as qe

    _, exemplars = _dataset(50, seed=9)
    root = str(tmp_path / "qdrant")
    with open_vector_store(root, COLLECTION, DIM) as store:
        assert isinstance(store, EdgeVectorStore)
        store.upsert(exemplars)
        store._require().update(qe.UpdateOperation.delete_field_index("label"))
        assert "label" not in store._require().info().payload_schema
    with open_vector_store(root, COLLECTION, DIM) as store:
        assert isinstance(store, EdgeVectorStore)
        assert {"label", "broad"} <= set(store._require().info().payload_schema)
        label = exemplars[0].label
        (hits,) = store.search_labels(exemplars[0].vector, [label], 50)
        assert {n.id for n in hits} == {e.id for e in exemplars if e.label == label}
