"""CPU thread pools sized on purpose: BLAS, OpenMP and torch threads of a fieldlens process.

Library defaults give every pool one thread per core, and an idle OpenBLAS worker spins after
each call: on the tiny-classifier service a 0.03 ms matrix product cost 6-15 ms of CPU per
request through its second thread. Each process we own therefore calls `set_cpu_threads`
before it serves (`common/bootstrap.py` for the gRPC services, the Triton Python model's
`initialize`, the trainer's main).

threadpoolctl is the mechanism that works at run time: a BLAS or OpenMP library reads
OMP_NUM_THREADS and the like once, when it is loaded, so setting them after numpy's import
changes nothing for numpy. Launchers still put them in a child's environment
(`child_env`), so that its libraries do not even start a larger pool at load time; the
processes do not rely on it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from threadpoolctl import threadpool_info, threadpool_limits

from fieldlens.common.settings import CPU_THREADS_ENV, SettingsError, cpu_threads_from_env

logger = logging.getLogger(__name__)

# Read by OpenMP runtimes, OpenBLAS and MKL when they are loaded.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# Kept for the process's lifetime: the limits hold until it is restored, which nothing does.
_limits: threadpool_limits | None = None


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """OMP_NUM_THREADS and the like for a child process, from `env`'s FIELDLENS_CPU_THREADS.

    Empty when the setting is malformed: the child then exits with the settings' message
    rather than the launcher failing on it first.
    """
    try:
        threads = cpu_threads_from_env(os.environ if env is None else env)
    except SettingsError:
        return {}
    return _library_env(threads)


def set_cpu_threads(threads: int, source: str = CPU_THREADS_ENV) -> str:
    """Limits every BLAS/OpenMP pool loaded in this process, and torch's, to `threads`.

    torch's intra- and inter-op pools are set only when torch is already imported (a service
    that does not use torch does not pay its import). OMP_NUM_THREADS and the like are set
    too, for libraries loaded later and for child processes. Logs the pools found (library,
    threads) at INFO and returns that line.

    Args:
        threads: Threads per pool, at least 1.
        source: Where the count came from, for the log line.
    """
    global _limits
    if threads < 1:
        raise ValueError(f"thread count must be at least 1, got {threads}")
    _limits = threadpool_limits(limits=threads)
    torch_threads = _set_torch_threads(threads)
    os.environ.update(_library_env(threads))
    pools = threadpool_info()
    torch_text = ""
    if torch_threads is not None:
        torch_text = f"; torch intra-op={torch_threads[0]} inter-op={torch_threads[1]}"
    libraries = ", ".join(_describe(pool) for pool in pools) or "no BLAS/OpenMP library loaded"
    summary = f"CPU threads {threads} ({source}): {libraries}{torch_text}"
    logger.info("%s", summary)
    for pool in pools:
        if pool["num_threads"] > threads:
            logger.warning("%s kept %d threads", _describe(pool), pool["num_threads"])
    return summary


def _library_env(threads: int) -> dict[str, str]:
    return dict.fromkeys(THREAD_ENV_VARS, str(threads))


def _set_torch_threads(threads: int) -> tuple[int, int] | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        # Settable once, before the first inter-op parallel work; intra-op is what matters.
        pass
    return torch.get_num_threads(), torch.get_num_interop_threads()


def _describe(pool: Mapping[str, Any]) -> str:
    library = os.path.basename(pool["filepath"])
    return f"{pool['internal_api']}={pool['num_threads']} [{library}]"
