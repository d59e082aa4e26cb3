"""Starts the whole local cluster once per session (real redis-server, tritonserver, services)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from e2e_cluster import running

from fieldlens import cluster, gallery
from fieldlens.common.credentials import bearer
from fieldlens.v1 import router_pb2_grpc


@dataclass
class LiveCluster:
    cfg: cluster.ClusterConfig
    router: router_pb2_grpc.RouterStub
    channel: grpc.Channel

    @property
    def token(self) -> str:
        return self.cfg.write_token()

    @property
    def router_addr(self) -> str:
        return self.cfg.addr(self.cfg.router_port)


@pytest.fixture(scope="session")
def live_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    run_dir = tmp_path_factory.mktemp("cluster")
    cfg = cluster.ClusterConfig(run_dir=run_dir).with_free_ports()
    with running(cfg) as (channel, router):
        yield LiveCluster(cfg, router, channel)


@pytest.fixture(scope="module")
def cluster_up(live_cluster: LiveCluster) -> LiveCluster:
    """The live cluster, whole: a module run before may have killed a component (Redis, the
    specialist, ...) and not started it again."""
    cluster.start(live_cluster.cfg)
    return live_cluster


@pytest.fixture(scope="module")
def token(cluster_up: LiveCluster) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the cluster's write token (every scope)."""
    return bearer(cluster_up.token)


@pytest.fixture(scope="session")
def validation_keys() -> set[str]:
    return gallery.validation_keys(cluster.ClusterConfig().models_dir)


@pytest.fixture(scope="session")
def manifest() -> dict[str, object]:
    return json.loads((cluster.ClusterConfig().models_dir / "manifest.json").read_text())
