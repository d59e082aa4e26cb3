"""Two tiny-classifier replicas behind one target, as on Kubernetes (a StatefulSet behind a
headless Service), each with its own journal: the router writes to every replica that serves,
a replica that was down copies a serving peer's knowledge when it starts, and the router stays
ready (answers degrade, CLASSIFIER_UNAVAILABLE) with no tiny replica at all."""

from __future__ import annotations

import grpc
import pytest
from e2e_cluster import running

from fieldlens import cluster, gallery
from fieldlens.common.credentials import bearer
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc, router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPLICAS = 2
SHOTS = 5


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, data_dir):
    """A throwaway cluster with two tiny replicas, and photos of two classes it never saw."""
    cfg = cluster.ClusterConfig(
        run_dir=tmp_path_factory.mktemp("tiny-replicas"), tiny_replicas=REPLICAS
    ).with_free_ports()
    classes = gallery.novel_classes(cluster.ClusterConfig().models_dir)[:2]
    images = gallery.class_samples(data_dir, [c["wnid"] for c in classes], SHOTS)
    photos = [(c, images[c["wnid"]]) for c in classes]
    with running(cfg) as (_, router):
        yield cfg, router, photos


def _tiny(cfg: cluster.ClusterConfig, replica: int) -> str:
    return cluster.replica_name("tiny", replica)


def _held(cfg: cluster.ClusterConfig, replica: int, version: str) -> dict[str, str]:
    """{example id: taxon} one tiny replica holds for the model set."""
    with grpc.insecure_channel(cfg.addr(cfg.service_port(_tiny(cfg, replica)))) as channel:
        reply = classifier_pb2_grpc.ClassifierStub(channel).ExportKnowledge(
            classifier_pb2.ExportKnowledgeRequest(model_set_version=version), timeout=30
        )
    return {e.id: e.taxon_id for e in reply.examples}


def _version(router) -> str:
    return router.GetInfo(router_pb2.GetInfoRequest(), timeout=10).model_set_version


def _learn(router, cfg, image: bytes, c: dict[str, str]) -> router_pb2.LearnResponse:
    label = router_pb2.NewTaxonLabel(name=f"{c['name']} (replicas)", parent_id=c["parent"])
    return router.Learn(
        router_pb2.LearnRequest(image=image, new_taxon=label),
        timeout=30,
        metadata=bearer(cfg.write_token()),
    )


def test_a_learned_example_reaches_every_tiny_replica(replicated):
    cfg, router, photos = replicated
    version = _version(router)
    c, images = photos[0]
    learned = _learn(router, cfg, images[0], c)
    for replica in range(REPLICAS):
        assert _held(cfg, replica, version).get(learned.exemplar_id) == learned.taxon.id


def test_a_tiny_replica_that_was_down_catches_up_when_it_starts(replicated):
    cfg, router, photos = replicated
    version = _version(router)
    c, images = photos[1]
    down = _tiny(cfg, REPLICAS - 1)
    first = _learn(router, cfg, images[0], c)  # both replicas hold it
    assert cluster.kill(cfg, down)  # SIGKILL
    # Writes while it is down: new examples, and a forget of one it holds.
    later = [_learn(router, cfg, img, c) for img in images[1:SHOTS]]
    forgotten = router.Forget(
        router_pb2.ForgetRequest(exemplar_ids=[first.exemplar_id]),
        timeout=120,
        metadata=bearer(cfg.write_token()),
    )
    assert forgotten.forgotten == 1
    up = _held(cfg, 0, version)
    assert all(up.get(r.exemplar_id) == r.taxon.id for r in later)
    assert first.exemplar_id not in up

    cluster.start(cfg, [down])  # SERVING only once it has copied a serving peer's knowledge
    back = _held(cfg, REPLICAS - 1, version)
    assert back == _held(cfg, 0, version)
    assert first.exemplar_id not in back


def test_the_router_stays_ready_and_answers_degraded_without_any_tiny(replicated):
    cfg, router, photos = replicated
    tinies = [_tiny(cfg, r) for r in range(REPLICAS)]
    for name in tinies:
        assert cluster.kill(cfg, name)
    try:
        assert cluster.grpc_serving(cfg.addr(cfg.router_port))
        r = router.Classify(
            router_pb2.ClassifyRequest(image=photos[0][1][0], skip_cache=True), timeout=30
        )
        kinds = {router_pb2.DegradationKind.Name(d.kind) for d in r.degradations}
        assert "CLASSIFIER_UNAVAILABLE" in kinds
        # A best-effort answer still comes back, from the broad net alone.
        assert r.answer.taxon.id and r.answer.taxon.depth <= 2
        with pytest.raises(grpc.RpcError) as err:
            _learn(router, cfg, photos[0][1][1], photos[0][0])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no replica is serving" in err.value.details()
    finally:
        cluster.start(cfg, tinies)
