"""Frozen per-service settings, read once from the environment in each service's main()."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from fieldlens.common.runtime import DEFAULT_EVENT_LOOP, EVENT_LOOP_ENV, EventLoop, event_loop
from fieldlens.common.tls import TlsFiles

logger = logging.getLogger(__name__)

# services/fieldlens/common/settings.py -> the repository root.
REPO_ROOT = Path(__file__).resolve().parents[3]
# The training shards sit beside the checkout unless FIELDLENS_DATA_DIR (or --data) says
# otherwise; data_dir_from_env() applies the variable.
DATA_DIR_ENV = "FIELDLENS_DATA_DIR"
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "tiny-imagenet"

ServiceName = Literal["router", "specialist", "tiny"]
ClassifierRole = Literal["specialist", "tiny"]

DEFAULT_LISTEN_ADDRS: Mapping[str, str] = {
    "router": "127.0.0.1:50051",
    "specialist": "127.0.0.1:50052",
    "tiny": "127.0.0.1:50053",
}
DEFAULT_METRICS_PORTS: Mapping[str, int] = {"router": 9101, "specialist": 9102, "tiny": 9103}
DEFAULT_METRICS_ADDR = "127.0.0.1"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DEFAULT_GRACE_S = 5.0
DEFAULT_LOG_LEVEL = "INFO"
DEFAULT_MODELS_DIR = "deploy/models"
DEFAULT_TRITON_ADDR = "127.0.0.1:8001"
INSTANCE_KIND_ENV = "FIELDLENS_TRITON_INSTANCE_KIND"
PEERS_ENV = "FIELDLENS_TINY_PEERS"
TRITON_INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
DEFAULT_SPECIALIST_ADDR = DEFAULT_LISTEN_ADDRS["specialist"]
DEFAULT_TINY_ADDR = DEFAULT_LISTEN_ADDRS["tiny"]
DEFAULT_REDIS_ADDR = "127.0.0.1:6379"
DEFAULT_QDRANT_PATH = ".run/qdrant"
DEFAULT_STATE_DIR = ".run/state"
DEFAULT_CACHE_TTL_S = 3600
DEFAULT_TOP_K = 5
DEFAULT_THRESHOLD = 0.5
DEFAULT_DISPATCH_TOP = 3
# A specialist pass (a second net pass) only for a category at least this likely; below it the
# tiny ensemble scores the category (its share of the answer is small either way).
DEFAULT_SPECIALIST_MIN_P = 0.2
DEFAULT_MAX_IMAGE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_PIXELS = 16_000_000
DEFAULT_STAGE_TIMEOUT_S = 1.0
# Coalesced backend calls (common/batching.py): most requests in one Triton or tiny call, and
# most such calls out at once. One request per call turns coalescing off.
DEFAULT_BATCH_MAX = 32
DEFAULT_BATCH_IN_FLIGHT = 1
# Fair share (common/limits.py; 0 turns a limit off). The defaults leave one well-behaved
# client alone (the bench drives up to 64 calls in flight over one connection) and are a
# backstop, not a tuning: per-client calls in flight, per-client calls per second and burst
# (0 = one second's worth), and the calls in flight from which the router sheds reads.
DEFAULT_CLIENT_IN_FLIGHT = 64
DEFAULT_CLIENT_RATE = 0.0
DEFAULT_CLIENT_BURST = 0
DEFAULT_SHED_IN_FLIGHT = 256
# Threads of each BLAS/OpenMP/torch pool in a serving process (common/threads.py). One: the
# maths per request is a fraction of a millisecond, and a second pool thread only spins;
# a service scales by processes (replicas, Triton instances), not by pool threads.
CPU_THREADS_ENV = "FIELDLENS_CPU_THREADS"
DEFAULT_CPU_THREADS = 1
MODEL_STORE_ENV = "FIELDLENS_MODEL_STORE"

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_T = TypeVar("_T")


class SettingsError(ValueError):
    """An environment variable is missing or malformed; the message names it and its value."""

    def __init__(self, name: str, value: str | None, problem: str) -> None:
        shown = "unset" if value is None else repr(value)
        super().__init__(f"{name}={shown}: {problem}")
        self.name = name
        self.value = value


@dataclass(frozen=True)
class CommonSettings:
    """What every fieldlens gRPC service needs to run."""

    service: ServiceName
    # host:port to bind; port 0 lets the OS pick one (tests).
    listen_addr: str
    # Port of the Prometheus /metrics endpoint; 0 disables it.
    metrics_port: int
    # Interface of the /metrics endpoint; loopback by default, 0.0.0.0 in a cluster.
    metrics_addr: str
    # Limit on one gRPC message, both directions.
    max_message_bytes: int
    # Seconds in-flight RPCs get to finish after SIGTERM.
    grace_s: float
    log_level: str
    # Root of the model artefacts (Triton repository, tiny ensemble, manifest).
    models_dir: Path
    # Durable service state: knowledge journals (and, for the router, the local blob store).
    state_dir: Path
    # Published model sets and the current one (common/model_store.py); shared by every
    # service that loads models. Default: <state_dir>/model-sets.
    model_store: Path
    # Threads of each BLAS/OpenMP/torch pool of the process (FIELDLENS_CPU_THREADS).
    cpu_threads: int = DEFAULT_CPU_THREADS
    # TLS of the port this service serves and of the hops it calls (common/tls.py).
    tls: TlsFiles = TlsFiles()
    # A second, plaintext port answering only grpc.health (Kubernetes' grpc probes cannot do
    # TLS); None = none.
    health_addr: str | None = None
    # The event loop the service runs on (common/runtime.py): uvloop, or asyncio's own.
    event_loop: EventLoop = DEFAULT_EVENT_LOOP

    @classmethod
    def from_env(cls, service: ServiceName, env: Mapping[str, str] | None = None) -> CommonSettings:
        """Read the common variables, with `service`'s defaults for address and ports."""
        env = os.environ if env is None else env
        state_dir = _read(env, "FIELDLENS_STATE_DIR", _repo_path(DEFAULT_STATE_DIR), _path)
        return cls(
            service=service,
            listen_addr=_read(
                env,
                "FIELDLENS_LISTEN_ADDR",
                DEFAULT_LISTEN_ADDRS[service],
                _address(allow_port_zero=True),
            ),
            metrics_port=_read(
                env, "FIELDLENS_METRICS_PORT", DEFAULT_METRICS_PORTS[service], _port
            ),
            metrics_addr=_read(env, "FIELDLENS_METRICS_ADDR", DEFAULT_METRICS_ADDR, _host),
            max_message_bytes=_read(
                env, "FIELDLENS_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, _positive_int
            ),
            grace_s=_read(env, "FIELDLENS_GRACE_S", DEFAULT_GRACE_S, _non_negative_float),
            log_level=_read(env, "FIELDLENS_LOG_LEVEL", DEFAULT_LOG_LEVEL, _log_level),
            models_dir=_read(env, "FIELDLENS_MODELS_DIR", _repo_path(DEFAULT_MODELS_DIR), _path),
            state_dir=state_dir,
            model_store=model_store_from_env(state_dir / "model-sets", env),
            cpu_threads=cpu_threads_from_env(env),
            tls=tls_from_env(env),
            health_addr=_read_optional(env, "FIELDLENS_HEALTH_ADDR", None, _address()),
            event_loop=_read(env, EVENT_LOOP_ENV, DEFAULT_EVENT_LOOP, event_loop),
        )


@dataclass(frozen=True)
class RouterSettings:
    """Settings of the router: its backends and the request-handling knobs."""

    common: CommonSettings
    triton_addr: str
    specialist_addr: str
    tiny_addr: str
    # None disables the result cache (REDIS_ADDR set to empty).
    redis_addr: str | None
    # None means the in-process Qdrant Edge store at qdrant_path.
    qdrant_addr: str | None
    qdrant_path: Path
    cache_ttl_s: int
    # Default number of suggestions when the request says 0.
    top_k: int
    # Default cumulative-probability threshold for the best-effort answer, in (0, 1]; None =
    # the model set's (its calibrated default, or DEFAULT_THRESHOLD for an uncalibrated set).
    threshold: float | None
    # How many of the most probable broad categories are dispatched to classifiers.
    dispatch_top: int
    # P(broad) a specialist-routed category needs for the specialist pass; below, tiny.
    specialist_min_p: float
    # Largest encoded image accepted, in bytes.
    max_image_bytes: int
    # Largest decoded image accepted, width x height; guards against decompression bombs.
    max_pixels: int
    # Time budget of each optional stage (cache, neighbours, one classifier), in seconds.
    stage_timeout_s: float
    # JSON file {category: "specialist" | "tiny"} overriding the manifest's routing; None = none.
    routing_path: Path | None
    # The shared bearer token of write RPCs, every scope (common/credentials.py); None = none.
    # With neither it nor tokens_file, writes are refused.
    write_token: str | None
    # Where exemplar image bytes are kept for re-indexing: a folder (or file:// URL).
    blob_store: str
    # Most requests whose Triton (or tiny) calls travel as one batch; 1 = no coalescing.
    batch_max: int = DEFAULT_BATCH_MAX
    # Most coalesced calls out to one backend at once; later requests queue and leave together.
    batch_in_flight: int = DEFAULT_BATCH_IN_FLIGHT
    # Whether write tokens may come over a plaintext connection (local development only: a
    # token sent in clear can be read off the wire).
    allow_plaintext_tokens: bool = False
    # Instance kind of the nets this router loads into Triton (a switched-in set): KIND_GPU on
    # a GPU node pool; "" keeps the stored config's (KIND_CPU: sets are exported on CPU).
    triton_instance_kind: str = ""
    # JSON-lines file of named, scoped write tokens (hashes only; common/credentials.py), read
    # again when it changes; None = none. A missing file holds no tokens.
    tokens_file: Path | None = None
    # Most calls of one client in flight at once; more answer RESOURCE_EXHAUSTED. 0 = no limit.
    client_in_flight: int = DEFAULT_CLIENT_IN_FLIGHT
    # Calls per second one client may start on average (token bucket); 0 = no limit.
    client_rate: float = DEFAULT_CLIENT_RATE
    # Calls a client may start at once after a pause (the bucket's size); 0 = one second's worth.
    client_burst: int = DEFAULT_CLIENT_BURST
    # Calls in flight (all clients) from which reads answer UNAVAILABLE at once; 0 = never.
    shed_in_flight: int = DEFAULT_SHED_IN_FLIGHT

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RouterSettings:
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env("router", env),
            triton_addr=_read(env, "TRITON_ADDR", DEFAULT_TRITON_ADDR, _address()),
            specialist_addr=_read(env, "SPECIALIST_ADDR", DEFAULT_SPECIALIST_ADDR, _address()),
            tiny_addr=_read(env, "TINY_ADDR", DEFAULT_TINY_ADDR, _address()),
            redis_addr=_read_optional(env, "REDIS_ADDR", DEFAULT_REDIS_ADDR, _address()),
            qdrant_addr=_read_optional(env, "QDRANT_ADDR", None, _address()),
            qdrant_path=_read(env, "QDRANT_PATH", _repo_path(DEFAULT_QDRANT_PATH), _path),
            cache_ttl_s=_read(env, "FIELDLENS_CACHE_TTL_S", DEFAULT_CACHE_TTL_S, _positive_int),
            top_k=_read(env, "FIELDLENS_TOP_K", DEFAULT_TOP_K, _positive_int),
            threshold=_read(env, "FIELDLENS_THRESHOLD", None, _probability),
            dispatch_top=_read(env, "FIELDLENS_DISPATCH_TOP", DEFAULT_DISPATCH_TOP, _positive_int),
            specialist_min_p=_read(
                env, "FIELDLENS_SPECIALIST_MIN_P", DEFAULT_SPECIALIST_MIN_P, _unit_interval
            ),
            max_image_bytes=_read(
                env, "FIELDLENS_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, _positive_int
            ),
            max_pixels=_read(env, "FIELDLENS_MAX_PIXELS", DEFAULT_MAX_PIXELS, _positive_int),
            stage_timeout_s=_read(
                env, "FIELDLENS_STAGE_TIMEOUT_S", DEFAULT_STAGE_TIMEOUT_S, _positive_float
            ),
            routing_path=_read_optional(env, "FIELDLENS_ROUTING", None, _existing_file),
            write_token=_read_optional(env, "FIELDLENS_WRITE_TOKEN", None, _token),
            tokens_file=_read_optional(env, "FIELDLENS_TOKENS_FILE", None, _path),
            blob_store=_read(env, "FIELDLENS_BLOB_STORE", "", str),
            batch_max=_read(env, "FIELDLENS_BATCH_MAX", DEFAULT_BATCH_MAX, _positive_int),
            batch_in_flight=_read(
                env, "FIELDLENS_BATCH_IN_FLIGHT", DEFAULT_BATCH_IN_FLIGHT, _positive_int
            ),
            triton_instance_kind=_read(env, INSTANCE_KIND_ENV, "", _instance_kind),
            allow_plaintext_tokens=_read(env, "FIELDLENS_ALLOW_PLAINTEXT_TOKENS", False, _flag),
            client_in_flight=_read(
                env, "FIELDLENS_CLIENT_IN_FLIGHT", DEFAULT_CLIENT_IN_FLIGHT, _non_negative_int
            ),
            client_rate=_read(
                env, "FIELDLENS_CLIENT_RATE", DEFAULT_CLIENT_RATE, _non_negative_float
            ),
            client_burst=_read(
                env, "FIELDLENS_CLIENT_BURST", DEFAULT_CLIENT_BURST, _non_negative_int
            ),
            shed_in_flight=_read(
                env, "FIELDLENS_SHED_IN_FLIGHT", DEFAULT_SHED_IN_FLIGHT, _non_negative_int
            ),
        )


@dataclass(frozen=True)
class ClassifierSettings:
    """Settings of a `Classifier` service: the specialist or the tiny-classifier service."""

    common: CommonSettings
    # Triton endpoint; the specialist runs its nets there, the tiny service does not use it.
    triton_addr: str
    # As RouterSettings.triton_instance_kind, for the nets the specialist loads.
    triton_instance_kind: str = ""
    # Tiny only: gRPC target of every tiny replica (this one may be among them); a replica
    # copies a serving peer's knowledge when it starts. "" = a lone replica.
    peers: str = ""

    @classmethod
    def from_env(
        cls, role: ClassifierRole, env: Mapping[str, str] | None = None
    ) -> ClassifierSettings:
        env = os.environ if env is None else env
        return cls(
            common=CommonSettings.from_env(role, env),
            triton_addr=_read(env, "TRITON_ADDR", DEFAULT_TRITON_ADDR, _address()),
            triton_instance_kind=_read(env, INSTANCE_KIND_ENV, "", _instance_kind),
            peers=(role == "tiny" and _read_optional(env, PEERS_ENV, None, _address())) or "",
        )


def cpu_threads_from_env(
    env: Mapping[str, str] | None = None, default: int = DEFAULT_CPU_THREADS
) -> int:
    """FIELDLENS_CPU_THREADS: threads of each BLAS/OpenMP/torch pool; `default` when unset.

    Also read on its own by processes without a CommonSettings: the Triton Python model, the
    local launcher (which passes it on to children as OMP_NUM_THREADS and the like).
    """
    env = os.environ if env is None else env
    return _read(env, CPU_THREADS_ENV, default, _positive_int)


TLS_ENV = {
    "cert": "FIELDLENS_TLS_CERT",
    "key": "FIELDLENS_TLS_KEY",
    "client_ca": "FIELDLENS_TLS_CLIENT_CA",
    "ca": "FIELDLENS_TLS_CA",
}


def tls_from_env(env: Mapping[str, str] | None = None) -> TlsFiles:
    """The TLS files named by FIELDLENS_TLS_CERT/_KEY (this service's certificate and key),
    FIELDLENS_TLS_CLIENT_CA (mTLS: its clients' CA) and FIELDLENS_TLS_CA (the CA of the
    services it calls); unset, plaintext."""
    env = os.environ if env is None else env
    paths = {f: _read_optional(env, name, None, _existing_file) for f, name in TLS_ENV.items()}
    try:
        return TlsFiles(**paths)
    except ValueError as exc:
        named = ", ".join(n for f, n in TLS_ENV.items() if paths[f] is not None) or "none"
        raise SettingsError(
            TLS_ENV["cert"], env.get(TLS_ENV["cert"]), f"{exc} (set: {named})"
        ) from None


def model_store_from_env(default: Path, env: Mapping[str, str] | None = None) -> Path:
    """FIELDLENS_MODEL_STORE: the model store (a relative path is taken from the repository
    root); `default` when unset.

    Also read on its own by the `fieldlens model-set` commands, which have no CommonSettings,
    so that they publish into and list the store the services load from.
    """
    env = os.environ if env is None else env
    return _read(env, MODEL_STORE_ENV, default, _path)


def data_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    """FIELDLENS_DATA_DIR: the Tiny ImageNet shards; DEFAULT_DATA_DIR when unset.

    The default of every `--data` option and of the tests; a relative path is taken from the
    repository root, like the Makefile's DATA.
    """
    env = os.environ if env is None else env
    return _read(env, DATA_DIR_ENV, DEFAULT_DATA_DIR, _path)


def _read(env: Mapping[str, str], name: str, default: _T, parse: Callable[[str], _T]) -> _T:
    """Parse env[name] if set, else return default; a parse failure names the variable."""
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise SettingsError(name, raw, str(exc)) from None


def _read_optional(
    env: Mapping[str, str], name: str, default: _T | None, parse: Callable[[str], _T]
) -> _T | None:
    """Like `_read`, but a set-and-empty value means "disabled" (None), not "use the default"."""
    raw = env.get(name)
    if raw is not None and raw.strip() == "":
        return None
    return _read(env, name, default, parse)


def _token(raw: str) -> str:
    if len(raw) < 16 or any(c.isspace() for c in raw):
        raise ValueError("must be at least 16 characters with no whitespace")
    return raw


def _host(raw: str) -> str:
    if not raw or any(c.isspace() for c in raw):
        raise ValueError("expected a host name or IP address")
    return raw


def _port(raw: str) -> int:
    port = _int(raw)
    if not 0 <= port <= 65535:
        raise ValueError("expected a port number in 0..65535")
    return port


def _address(allow_port_zero: bool = False) -> Callable[[str], str]:
    def parse_address(raw: str) -> str:
        host, sep, port_text = raw.rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port")
        if host.startswith("[") != host.endswith("]"):
            raise ValueError("expected host:port, with an IPv6 host in brackets")
        _host(host)
        try:
            port = _port(port_text)
        except ValueError:
            raise ValueError("expected host:port with a port number in 0..65535") from None
        if port == 0 and not allow_port_zero:
            raise ValueError("port 0 is not a reachable address")
        return raw

    return parse_address


def _flag(raw: str) -> bool:
    value = raw.lower()
    if value not in ("0", "1", "true", "false", "yes", "no"):
        raise ValueError("expected 1/0, true/false or yes/no")
    return value in ("1", "true", "yes")


def _instance_kind(raw: str) -> str:
    if raw not in ("", *TRITON_INSTANCE_KINDS):
        raise ValueError(f"expected one of {', '.join(TRITON_INSTANCE_KINDS)} (or empty)")
    return raw


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected an integer") from None


def _non_negative_int(raw: str) -> int:
    value = _int(raw)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _positive_int(raw: str) -> int:
    value = _int(raw)
    if value <= 0:
        raise ValueError("expected an integer > 0")
    return value


def _float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


def _positive_float(raw: str) -> float:
    value = _float(raw)
    if value <= 0:
        raise ValueError("expected a number > 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = _float(raw)
    if value < 0:
        raise ValueError("expected a number >= 0")
    return value


def _unit_interval(raw: str) -> float:
    value = _float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def _probability(raw: str) -> float:
    value = _float(raw)
    if not 0 < value <= 1:
        raise ValueError("expected a probability in (0, 1]")
    return value


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}")
    return level


def _repo_path(relative: str) -> Path:
    return REPO_ROOT / relative


def _path(raw: str) -> Path:
    """A relative path is taken from the repository root, so it does not depend on the cwd."""
    if not raw:
        raise ValueError("expected a path")
    path = Path(raw).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _existing_file(raw: str) -> Path:
    path = _path(raw)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path
