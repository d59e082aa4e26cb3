"""Two Triton servers behind one target, as on Kubernetes (a headless Service of Triton pods):
the router and the specialist address both, a model-set switch reaches both, and a Triton that
restarts (coming back with only its repository's nets) gets the serving set's nets again while
requests keep being answered."""

from __future__ import annotations

import time

import pytest
from e2e_cluster import Traffic, publish_rerouted, running
from e2e_cluster import switch as _switch
from tritonclient.grpc import InferenceServerClient

from fieldlens import cluster, gallery
from fieldlens.backends import triton_server
from fieldlens.backends.triton_repository import nets_of
from fieldlens.common import model_store
from fieldlens.common.model_set import load_model_set
from fieldlens.v1 import router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPLICAS = 2
CATCH_UP_S = 60.0  # the router's follow-up runs every 5 s; a Triton load takes seconds


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, data_dir):
    """A throwaway cluster with two Tritons, and a second model set published in its store (the
    shipped nets released again, insects moved to tiny) to switch to."""
    boot = cluster.ClusterConfig()
    cfg = cluster.ClusterConfig(
        run_dir=tmp_path_factory.mktemp("replicas"), triton_replicas=REPLICAS
    ).with_free_ports()
    _, version = publish_rerouted(cfg, tmp_path_factory.mktemp("next"), "replicas", "broad/insect")
    images = [
        data
        for imgs in gallery.class_samples(
            data_dir, load_model_set(boot.models_dir).taxonomy.class_ids[:4], 3
        ).values()
        for data in imgs
    ]
    with running(cfg) as (_, router):
        yield cfg, router, version, images


def _served_nets(cfg: cluster.ClusterConfig, version: str) -> list[str]:
    """The Triton nets of `version`: the shipped set's own names, a stored set's suffixed."""
    shipped = load_model_set(cfg.models_dir)
    if version == shipped.version:
        return nets_of(shipped)
    return nets_of(model_store.load_version(cfg.model_store, cfg.models_dir, version))


def _ready_on(cfg: cluster.ClusterConfig, replica: int, nets: list[str]) -> dict[str, bool]:
    client = InferenceServerClient(cfg.addr(cfg.triton_ports(replica)[0]))
    try:
        return {n: _model_ready(client, n) for n in nets}
    finally:
        client.close()


def _model_ready(client: InferenceServerClient, name: str) -> bool:
    try:
        return bool(client.is_model_ready(name))
    except Exception:  # noqa: BLE001 - a server that is down has nothing ready
        return False


def _inferences(cfg: cluster.ClusterConfig, replica: int, model: str) -> int:
    client = InferenceServerClient(cfg.addr(cfg.triton_ports(replica)[0]))
    try:
        stats = client.get_inference_statistics(model, as_json=True)
    finally:
        client.close()
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats["model_stats"])


def test_services_address_every_triton_replica(replicated):
    cfg, router, _, images = replicated
    assert cfg.triton_target.startswith("ipv4:") and cfg.triton_target.count(",") == 1
    serving = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10).model_set_version
    model = _served_nets(cfg, serving)[0]
    before = [_inferences(cfg, r, model) for r in range(REPLICAS)]
    for data in images:
        router.Classify(router_pb2.ClassifyRequest(image=data, skip_cache=True), timeout=30)
    after = [_inferences(cfg, r, model) for r in range(REPLICAS)]
    # Both replicas answered some of the broad-net calls.
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_a_switch_under_traffic_loads_every_replica(replicated):
    cfg, router, version, images = replicated
    nets = _served_nets(cfg, version)
    with Traffic(router, images, skip_cache=lambda n: True) as traffic:
        started = time.monotonic()
        report = _switch(router, cfg, version)
        seconds = time.monotonic() - started
        time.sleep(2)
    assert router.GetInfo(router_pb2.GetInfoRequest(), timeout=10).model_set_version == version
    for replica in range(REPLICAS):
        assert all(_ready_on(cfg, replica, nets).values()), (replica, nets)
    print(
        f"switch with {REPLICAS} Tritons: {seconds:.1f} s ({report.model_set_version}); "
        f"{len(traffic.answers)} answers under traffic, {len(traffic.errors)} failed"
    )
    assert traffic.errors == []
    assert len(traffic.answers) > 0


def test_a_restarted_triton_gets_the_serving_nets_back_without_a_failed_request(replicated):
    cfg, router, version, images = replicated
    _switch(router, cfg, version)  # a no-op when an earlier test switched already
    nets = _served_nets(cfg, version)
    restarted = cluster.replica_name("triton", REPLICAS - 1)
    regions = triton_server.SHM_DIR.glob(
        triton_server.shm_prefix_for(cfg.triton_ports(REPLICAS - 1)[0]) + "*"
    )
    assert list(regions), "a running Triton holds shared-memory regions"
    with Traffic(router, images, skip_cache=lambda n: True) as traffic:
        time.sleep(1)
        assert cluster.kill(cfg, restarted)  # SIGKILL: comes back with its repository's nets
        # What it could not remove itself, the launcher did: /dev/shm is memory.
        assert not list(
            triton_server.SHM_DIR.glob(
                triton_server.shm_prefix_for(cfg.triton_ports(REPLICAS - 1)[0]) + "*"
            )
        )
        time.sleep(2)
        cluster.start(cfg, [restarted])
        deadline = time.monotonic() + CATCH_UP_S
        while not all(_ready_on(cfg, REPLICAS - 1, nets).values()):
            assert time.monotonic() < deadline, f"{restarted} lacks {nets} after {CATCH_UP_S} s"
            time.sleep(1)
        caught_up = time.monotonic()
        before = _inferences(cfg, REPLICAS - 1, nets[0])
        time.sleep(5)  # and it is asked again
        after = _inferences(cfg, REPLICAS - 1, nets[0])
    print(
        f"{restarted} had the serving nets back {caught_up - deadline + CATCH_UP_S:.1f} s "
        f"after its restart; {len(traffic.answers)} answers, {len(traffic.errors)} failed"
    )
    assert traffic.errors == []
    assert after > before
