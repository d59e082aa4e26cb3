"""End-to-end re-index: a router whose backbone is new re-embeds the exemplars (and re-learns
the examples) of an older embedding space from the blob store, and only then serves them;
meanwhile answers carry NEIGHBOURS_UNAVAILABLE and writes answer UNAVAILABLE."""

from __future__ import annotations

import shutil
import time

import grpc
import numpy as np
import pytest
from e2e_cluster import BlobHold, running

from fieldlens import cluster, gallery
from fieldlens.backends.blob_store import FolderBlobStore
from fieldlens.backends.vector_store import Exemplar, list_collections, open_vector_store
from fieldlens.common.credentials import bearer
from fieldlens.common.knowledge import KnowledgeJournal, LearnedExample, NewTaxonSpec
from fieldlens.common.model_set import load_model_set
from fieldlens.router.service import STAGING_SUFFIX, collection_name
from fieldlens.v1 import router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OLD_EMBEDDING = "emb-old000000000"
N_GALLERY = 30


@pytest.fixture(scope="module")
def old_space_cluster(tmp_path_factory, data_dir, validation_keys):
    """A cluster started over the leftovers of an older model set: its exemplar collection
    (random vectors: another space), their image bytes, and its Learn journal."""
    model_set = load_model_set(cluster.ClusterConfig().models_dir)
    cfg = cluster.ClusterConfig(run_dir=tmp_path_factory.mktemp("reindex")).with_free_ports()
    classes = set(model_set.taxonomy.class_ids)
    items = list(gallery.gallery_items(data_dir, 1, validation_keys, classes))[: N_GALLERY + 2]
    items, learned_image, spare = items[:-2], items[-2][1], items[-1]
    blobs = FolderBlobStore(cfg.state_dir / "blobs")
    old = open_vector_store(
        str(cfg.qdrant_dir), collection_name(OLD_EMBEDDING), model_set.embedding_dim
    )
    rng = np.random.default_rng(0)
    points = []
    for _, data, wnid in items:
        v = rng.normal(size=model_set.embedding_dim).astype(np.float32)
        points.append(
            Exemplar(
                id=blobs.put(data),
                vector=v / np.linalg.norm(v),
                label=wnid,
                broad=model_set.taxonomy.broad_of(wnid) or "",
                path=model_set.taxonomy.path(wnid),
                source="old-gallery",
                embedding_version=OLD_EMBEDDING,
            )
        )
    # One exemplar whose bytes were never kept: it cannot be re-embedded, and is skipped.
    lost = Exemplar(**{**points[0].__dict__, "id": "f" * 64})
    old.upsert([*points, lost])
    old.close()
    journal = KnowledgeJournal.for_model_set(cfg.state_dir, "router", "ms-old", OLD_EMBEDDING)
    spec = NewTaxonSpec("learned/house_cat", "house cat", "broad/cat")
    journal.append([LearnedExample(blobs.put(learned_image), spec.id, points[0].vector, spec)])
    with running(cfg) as (_, router):
        yield cfg, router, items, model_set, spare


def _info(router) -> router_pb2.GetInfoResponse:
    return router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)


def _re_indexed(router) -> router_pb2.GetInfoResponse:
    """GetInfo once the re-index is over (the old set's learned example learned again)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info = _info(router)
        if info.learned_examples == 1 and not info.writes_blocked:
            break
        time.sleep(0.5)
    return info


def test_writes_answer_unavailable_while_exemplars_are_re_embedded(old_space_cluster):
    """README, re-index: until the new space's collection is published, answers carry
    NEIGHBOURS_UNAVAILABLE ("re-indexing ...") and writes answer UNAVAILABLE, with
    GetInfo.writes_blocked saying why. The router is started again over the old space alone,
    and held in its re-index by one exemplar whose kept bytes wait (BlobHold)."""
    cfg, router, items, model_set, (_, photo, wnid) = old_space_cluster
    token = bearer(cfg.write_token())
    collection = collection_name(model_set.embedding_version)
    assert cluster.kill(cfg, "router")
    for name in (collection, collection + STAGING_SUFFIX):  # as if it had never re-indexed
        shutil.rmtree(cfg.qdrant_dir / name, ignore_errors=True)
    with BlobHold(cfg.state_dir / "blobs", items[0][1]) as hold:
        cluster.start(cfg, ["router"])
        blocked = _info(router).writes_blocked
        assert blocked.startswith(f"re-indexing exemplars into {collection}"), blocked
        for _, data, _ in items[:3]:
            r = router.Classify(router_pb2.ClassifyRequest(image=data, skip_cache=True), timeout=30)
            assert r.suggestions
            kinds = {router_pb2.DegradationKind.Name(d.kind): d.message for d in r.degradations}
            assert kinds.get("NEIGHBOURS_UNAVAILABLE", "").startswith("re-indexing"), kinds
        for write in (
            lambda: router.Learn(
                router_pb2.LearnRequest(image=photo, taxon_id=wnid), timeout=10, metadata=token
            ),
            lambda: router.Forget(
                router_pb2.ForgetRequest(exemplar_ids=[hold.key]), timeout=10, metadata=token
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                write()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "re-indexing exemplars into" in err.value.details()
            assert "retry" in err.value.details()
        assert _info(router).writes_blocked  # held all along
        hold.release()
        info = _re_indexed(router)
    assert info.writes_blocked == "" and info.exemplar_count == len(items) + 1
    learned = router.Learn(
        router_pb2.LearnRequest(image=photo, taxon_id=wnid), timeout=30, metadata=token
    )
    assert not learned.duplicate
    r = router.Classify(router_pb2.ClassifyRequest(image=photo, skip_cache=True), timeout=30)
    assert "NEIGHBOURS_UNAVAILABLE" not in {
        router_pb2.DegradationKind.Name(d.kind) for d in r.degradations
    }
    # Leave the cluster as the other test expects it: what this test learned is forgotten.
    forgot = router.Forget(
        router_pb2.ForgetRequest(exemplar_ids=[learned.exemplar_id]), timeout=60, metadata=token
    )
    assert forgot.forgotten == 1


def test_old_exemplars_are_re_embedded_then_served(old_space_cluster):
    cfg, router, items, model_set, _ = old_space_cluster
    info = _re_indexed(router)
    assert info.learned_examples == 1, "the old model set's learned example was not re-learned"
    # Every gallery exemplar with kept bytes, plus the re-learned one; not the lost one.
    assert info.exemplar_count == len(items) + 1
    names = list_collections(str(cfg.qdrant_dir))
    new = collection_name(model_set.embedding_version)
    assert new in names and collection_name(OLD_EMBEDDING) in names
    assert not any(n.endswith(STAGING_SUFFIX) for n in names)
    # Each exemplar now sits where this backbone puts its image: a photo finds itself (among
    # the exemplars of its class, when the answer suggests its class: all five do at top 10).
    found = []
    for _, data, wnid in items[:5]:
        r = router.Classify(
            router_pb2.ClassifyRequest(image=data, top_k=10, skip_cache=True), timeout=30
        )
        kinds = {router_pb2.DegradationKind.Name(d.kind) for d in r.degradations}
        assert "NEIGHBOURS_UNAVAILABLE" not in kinds
        ex = [e for s in r.suggestions for e in s.exemplars if e.label_id == wnid]
        if ex:
            found.append(ex[0].similarity)
    assert len(found) >= 4, f"only {len(found)} of 5 photos were suggested their own class"
    assert all(sim > 0.99 for sim in found), found
    taxa = {t.id for t in router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa}
    assert "learned/house_cat" in taxa
