"""A local cluster for the length of a `with` block: started, stopped even when start fails."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from fieldlens import cluster
from fieldlens.v1 import router_pb2_grpc


@contextmanager
def running(
    cfg: cluster.ClusterConfig,
) -> Iterator[tuple[grpc.Channel, router_pb2_grpc.RouterStub]]:
    """Starts every component of `cfg`; yields a channel to its router and a Router stub."""
    try:
        cluster.start(cfg)
    except cluster.ClusterError:
        cluster.stop(cfg)
        raise
    channel = grpc.insecure_channel(cfg.addr(cfg.router_port))
    try:
        yield channel, router_pb2_grpc.RouterStub(channel)
    finally:
        channel.close()
        cluster.stop(cfg)
