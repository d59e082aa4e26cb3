"""The whole local cluster over TLS and over mTLS (`fieldlens up --tls`, `--mtls`): Classify and
Learn over TLS (with a client certificate under mTLS), plaintext clients refused (and
certificate-less ones under mTLS), and the internal hops (router to tiny and specialist) over
TLS too."""

from __future__ import annotations

import grpc
import pytest

from fieldlens import cluster, gallery
from fieldlens.common import tls
from fieldlens.common.credentials import bearer
from fieldlens.common.model_set import load_model_set
from fieldlens.v1 import router_pb2, router_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module", params=["tls", "mtls"])
def secure(request, tmp_path_factory, data_dir):
    cfg = cluster.ClusterConfig(
        run_dir=tmp_path_factory.mktemp(request.param), tls=True, mtls=request.param == "mtls"
    ).with_free_ports()
    classes = load_model_set(cfg.models_dir).taxonomy.class_ids[:3]
    images = [img for imgs in gallery.class_samples(data_dir, classes, 2).values() for img in imgs]
    try:
        cluster.start(cfg)
        yield cfg, images
    finally:
        cluster.stop(cfg)


def _router(cfg: cluster.ClusterConfig, files: tls.TlsFiles | None) -> grpc.Channel:
    return tls.channel(cfg.addr(cfg.router_port), files)


def test_classify_and_learn_over_tls(secure):
    cfg, images = secure
    with _router(cfg, cfg.client_tls()) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        r = router.Classify(
            router_pb2.ClassifyRequest(image=images[0], skip_cache=True), timeout=30
        )
        # The router reached tiny and the specialist over TLS: nothing degraded.
        assert r.answer.taxon.id and not r.degradations
        learned = router.Learn(
            router_pb2.LearnRequest(
                image=images[1],
                new_taxon=router_pb2.NewTaxonLabel(name="tls probe", parent_id="broad/food"),
            ),
            timeout=30,
            metadata=bearer(cfg.write_token()),
        )
        assert learned.created_taxon


@pytest.mark.parametrize("client", ["plaintext", "tls without a client certificate"])
def test_clients_without_tls_or_a_certificate_are_refused(secure, client):
    cfg, images = secure
    if client != "plaintext" and not cfg.mtls:
        # Plain TLS asks for no client certificate: such a client is served.
        with _router(cfg, cfg.client_tls(mtls=False)) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            assert router.Classify(router_pb2.ClassifyRequest(image=images[0]), timeout=30)
        return
    files = None if client == "plaintext" else cfg.client_tls(mtls=False)
    with _router(cfg, files) as channel:
        with pytest.raises(grpc.RpcError) as err:
            router_pb2_grpc.RouterStub(channel).Classify(
                router_pb2.ClassifyRequest(image=images[0]), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_internal_hops_refuse_plaintext_too(secure):
    cfg, _ = secure
    for name in ("tiny", "specialist"):
        addr = cfg.addr(cfg.service_port(name))
        assert not cluster.grpc_serving(addr, timeout_s=5)  # plaintext
        assert cluster.grpc_serving(addr, timeout_s=5, tls_files=cfg.client_tls(mtls=True))
        if cfg.mtls:  # a caller without the services' certificate is refused
            assert not cluster.grpc_serving(addr, timeout_s=5, tls_files=cfg.client_tls(False))
