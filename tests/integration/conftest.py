"""Shared fixtures that start the real servers (tritonserver, redis-server) once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fieldlens.backends import redis_server as redis_launch
from fieldlens.backends import triton_server
from fieldlens.backends.triton_python_model import write_config
from fieldlens.cluster import free_port, spawn, tail

N_BROAD = 20
EMBEDDING_DIM = 256
SPECIALIST_CLASSES = 7
TRITON_READY_TIMEOUT_S = 240.0


@dataclass
class TritonProcess:
    """A running tritonserver and its endpoints."""

    proc: subprocess.Popen[bytes]
    grpc_addr: str
    http_addr: str
    metrics_addr: str
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            # tritonserver leads its own session; the group includes its Python stubs.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_tritonserver(model_repository: Path, work_dir: Path) -> TritonProcess:
    """Start tritonserver over `model_repository` on free loopback ports and wait until every
    model in it is ready; the log goes to `work_dir/tritonserver.log`."""
    backends = triton_server.prepare_backend_directory(work_dir / "backends")
    ports: list[int] = []
    while len(ports) < 3:  # three draws may repeat one: Triton refuses a port used twice
        port = free_port()
        if port not in ports:
            ports.append(port)
    grpc_port, http_port, metrics_port = ports
    argv, env = triton_server.build_command(
        model_repository,
        backends,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
    )
    log_path = work_dir / "tritonserver.log"
    proc = spawn(argv, env, log_path)
    server = TritonProcess(
        proc=proc,
        grpc_addr=f"127.0.0.1:{grpc_port}",
        http_addr=f"127.0.0.1:{http_port}",
        metrics_addr=f"127.0.0.1:{metrics_port}",
        log_path=log_path,
    )
    try:
        triton_server.wait_ready(
            server.http_addr,
            timeout=TRITON_READY_TIMEOUT_S,
            models=triton_server.repository_models(model_repository),
            is_alive=lambda: proc.poll() is None,
        )
    except (TimeoutError, RuntimeError) as exc:
        server.stop()
        raise RuntimeError(f"{exc}\n--- tritonserver log tail ---\n{tail(log_path)}") from exc
    return server


def build_tiny_model_repository(root: Path) -> Path:
    """A throwaway repository honouring the fieldlens I/O contract: `broad` (mean-pool + fixed
    random linear layers, L2-normalised embedding) and one `specialist_test`."""
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812 - the conventional alias

    class TinyNet(nn.Module):
        def __init__(self, n_out: int) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(n_out)
            self.proj = nn.Linear(3 * 4 * 4, EMBEDDING_DIM)
            self.head = nn.Linear(EMBEDDING_DIM, n_out)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = images.permute(0, 3, 1, 2).float() / 255.0
            x = F.adaptive_avg_pool2d(x, 4).flatten(1)
            emb = F.normalize(self.proj(x), dim=1)
            return self.head(emb), emb

    class SpecialistNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet(SPECIALIST_CLASSES)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
            logits, _ = self.net(images)
            return (logits,)

    models: dict[str, tuple[nn.Module, list[tuple[str, int]]]] = {
        "broad": (
            TinyNet(N_BROAD),
            [("BROAD_LOGITS", N_BROAD), ("EMBEDDING", EMBEDDING_DIM)],
        ),
        "specialist_test": (SpecialistNet(), [("LOGITS", SPECIALIST_CLASSES)]),
    }
    for name, (module, outputs) in models.items():
        model_dir = root / name
        write_config(model_dir, name, outputs)
        with warnings.catch_warnings():
            # torch 2.13 flags jit.script as deprecated; TorchScript is still the contract.
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(module.eval())
        scripted.save(str(model_dir / "1" / "model.pt"))
    return root


@pytest.fixture(scope="session")
def tiny_model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_repository(tmp_path_factory.mktemp("model_repository"))


@pytest.fixture(scope="session")
def tritonserver(
    tiny_model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonProcess]:
    server = start_tritonserver(tiny_model_repository, tmp_path_factory.mktemp("triton"))
    yield server
    server.stop()


@dataclass
class RedisProcess:
    """A redis-server on a fixed free port that tests may kill and start again."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> RedisProcess:
        argv = redis_launch.build_argv(self.port, self.data_dir, host=self.host)
        proc = spawn(argv, dict(os.environ), self.data_dir / "redis.log")
        self.proc = proc
        redis_launch.wait_ready(self.host, self.port, is_alive=lambda: proc.poll() is None)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One redis-server for the session; do not kill it (use `fresh_redis` for that)."""
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of the test's own, which the test may kill and restart."""
    server = RedisProcess(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def launch_tritonserver() -> Callable[[Path, Path], TritonProcess]:
    """`start_tritonserver` for tests that bring their own model repository."""
    return start_tritonserver
