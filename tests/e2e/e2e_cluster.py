"""Helpers of the end-to-end tests: a local cluster for the length of a `with` block, a second
router replica beside it, a kept photo whose bytes wait, the router's /metrics, Classify
traffic on other threads and a model-set switch."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from prometheus_client.parser import text_string_to_metric_families

from fieldlens import cluster
from fieldlens.common import model_store
from fieldlens.common.credentials import bearer
from fieldlens.common.settings import REPO_ROOT
from fieldlens.v1 import router_pb2, router_pb2_grpc

# A FIFO holds what one write puts in it without a reader: the photos the tests hold are far
# smaller (Tiny ImageNet JPEGs are a few KiB).
PIPE_BYTES = 60_000


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


def metric_samples(port: int) -> dict[str, list[Any]]:
    """A service's /metrics on `port`, as {sample name: [samples]}."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def metric_value(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    return sum(
        s.value
        for s in metric_samples(port).get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


class BlobHold:
    """One kept photo whose bytes wait: its blob file becomes a FIFO, so a router that needs
    them (a re-index re-embedding it, a switch re-learning it) blocks in that read until
    `release`, while everything else it does goes on. Deterministic, and nothing under
    services/ changes: the blob store is a folder the test can reach.

    Args:
        blobs: The blob store's folder (`<state dir>/blobs`).
        data: The photo's bytes, kept there already.
    """

    def __init__(self, blobs: Path, data: bytes) -> None:
        assert len(data) < PIPE_BYTES, "a held photo must fit in the pipe's buffer"
        self.key = hashlib.sha256(data).hexdigest()
        self.path = blobs / self.key[:2] / self.key
        self.data = data
        self._fd: int | None = None

    def __enter__(self) -> BlobHold:
        assert self.path.is_file(), f"{self.path} is not a kept photo"
        self.path.unlink()
        os.mkfifo(self.path)
        # Open for reading and writing (which does not wait for a reader): a router's open
        # returns at once and its read waits for the bytes `release` writes.
        self._fd = os.open(self.path, os.O_RDWR)
        return self

    def release(self) -> None:
        """Gives the bytes to a reader waiting (or about to), and puts the file back."""
        if self._fd is None:
            return
        tmp = self.path.with_name(f".{self.key}.held")
        tmp.write_bytes(self.data)
        tmp.replace(self.path)  # later readers open the file
        os.write(self._fd, self.data)  # one waiting in the FIFO gets the bytes, then EOF
        os.close(self._fd)
        self._fd = None

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def router_replica(
    cfg: cluster.ClusterConfig, run_dir: Path
) -> Iterator[tuple[router_pb2_grpc.RouterStub, int]]:
    """A second router process on `cfg`'s Triton, Redis, classifier services, state dir and
    model store, with its own ports and its own Qdrant Edge directory (an Edge shard has one
    owner process). Yields its Router stub and its metrics port; stopped at the end."""
    port, metrics_port = cluster.free_port(), cluster.free_port()
    addr = cfg.addr(port)
    env = {
        **cfg.service_env("router"),
        "FIELDLENS_LISTEN_ADDR": addr,
        "FIELDLENS_METRICS_PORT": str(metrics_port),
        "QDRANT_PATH": str(run_dir / "qdrant"),
    }
    log_path = run_dir / "router-replica.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fieldlens.router"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO_ROOT),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + cfg.ready_timeout_s
        while not cluster.grpc_serving(addr):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise cluster.ClusterError(
                    f"router replica not serving at {addr}:\n{cluster.tail(log_path)}"
                )
            time.sleep(0.2)
        with grpc.insecure_channel(addr) as channel:
            yield router_pb2_grpc.RouterStub(channel), metrics_port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=cluster.DEFAULT_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Answer(NamedTuple):
    """One Classify answer of `Traffic`."""

    sent: float  # time.monotonic() when the call was sent (one in flight at a swap finishes
    # on the set it started on)
    image: int  # index into the traffic's images
    version: str  # the model set that answered
    cached: bool


class Traffic:
    """Classify calls in a loop on `threads` other threads for the length of a `with` block;
    records each answer (`answers`) or error (`errors`, "CODE: details").

    Args:
        router: The Router stub to call.
        images: Photos sent in turn.
        threads: Calls in flight at once.
        skip_cache: Whether the n-th call (0, 1, ...) skips the result cache.
    """

    def __init__(
        self,
        router: router_pb2_grpc.RouterStub,
        images: list[bytes],
        *,
        threads: int = 1,
        skip_cache: Callable[[int], bool] = lambda n: False,
    ) -> None:
        self.router, self.images, self.skip_cache = router, images, skip_cache
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                n, self._next = self._next, self._next + 1
            i = n % len(self.images)
            request = router_pb2.ClassifyRequest(
                image=self.images[i], skip_cache=self.skip_cache(n)
            )
            sent = time.monotonic()
            try:
                r = self.router.Classify(request, timeout=30)
                self.answers.append(Answer(sent, i, r.model_set_version, r.cached))
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")

    @property
    def computed(self) -> int:
        """Answers the nets computed (not read from the result cache)."""
        return sum(not a.cached for a in self.answers)

    @property
    def rounds(self) -> float:
        """How many times over the images have been answered."""
        return len(self.answers) / len(self.images)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def switch(
    router: router_pb2_grpc.RouterStub, cfg: cluster.ClusterConfig, version: str
) -> router_pb2.SwitchModelSetResponse:
    """Router.SwitchModelSet to `version` with the cluster's write token."""
    return router.SwitchModelSet(
        router_pb2.SwitchModelSetRequest(version=version),
        timeout=600,
        metadata=bearer(cfg.write_token()),
    )


def publish_rerouted(
    cfg: cluster.ClusterConfig, work_dir: Path, suffix: str, group: str
) -> tuple[str, str]:
    """Publishes the shipped model set again into `cfg`'s store as `<version>-<suffix>`, the
    same nets with `group` routed to tiny instead of its specialist (so the two sets disagree
    on that group only); returns (the shipped version, the published one)."""
    boot = cluster.ClusterConfig()
    models = work_dir / "models"
    shutil.copytree(boot.models_dir, models)
    manifest = json.loads((models / "manifest.json").read_text())
    shipped = manifest["model_set_version"]
    manifest["model_set_version"] = f"{shipped}-{suffix}"
    manifest["routing"] = {**manifest.get("routing", {}), group: "tiny"}
    (models / "manifest.json").write_text(json.dumps(manifest))
    return shipped, model_store.publish(cfg.model_store, models, boot.model_repository)
