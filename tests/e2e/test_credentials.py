"""End-to-end scoped credentials on the shared session cluster: named tokens added to its
tokens file while it runs, scopes enforced, who wrote what recorded, and a token revoked while
the cluster runs failing its next call while another still works.

The photo learned here is random pixels under a trained class (no other module's photo), and it
is forgotten again; the tokens are this module's own and are revoked when it ends.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from e2e_cluster import metric_value
from PIL import Image

from fieldlens import cluster
from fieldlens.common import credentials
from fieldlens.common.credentials import bearer
from fieldlens.v1 import router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEARNER, OTHER = "e2e-learner", "e2e-other"


@pytest.fixture(scope="module")
def tokens(cluster_up) -> Iterator[dict[str, str]]:
    path = cluster_up.cfg.tokens_path
    issued = {name: credentials.add_token(path, name, ["learn"]) for name in (LEARNER, OTHER)}
    yield issued
    for name in issued:
        if name in {t.name for t in credentials.read_tokens(path)}:
            credentials.revoke_token(path, name)


def _photo() -> bytes:
    rgb = np.random.default_rng(20).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def _journal(cfg: cluster.ClusterConfig, version: str) -> list[dict[str, object]]:
    path = cfg.state_dir / "knowledge" / f"router-{version}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_named_tokens_are_scoped_recorded_and_revoked_while_the_cluster_runs(cluster_up, tokens):
    router, cfg = cluster_up.router, cluster_up.cfg
    learner, other = bearer(tokens[LEARNER]), bearer(tokens[OTHER])

    # A learn-only token cannot switch model sets or index exemplars.
    with pytest.raises(grpc.RpcError) as err:
        router.SwitchModelSet(
            router_pb2.SwitchModelSetRequest(version="ms-any"), timeout=30, metadata=learner
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs the 'admin' scope" in err.value.details()
    assert (
        _code(
            lambda: router.IndexExemplars(
                iter([router_pb2.IndexExemplarsRequest()]), timeout=30, metadata=learner
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )

    # It can learn, and the example records who taught it.
    taxa = router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa
    leaf = next(t.id for t in taxa if t.rank == "class" and not t.id.startswith("learned/"))
    photo = _photo()
    reply = router.Learn(
        router_pb2.LearnRequest(image=photo, taxon_id=leaf, source="e2e-credentials"),
        timeout=60,
        metadata=learner,
    )
    assert reply.exemplar_id == hashlib.sha256(photo).hexdigest()
    version = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10).model_set_version
    (record,) = [r for r in _journal(cfg, version) if r.get("id") == reply.exemplar_id]
    assert record["client"] == LEARNER and record["taxon_id"] == leaf
    port = cfg.router_metrics_port
    counted = {"method": "Learn", "client": LEARNER, "code": "OK"}
    assert metric_value(port, "fieldlens_write_requests_total", **counted) == 1

    # Revoked while the cluster runs: its next call fails, the other token still works.
    credentials.revoke_token(cfg.tokens_path, LEARNER)
    forget = router_pb2.ForgetRequest(exemplar_ids=[reply.exemplar_id])
    assert (
        _code(lambda: router.Forget(forget, timeout=60, metadata=learner))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    done = router.Forget(forget, timeout=60, metadata=other)
    assert done.learned_forgotten >= 1 and not done.not_found
    assert _journal(cfg, version)[-1] == {
        "forget": [reply.exemplar_id],
        "taxon_id": "",
        "client": OTHER,
    }
    # The shared FIELDLENS_WRITE_TOKEN keeps every scope beside the file.
    info = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert info.model_set_version == version
    assert (
        _code(
            lambda: router.SwitchModelSet(
                router_pb2.SwitchModelSetRequest(), timeout=30, metadata=bearer(cluster_up.token)
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT  # past the credential check: no version given
    )
