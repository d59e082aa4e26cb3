"""Fixtures of the deploy tests: rendered overlays, promtool, and a live cluster + Prometheus."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_helpers import (
    JOBS_DIR,
    MODEL_REPOSITORY,
    MODELS_DIR,
    OVERLAYS,
    PUBLISH_JOB,
    Exposed,
    Rendered,
    render,
    render_dir,
    write_rules_file,
)

PROMETHEUS_READY_TIMEOUT_S = 60.0
# The scrape and rule-evaluation interval of the test Prometheus.
SCRAPE_INTERVAL = "1s"
DISTINCT_IMAGES = 8
REPEATS = 3
DEGRADED_REQUESTS = 3


@pytest.fixture(scope="session")
def rendered(kubectl_binary: Path) -> dict[str, Rendered]:
    return {overlay: Rendered(overlay, render(overlay)) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def publish_job(kubectl_binary: Path) -> Rendered:
    """The rendered model-set publishing Job (deploy/k8s/jobs/publish-model-set)."""
    return Rendered(PUBLISH_JOB, render_dir(JOBS_DIR / PUBLISH_JOB))


@pytest.fixture(scope="session")
def models_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layout of the fieldlens-models image (docker/models.Dockerfile), without weights."""
    root = tmp_path_factory.mktemp("models-image") / "models"
    shutil.copytree(MODELS_DIR, root / "fieldlens", ignore=shutil.ignore_patterns("report"))
    for config in MODEL_REPOSITORY.glob("*/config.pbtxt"):
        dest = root / "triton" / config.parent.name / "config.pbtxt"
        dest.parent.mkdir(parents=True)
        shutil.copy(config, dest)
    return root


# -- the live stack: local cluster, real Prometheus scraping it, traffic ------------------------


@dataclass
class LiveStack:
    """A running local cluster with traffic sent, and what its metrics ports exposed."""

    cfg: Any  # fieldlens.cluster.ClusterConfig
    # component -> the names one /metrics scrape showed.
    scraped: dict[str, Exposed]
    # Unix time at which the traffic ended; PromQL over it is evaluated at this time.
    traffic_end: float
    prometheus_url: str | None
    prometheus_log: Path | None
    metrics_targets: dict[str, str] = field(default_factory=dict)

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query against the test Prometheus; the `result` list."""
        assert self.prometheus_url is not None
        params = {"query": promql, "time": f"{at if at is not None else time.time():.3f}"}
        body = _get_json(f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode(params)}")
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def api(self, path: str) -> Any:
        assert self.prometheus_url is not None
        return _get_json(f"{self.prometheus_url}{path}")["data"]


def _get_json(url: str, timeout_s: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def _get_text(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return str(resp.read().decode())


def _prometheus_config(targets: dict[str, str], rules_file: Path) -> dict[str, Any]:
    # namespace mimics the target label the Prometheus Operator adds, so the rules'
    # `by (namespace)` aggregations behave as in the cluster.
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {
                "job_name": name,
                "static_configs": [{"targets": [addr], "labels": {"namespace": "fieldlens"}}],
            }
            for name, addr in targets.items()
        ],
    }


def _start_prometheus(
    binary: str, targets: dict[str, str], work: Path
) -> tuple[subprocess.Popen[bytes], str, Path]:
    rules_file = write_rules_file(work / "rules.yml", interval=SCRAPE_INTERVAL)
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(targets, rules_file)))
    from fieldlens.cluster import free_port

    port = free_port()
    log_path = work / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + PROMETHEUS_READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited ({proc.returncode}):\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"prometheus not ready:\n{log_path.read_text()}") from None
            time.sleep(0.2)
    return proc, url, log_path


def _wait_targets_scraped(url: str, count: int, timeout_s: float = 30.0) -> None:
    """Until every target has been scraped once: counters then have a sample before traffic."""
    deadline = time.monotonic() + timeout_s
    while True:
        active = _get_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
        if len(active) == count and all(t["health"] == "up" for t in active):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"prometheus targets not all up: {active}")
        time.sleep(0.3)


def _synthetic_jpegs(count: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    return images


def _drive_traffic(cfg: Any) -> None:
    """Classify misses, cache hits, rejected input, then answers degraded by a dead Redis."""
    import grpc

    from fieldlens import cluster
    from fieldlens.v1 import router_pb2, router_pb2_grpc

    images = _synthetic_jpegs(DISTINCT_IMAGES)
    with grpc.insecure_channel(cfg.addr(cfg.router_port)) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        router.GetInfo(router_pb2.GetInfoRequest(), timeout=30)
        # Spread over several scrapes: rate() needs a counter to rise between two samples,
        # and the first round (cache misses) is the only one that reaches cache_set.
        for _ in range(REPEATS):
            for data in images:
                router.Classify(router_pb2.ClassifyRequest(image=data), timeout=30)
                time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as rejected:
            router.Classify(router_pb2.ClassifyRequest(image=b"not an image"), timeout=30)
        assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Without Redis the router still answers, flagged CACHE_UNAVAILABLE.
        cluster.kill(cfg, "redis")
        for data in images[:DEGRADED_REQUESTS]:
            reply = router.Classify(router_pb2.ClassifyRequest(image=data), timeout=30)
            assert reply.degradations, "an answer without Redis should be flagged degraded"
            # One per scrape, so that rate() sees the degradation counter increase.
            time.sleep(1.2)


def _scrape(targets: dict[str, str]) -> dict[str, Exposed]:
    from k8s_helpers import exposed_names

    return {
        name: exposed_names(_get_text(f"http://{addr}/metrics")) for name, addr in targets.items()
    }


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """The local cluster on free ports, scraped every second by the real Prometheus (when
    the binary is installed: the `prometheus` fixture requires it, the scrape tests do not),
    after Classify traffic that touches every metric."""
    from fieldlens import cluster

    run_dir = tmp_path_factory.mktemp("deploy-cluster")
    cfg = cluster.ClusterConfig(run_dir=run_dir).with_free_ports()
    targets = {
        "router": cfg.addr(cfg.router_metrics_port),
        "specialist": cfg.addr(cfg.specialist_metrics_port),
        "tiny": cfg.addr(cfg.tiny_metrics_port),
        "triton": cfg.addr(cfg.triton_metrics_port),
    }
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        cluster.start(cfg)
        binary = shutil.which("prometheus")
        url = log_path = None
        if binary is not None:
            work = tmp_path_factory.mktemp("prometheus")
            prometheus, url, log_path = _start_prometheus(binary, targets, work)
            _wait_targets_scraped(url, len(targets))
        _drive_traffic(cfg)
        traffic_end = time.time()
        # Two more scrapes and rule evaluations after the last request.
        time.sleep(2.5)
        yield LiveStack(cfg, _scrape(targets), traffic_end, url, log_path, targets)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(timeout=5)
        cluster.stop(cfg)


@pytest.fixture(scope="session")
def prometheus(prometheus_binary: Path, live_stack: LiveStack) -> LiveStack:
    """The live stack with its Prometheus (the tests/conftest.py prerequisite, checked before
    the stack starts)."""
    assert live_stack.prometheus_url is not None, "live_stack found no prometheus binary"
    return live_stack
