"""Local-cluster supervisor: starts, checks and stops redis, Triton and the three services."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from fieldlens.backends import redis_server, triton_server
from fieldlens.common import credentials, model_store, runtime, threads, tls
from fieldlens.common.errors import FieldlensError
from fieldlens.common.settings import REPO_ROOT

logger = logging.getLogger(__name__)

# services/fieldlens/cluster.py -> the repository root.
HOST = "127.0.0.1"
COMPONENTS = ("redis", "triton", "tiny", "specialist", "router")
SERVICES = ("tiny", "specialist", "router")
DEFAULT_READY_TIMEOUT_S = 300.0
DEFAULT_STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 40
_POLL_S = 0.2
REPLICA_PORT_STEP = 10  # between the ports of one component's replicas

# What a live process of each component has in its command line; guards against a pidfile
# whose pid was recycled by an unrelated process.
_CMDLINE_MARKERS: Mapping[str, str] = {
    "redis": "redis-server",
    "triton": "tritonserver",
    "tiny": "fieldlens.tiny",
    "specialist": "fieldlens.specialist",
    "router": "fieldlens.router",
}

# Popen objects of children started by this process, so they can be reaped (not left as
# zombies that still look alive to kill(pid, 0)) when a test fixture stops them.
_children: dict[int, subprocess.Popen[bytes]] = {}


class ClusterError(RuntimeError):
    """A component failed to start or become ready; the message names it and tails its log."""


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FREE_PORT_SPAN = 12000  # how far below the ephemeral range free ports are drawn from


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (tests, throwaway clusters).

    Drawn at random below the kernel's ephemeral range: a port the kernel handed out with
    bind(0) could be given to an outgoing connection (a readiness poll, a client) before the
    server that was meant to have it binds it.
    """
    low = _ephemeral_low()
    if low - FREE_PORT_SPAN >= 1024:
        rng = random.SystemRandom()
        for _ in range(100):
            port = rng.randrange(low - FREE_PORT_SPAN, low)
            if not _port_taken(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ClusterConfig:
    """Where the local cluster lives and which ports it uses."""

    run_dir: Path = REPO_ROOT / ".run"
    host: str = HOST
    router_port: int = 50051
    specialist_port: int = 50052
    tiny_port: int = 50053
    triton_grpc_port: int = 8001
    triton_http_port: int = 8000
    triton_metrics_port: int = 8002
    redis_port: int = 6379
    router_metrics_port: int = 9101
    specialist_metrics_port: int = 9102
    tiny_metrics_port: int = 9103
    model_repository: Path = REPO_ROOT / "deploy" / "triton" / "model_repository"
    models_dir: Path = REPO_ROOT / "deploy" / "models"
    # None -> <run_dir>/qdrant.
    qdrant_path: Path | None = None
    # URL of a Qdrant server; empty -> the router's in-process Qdrant Edge store.
    qdrant_addr: str = ""
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    # Extra environment for every component, e.g. log levels in tests.
    extra_env: tuple[tuple[str, str], ...] = ()
    # Triton servers: the first is `triton`, the others `triton-2`, ... on ports REPLICA_PORT_STEP
    # apart; services address them all as one target, as on Kubernetes (triton_target).
    triton_replicas: int = 1
    # Tiny replicas likewise (`tiny`, `tiny-2`, ...): each with its own state directory (its
    # journal), peers of each other, all behind the router's TINY_ADDR (tiny_target).
    tiny_replicas: int = 1
    # Every gRPC hop over TLS (a throwaway CA and certificates under <run_dir>/tls); with
    # `mtls`, the services also ask their clients for certificates from that CA.
    tls: bool = False
    mtls: bool = False

    def with_free_ports(self) -> ClusterConfig:
        """A copy with every port replaced by a currently free one (tests)."""
        ports: dict[str, int] = {}
        for f in dataclasses.fields(self):
            if f.name.endswith("_port"):
                port = free_port(self.host)
                while port in ports.values():
                    port = free_port(self.host)
                ports[f.name] = port
        return dataclasses.replace(self, **ports)  # type: ignore[arg-type]

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def qdrant_dir(self) -> Path:
        return self.qdrant_path if self.qdrant_path is not None else self.run_dir / "qdrant"

    @property
    def token_path(self) -> Path:
        return self.run_dir / "write-token"

    @property
    def tokens_path(self) -> Path:
        """The router's tokens file (named, scoped tokens; `fieldlens token add`); it may be
        missing, and is read again whenever it changes."""
        return self.run_dir / "tokens.jsonl"

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"

    @property
    def model_store(self) -> Path:
        """Published model sets (the services' default FIELDLENS_MODEL_STORE)."""
        return self.state_dir / "model-sets"

    @property
    def tls_dir(self) -> Path:
        return self.run_dir / "tls"

    def pki(self) -> tls.LocalPki:
        """This cluster's CA and certificates (made on first use)."""
        return tls.local_pki(self.tls_dir)

    def client_tls(self, mtls: bool | None = None) -> tls.TlsFiles | None:
        """What a client of this cluster needs: None when it is plaintext; its CA, and its
        client certificate when the cluster asks for one (or `mtls` says so)."""
        if not (self.tls or self.mtls):
            return None
        return self.pki().client_files(with_certificate=self.mtls if mtls is None else mtls)

    def write_token(self) -> str:
        """The bearer token write RPCs need (FIELDLENS_WRITE_TOKEN, else this cluster's own)."""
        return credentials.client_token(self.token_path)

    def addr(self, port: int) -> str:
        return f"{self.host}:{port}"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def pid_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def service_port(self, name: str) -> int:
        """gRPC port of a service process (`tiny-2`: a replica's, REPLICA_PORT_STEP along)."""
        base, replica = _replica_of(name)
        return int(getattr(self, f"{base}_port")) + replica * REPLICA_PORT_STEP

    def metrics_port(self, name: str) -> int:
        base, replica = _replica_of(name)
        return int(getattr(self, f"{base}_metrics_port")) + replica * REPLICA_PORT_STEP

    @property
    def components(self) -> tuple[str, ...]:
        """Every component of this cluster, in start order (Triton replicas after `triton`)."""
        tritons = tuple(replica_name("triton", i) for i in range(1, self.triton_replicas))
        tinies = tuple(replica_name("tiny", i) for i in range(1, self.tiny_replicas))
        return ("redis", "triton", *tritons, "tiny", *tinies, "specialist", "router")

    def triton_ports(self, replica: int = 0) -> tuple[int, int, int]:
        """(gRPC, HTTP, metrics) ports of one Triton replica."""
        step = replica * REPLICA_PORT_STEP
        return (
            self.triton_grpc_port + step,
            self.triton_http_port + step,
            self.triton_metrics_port + step,
        )

    @property
    def tiny_target(self) -> str:
        """The gRPC target naming every tiny replica (one address when there is one)."""
        names = [replica_name("tiny", i) for i in range(self.tiny_replicas)]
        return _target([self.addr(self.service_port(n)) for n in names])

    @property
    def triton_target(self) -> str:
        """The gRPC target naming every Triton replica (one address when there is one)."""
        return _target([self.addr(self.triton_ports(i)[0]) for i in range(self.triton_replicas)])

    def service_env(self, name: str) -> dict[str, str]:
        """Environment of one fieldlens service: its own endpoints plus its dependencies'."""
        env = dict(os.environ)
        env.update(
            {
                "FIELDLENS_LISTEN_ADDR": self.addr(self.service_port(name)),
                "FIELDLENS_METRICS_PORT": str(self.metrics_port(name)),
                "TRITON_ADDR": self.triton_target,
                "SPECIALIST_ADDR": self.addr(self.specialist_port),
                "TINY_ADDR": self.tiny_target,
                "REDIS_ADDR": self.addr(self.redis_port),
                "QDRANT_ADDR": self.qdrant_addr,
                "QDRANT_PATH": str(self.qdrant_dir),
                "FIELDLENS_MODELS_DIR": str(self.models_dir),
                "FIELDLENS_STATE_DIR": str(self.state_dir),
                credentials.TOKEN_ENV: self.write_token(),
                credentials.TOKENS_FILE_ENV: str(self.tokens_path),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if _replica_of(name)[1]:  # a replica keeps its own journal; the model store is shared
            env["FIELDLENS_STATE_DIR"] = str(self.run_dir / "replicas" / name / "state")
            env["FIELDLENS_MODEL_STORE"] = str(self.model_store)
        if self.tls or self.mtls:
            files = self.pki().server_files(mtls=self.mtls)
            env.update(
                {
                    "FIELDLENS_TLS_CERT": str(files.cert),
                    "FIELDLENS_TLS_KEY": str(files.key),
                    "FIELDLENS_TLS_CA": str(files.ca),
                    "FIELDLENS_TLS_CLIENT_CA": str(files.client_ca or ""),
                }
            )
        else:  # plaintext on loopback: development only, so tokens may travel in clear
            env["FIELDLENS_ALLOW_PLAINTEXT_TOKENS"] = "1"
        if name.startswith("tiny") and self.tiny_replicas > 1:
            env["FIELDLENS_TINY_PEERS"] = self.tiny_target
        env.update(dict(self.extra_env))
        # Belt and braces: the service sizes its pools itself (common/threads.py); with these
        # its BLAS/OpenMP libraries do not even start a wider pool when they are loaded.
        env.update(threads.child_env(env))
        return env


def _redis_command(cfg: ClusterConfig) -> tuple[list[str], dict[str, str]]:
    argv = redis_server.build_argv(cfg.redis_port, cfg.run_dir / "redis", host=cfg.host)
    return argv, {**os.environ, **dict(cfg.extra_env)}


def _triton_command(cfg: ClusterConfig, replica: int = 0) -> tuple[list[str], dict[str, str]]:
    if not triton_server.repository_models(cfg.model_repository):
        raise ClusterError(
            f"triton: no models in {cfg.model_repository}; train and export them first "
            "(make train) or point model_repository at an exported repository"
        )
    backends = triton_server.prepare_backend_directory(
        cfg.run_dir / "triton" / replica_name("backends", replica)
    )
    grpc_port, http_port, metrics_port = cfg.triton_ports(replica)
    argv, env = triton_server.build_command(
        cfg.model_repository,
        backends,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        host=cfg.host,
    )
    # Triton keeps its own gRPC core defaults: the I/O choice of ours is for Python processes.
    runtime.without_fieldlens_grpc_core(env)
    env.update(dict(cfg.extra_env))
    return argv, env


def grpc_serving(addr: str, timeout_s: float = 1.0, tls_files: tls.TlsFiles | None = None) -> bool:
    """True when the grpc.health.v1 Check(service='') at `addr` answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with tls.channel(addr, tls_files) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def _target(addrs: list[str]) -> str:
    """One gRPC target for several servers: an `ipv4:` list (one address as itself)."""
    return addrs[0] if len(addrs) == 1 else "ipv4:" + ",".join(addrs)


def replica_name(base: str, replica: int) -> str:
    """`base` for the first replica (0), `base-2`, `base-3`, ... for the others."""
    return base if replica == 0 else f"{base}-{replica + 1}"


def _replica_of(name: str) -> tuple[str, int]:
    """(component, replica index) of a process name: `triton-2` -> ("triton", 1)."""
    match = _REPLICA.fullmatch(name)
    return (match[1], int(match[2]) - 1) if match else (name, 0)


_REPLICA = re.compile(r"([a-z]+)-([2-9]|[1-9][0-9]+)")


def _ready(cfg: ClusterConfig, name: str) -> bool:
    base, replica = _replica_of(name)
    if base == "redis":
        return redis_server.ping(cfg.host, cfg.redis_port)
    if base == "triton":
        url = cfg.addr(cfg.triton_ports(replica)[1])
        if not triton_server.is_ready(url):
            return False
        return any(not triton_server.not_ready_models(url, nets) for nets in _triton_nets(cfg))
    return grpc_serving(cfg.addr(cfg.service_port(name)), tls_files=cfg.client_tls(mtls=True))


def _triton_nets(cfg: ClusterConfig) -> list[list[str]]:
    """What a ready Triton holds, either will do: the nets it boots with (its repository's),
    or those of the model set the store names current (the router loads them on a Triton
    that lacks them, and unloads the boot nets once a switch retires them)."""
    choices = [triton_server.repository_models(cfg.model_repository)]
    version = model_store.current(cfg.model_store)
    if version is not None:
        from fieldlens.backends.triton_repository import nets_of

        try:
            choices.append(
                nets_of(model_store.load_version(cfg.model_store, cfg.models_dir, version))
            )
        except FieldlensError as exc:  # a store being written: the boot nets still count
            logger.debug("model set %s unreadable for Triton readiness: %s", version, exc)
    return choices


def _command(cfg: ClusterConfig, name: str) -> tuple[list[str], dict[str, str]]:
    base, replica = _replica_of(name)
    if base == "redis":
        return _redis_command(cfg)
    if base == "triton":
        return _triton_command(cfg, replica)
    return [sys.executable, "-m", f"fieldlens.{base}"], cfg.service_env(name)


def _own_ports(cfg: ClusterConfig, name: str) -> list[int]:
    base, replica = _replica_of(name)
    if base == "redis":
        return [cfg.redis_port]
    if base == "triton":
        return list(cfg.triton_ports(replica))
    return [cfg.service_port(name), cfg.metrics_port(name)]


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _read_pid(cfg: ClusterConfig, name: str) -> int | None:
    try:
        return int(cfg.pid_path(name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int, name: str) -> bool:
    child = _children.get(pid)
    if child is not None:
        # Our own child: poll() is authoritative, and /proc/<pid>/cmdline can read empty
        # for a moment right after exec.
        if child.poll() is None:
            return True
        _children.pop(pid, None)
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return _CMDLINE_MARKERS[_replica_of(name)[0]] in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _live_pid(cfg: ClusterConfig, name: str) -> int | None:
    pid = _read_pid(cfg, name)
    return pid if pid is not None and _alive(pid, name) else None


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file ('' when it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def spawn(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `argv` detached in its own session, stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {argv[0]}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=str(REPO_ROOT),
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc


def _failure(cfg: ClusterConfig, name: str, problem: str) -> ClusterError:
    log = cfg.log_path(name)
    return ClusterError(f"{name} {problem} (log: {log}); last lines:\n{tail(log)}")


def _wait_ready(cfg: ClusterConfig, name: str, pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _ready(cfg, name):
        if not _alive(pid, name):
            raise _failure(cfg, name, "exited before becoming ready")
        if time.monotonic() >= deadline:
            raise _failure(cfg, name, f"not ready after {timeout_s:.0f}s")
        time.sleep(_POLL_S)


def _start_one(cfg: ClusterConfig, name: str) -> None:
    pid = _live_pid(cfg, name)
    if pid is not None:
        if _ready(cfg, name):
            logger.info("%s already running (pid %d)", name, pid)
            return
        logger.info("%s running (pid %d) but not ready yet; waiting", name, pid)
        _wait_ready(cfg, name, pid, cfg.ready_timeout_s)
        return
    cfg.pid_path(name).unlink(missing_ok=True)
    taken = [p for p in _own_ports(cfg, name) if _port_taken(cfg.host, p)]
    if taken:
        raise ClusterError(
            f"{name}: port(s) {taken} on {cfg.host} already in use by another process"
        )
    _remove_leftovers(cfg, name)
    argv, env = _command(cfg, name)
    proc = spawn(argv, env, cfg.log_path(name))
    cfg.pid_path(name).write_text(f"{proc.pid}\n")
    logger.info("started %s (pid %d), log %s", name, proc.pid, cfg.log_path(name))
    started = time.monotonic()
    try:
        _wait_ready(cfg, name, proc.pid, cfg.ready_timeout_s)
    except ClusterError:
        _terminate(cfg, name, proc.pid, DEFAULT_STOP_TIMEOUT_S)
        raise
    logger.info("%s ready after %.1fs", name, time.monotonic() - started)


def start(cfg: ClusterConfig, components: Sequence[str] | None = None) -> None:
    """Start (or adopt, when already running and healthy) `components` (default: all), in
    dependency order; `triton` stands for every Triton replica.

    Raises:
        ClusterError: a component could not start or become ready; already-started ones keep
            running (inspect them, then `stop`).
    """
    wanted = _expand(cfg, components)
    cfg.logs_dir.mkdir(parents=True, exist_ok=True)
    for name in cfg.components:
        if name in wanted:
            _start_one(cfg, name)


def _expand(cfg: ClusterConfig, components: Sequence[str] | None) -> set[str]:
    """The process names `components` stand for (`triton`: every replica, running ones too)."""
    if components is None:
        return set(_all_processes(cfg))
    unknown = set(components) - set(_all_processes(cfg))
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; known: {cfg.components}")
    return {n for n in _all_processes(cfg) if n in components or _replica_of(n)[0] in components}


def _all_processes(cfg: ClusterConfig) -> list[str]:
    """This cluster's components plus replicas started earlier with more (their pidfiles)."""
    names = list(cfg.components)
    for pidfile in sorted(cfg.run_dir.glob("*.pid")):
        base, replica = _replica_of(pidfile.stem)
        if replica and base in COMPONENTS and pidfile.stem not in names:
            names.insert(names.index(base) + replica, pidfile.stem)
    return names


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Each component leads its own session/process group, so the group also reaches the
    # Python-backend stubs that tritonserver forks.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        logger.warning("not permitted to signal process group %d", pid)


def _wait_gone(pid: int, name: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid, name):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate(cfg: ClusterConfig, name: str, pid: int, timeout_s: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    if not _wait_gone(pid, name, timeout_s):
        logger.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing", name, pid, timeout_s)
        _signal_group(pid, signal.SIGKILL)
        _wait_gone(pid, name, 5.0)
    _children.pop(pid, None)
    cfg.pid_path(name).unlink(missing_ok=True)
    _remove_leftovers(cfg, name)


def _remove_leftovers(cfg: ClusterConfig, name: str) -> None:
    """What a component killed outright leaves behind and no one else would remove: a Triton
    replica's shared-memory regions (its port is free or its process gone when this runs)."""
    base, replica = _replica_of(name)
    if base == "triton":
        prefix = triton_server.shm_prefix_for(cfg.triton_ports(replica)[0])
        removed = triton_server.remove_shm_regions(prefix)
        if removed:
            logger.info("%s: removed %d shared-memory regions it left", name, removed)


def stop(
    cfg: ClusterConfig,
    components: Sequence[str] | None = None,
    timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
) -> None:
    """SIGTERM running components (default: all, every replica) in reverse dependency order,
    SIGKILL stragglers."""
    wanted = _expand(cfg, components)
    for name in reversed(_all_processes(cfg)):
        if name not in wanted:
            continue
        pid = _live_pid(cfg, name)
        if pid is None:
            cfg.pid_path(name).unlink(missing_ok=True)
            continue
        logger.info("stopping %s (pid %d)", name, pid)
        _terminate(cfg, name, pid, timeout_s)


def kill(cfg: ClusterConfig, name: str, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Send `sig` to one component (default: kill it outright); True if it was running."""
    if name not in _all_processes(cfg):
        raise ValueError(f"unknown component {name!r}; known: {cfg.components}")
    pid = _live_pid(cfg, name)
    if pid is None:
        return False
    _signal_group(pid, sig)
    if sig in (signal.SIGKILL, signal.SIGTERM) and _wait_gone(pid, name, DEFAULT_STOP_TIMEOUT_S):
        _children.pop(pid, None)
        cfg.pid_path(name).unlink(missing_ok=True)
        _remove_leftovers(cfg, name)
    return True


def status(cfg: ClusterConfig) -> dict[str, str]:
    """name -> "running" (alive and ready), "unhealthy" (alive, not ready) or "stopped"."""
    states: dict[str, str] = {}
    for name in _all_processes(cfg):
        if _live_pid(cfg, name) is None:
            states[name] = "stopped"
        else:
            states[name] = "running" if _ready(cfg, name) else "unhealthy"
    return states


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fieldlens.cluster", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--run-dir", type=Path, default=ClusterConfig.run_dir)
    parser.add_argument("--model-repository", type=Path, default=ClusterConfig.model_repository)
    parser.add_argument("--timeout", type=float, default=DEFAULT_READY_TIMEOUT_S)
    parser.add_argument(
        "--only", nargs="+", choices=COMPONENTS, default=list(COMPONENTS), metavar="COMPONENT"
    )
    parser.add_argument(
        "--triton-replicas", type=int, default=1, help="Triton servers (one target for all)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = ClusterConfig(
        run_dir=args.run_dir.resolve(),
        model_repository=args.model_repository.resolve(),
        ready_timeout_s=args.timeout,
        triton_replicas=args.triton_replicas,
    )
    if args.command == "up":
        try:
            start(cfg, args.only)
        except ClusterError as exc:
            logger.error("%s", exc)
            return 1
    elif args.command == "down":
        stop(cfg, args.only)
    states = status(cfg)
    for name, state in states.items():
        print(f"{name:<11} {state}")
    if args.command == "status":
        return 0 if all(s == "running" for s in states.values()) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
