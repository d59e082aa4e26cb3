"""Command line, environment and readiness probe for the tritonserver shipped in nvidia-pytriton."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import site
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fieldlens.common import threads

logger = logging.getLogger(__name__)

BINARY_ENV = "FIELDLENS_TRITONSERVER"
STUB_NAME = "triton_python_backend_stub"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_READY_TIMEOUT_S = 180.0
# The Python backend's default is 64 MiB of /dev/shm per model instance; our largest tensor
# (64 x 64x64x3 uint8) is 0.75 MiB, and the region grows on demand anyway.
DEFAULT_SHM_BYTES = 4 * 1024 * 1024
_POLL_S = 0.25


@dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the pytriton-bundled Triton live on disk."""

    binary: Path
    python_backend: Path
    stub: Path
    libs: Path


def _pytriton_dir() -> Path:
    # find_spec avoids importing pytriton, whose package import pulls in a lot.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed; it ships tritonserver")
    return Path(next(iter(spec.submodule_search_locations)))


def locate_tritonserver() -> TritonDistribution:
    """Find the tritonserver binary, Python backend, matching stub and bundled libraries."""
    root = _pytriton_dir()
    dist = root / "tritonserver"
    override = os.environ.get(BINARY_ENV)
    binary = Path(override) if override else dist / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonDistribution(
        binary=binary,
        python_backend=dist / "backends" / "python",
        stub=dist / "python_backend_stubs" / version / STUB_NAME,
        libs=root.parent / "nvidia_pytriton.libs",
    )
    for path in (found.binary, found.python_backend, found.stub):
        if not path.exists():
            raise FileNotFoundError(f"tritonserver distribution incomplete: {path} is missing")
    return found


def prepare_backend_directory(dest: str | os.PathLike[str]) -> Path:
    """Assemble a `--backend-directory` whose python backend has this interpreter's stub.

    The wheel keeps one stub per Python version apart from the backend (pytriton copies the
    right one in at start-up); Triton expects it next to libtriton_python.so. Idempotent.
    """
    dist = locate_tritonserver()
    backend_dir = Path(dest)
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = [p for p in dist.python_backend.iterdir() if p.is_file()] + [dist.stub]
    for src in sources:
        target = python_dir / src.name
        st = src.stat()
        if target.exists() and target.stat().st_size == st.st_size:
            if target.stat().st_mtime >= st.st_mtime:
                continue
        shutil.copy2(src, target)
    return backend_dir


def _services_dir() -> Path:
    # The stub's embedded interpreter does not process the venv's .pth files, so an editable
    # install of fieldlens is invisible to it unless its parent directory is on PYTHONPATH.
    return Path(__file__).resolve().parents[2]


def _prepend(paths: Iterable[str], existing: str | None) -> str:
    parts: list[str] = []
    for p in [*paths, *(existing.split(os.pathsep) if existing else [])]:
        if p and p not in parts:
            parts.append(p)
    return os.pathsep.join(parts)


def stub_environment(base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment under which the Python-backend stub embeds *this* interpreter.

    The stub links libpython3.11.so.1.0: the interpreter's own LIBDIR must come first on
    LD_LIBRARY_PATH or a system libpython of another patch level is loaded and fails. It also
    needs the venv's site-packages (torch, numpy) and the fieldlens sources on PYTHONPATH.
    OMP_NUM_THREADS and the like follow FIELDLENS_CPU_THREADS, so that the stub's libraries
    start no wider pool at load; the model then sizes its pools itself (common/threads.py).
    """
    env = dict(os.environ if base_env is None else base_env)
    env.update(threads.child_env(env))
    dist = locate_tritonserver()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = _prepend([libdir, str(dist.libs)], env.get("LD_LIBRARY_PATH"))
    env["PYTHONPATH"] = _prepend(
        [str(_services_dir()), *site.getsitepackages()], env.get("PYTHONPATH")
    )
    env["PATH"] = _prepend([str(Path(sys.executable).parent)], env.get("PATH"))
    return env


SHM_DIR = Path("/dev/shm")


def shm_prefix_for(grpc_port: int) -> str:
    """The Python backend's shared-memory region prefix of the server on `grpc_port`."""
    return f"fieldlens_{grpc_port}_"


def remove_shm_regions(prefix: str, shm_dir: Path = SHM_DIR) -> int:
    """Removes the Python backend's shared-memory regions named `prefix*`; returns how many.

    A server that exits cleanly removes its own; one killed (SIGKILL, OOM) leaves them, and
    /dev/shm is memory: each run of a local cluster on fresh ports would leak a few MiB per
    model instance. Call it only when no server with this prefix runs.
    """
    removed = 0
    for region in shm_dir.glob(f"{prefix}*"):
        try:
            region.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def build_command(
    model_repository: str | os.PathLike[str],
    backend_directory: str | os.PathLike[str],
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    host: str = DEFAULT_HOST,
    models: Sequence[str] = ("*",),
    shm_prefix: str | None = None,
    shm_bytes: int = DEFAULT_SHM_BYTES,
    log_verbose: int = 0,
    base_env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and environment to run tritonserver over `model_repository`.

    Explicit model control lets a later model set be loaded and swapped without a restart;
    `models` are loaded at start-up (`*` = every model in the repository).

    Args:
        model_repository: Triton model repository directory.
        backend_directory: a directory prepared by `prepare_backend_directory`.
        grpc_port: KServe v2 gRPC port.
        http_port: KServe v2 HTTP port (readiness probes use it).
        metrics_port: Prometheus metrics port.
        host: address all three endpoints bind to.
        models: models to load at start-up.
        shm_prefix: Python-backend shared-memory region prefix; must differ between servers
            running at the same time on one host, so it defaults to one derived from the port.
        shm_bytes: initial and growth size of each instance's shared-memory region.
        log_verbose: tritonserver verbosity level.
        base_env: environment to extend (default: this process's).
    """
    dist = locate_tritonserver()
    prefix = shm_prefix or shm_prefix_for(grpc_port)
    argv = [
        str(dist.binary),
        f"--model-repository={Path(model_repository).resolve()}",
        f"--backend-directory={Path(backend_directory).resolve()}",
        "--model-control-mode=explicit",
        *(f"--load-model={m}" for m in models),
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--http-address={host}",
        f"--http-port={http_port}",
        # CPU only here: skip the pinned host-memory pool, which needs a CUDA driver.
        "--pinned-memory-pool-byte-size=0",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        f"--backend-config=python,shm-region-prefix-name={prefix}",
        f"--backend-config=python,shm-default-byte-size={shm_bytes}",
        f"--backend-config=python,shm-growth-byte-size={shm_bytes}",
        f"--log-verbose={log_verbose}",
    ]
    return argv, stub_environment(base_env)


def repository_models(model_repository: str | os.PathLike[str]) -> list[str]:
    """Names of the models in a repository (directories holding a config.pbtxt)."""
    root = Path(model_repository)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.pbtxt").is_file())


def _http_base(url: str) -> str:
    return url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"


def _get_ok(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def is_ready(url: str, models: Iterable[str] = (), timeout_s: float = 1.0) -> bool:
    """True when the server at `url` (HTTP host:port) and every model in `models` are ready."""
    base = _http_base(url)
    if not _get_ok(f"{base}/v2/health/ready", timeout_s):
        return False
    return all(_get_ok(f"{base}/v2/models/{m}/ready", timeout_s) for m in models)


def not_ready_models(url: str, models: Iterable[str], timeout_s: float = 1.0) -> list[str]:
    """The subset of `models` that the server at `url` does not report ready."""
    base = _http_base(url)
    return [m for m in models if not _get_ok(f"{base}/v2/models/{m}/ready", timeout_s)]


def model_index(url: str, timeout_s: float = 2.0) -> list[dict[str, str]]:
    """The server's repository index (name, version, state, reason per model)."""
    req = urllib.request.Request(f"{_http_base(url)}/v2/repository/index", data=b"{}")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        index: list[dict[str, str]] = json.loads(resp.read() or b"[]")
    return index


def wait_ready(
    url: str,
    timeout: float = DEFAULT_READY_TIMEOUT_S,
    models: Iterable[str] = (),
    is_alive: Callable[[], bool] | None = None,
) -> None:
    """Block until the server at `url` (HTTP host:port) and `models` are ready.

    Raises:
        TimeoutError: not ready within `timeout` seconds.
        RuntimeError: `is_alive` reported the process gone (e.g. a model failed to load and
            --exit-on-error stopped the server).
    """
    wanted = list(models)
    deadline = time.monotonic() + timeout
    while True:
        if is_ready(url, wanted):
            logger.info("tritonserver at %s ready (%d models checked)", url, len(wanted))
            return
        if is_alive is not None and not is_alive():
            raise RuntimeError(f"tritonserver at {url} exited before becoming ready")
        if time.monotonic() >= deadline:
            missing = not_ready_models(url, wanted)
            detail = f"; models not ready: {missing}" if missing else ""
            raise TimeoutError(f"tritonserver at {url} not ready after {timeout:.0f}s{detail}")
        time.sleep(_POLL_S)
