"""How a fieldlens process runs Python and gRPC: event loop, gRPC core I/O, garbage collector.

A cache miss costs the serving layer 1.5-2 ms of CPU at 16 requests in flight, and most of
it is machinery around our code: the grpc.aio server and clients, the event loop, the
collector (make bench, `--profile`). Three process-wide choices cut it without touching an
answer, each measured with `make bench` and a py-spy/perf profile of the router (README,
Benchmarks):

- The event loop is uvloop (libuv, written in C): asyncio's pure-Python loop spent a fifth
  of the router's CPU in `Handle._run`, the selector and transport writes. A do-nothing
  grpc.aio unary call costs the server 0.23 ms of CPU on uvloop against 0.27 ms on asyncio.
  FIELDLENS_EVENT_LOOP=asyncio runs the standard loop instead.
- gRPC's core does its socket I/O on the thread that polls the completion queue (grpc.aio's
  poller thread) instead of handing every read and write to EventEngine's own threads and back:
  two thread switches per event fewer (0.20 ms of server CPU per call instead of 0.23, 0.13
  of client CPU instead of 0.17). That is gRPC's own switch (the `event_engine_client` and
  `event_engine_listener` experiments, off), read from GRPC_EXPERIMENTS when gRPC's core
  loads, so it must be in the environment before `grpc` is imported: each service's entry
  point (`python -m fieldlens.<service>`, and the bench's) calls `configure_grpc_core` first,
  which sets it unless it is set already; an operator who sets it (even to "") gets exactly
  what they set. (Set later, it changes nothing: measured.)
- The heap a service builds while it starts (model sets, taxonomy messages, the neighbour
  store's point table) is frozen out of the collector once the service serves
  (`settle_heap`), and the youngest generation is collected every GC_GEN0_THRESHOLD
  allocations instead of 700: the router's full collections walked every one of those
  objects, about 3% of its CPU under load, 1% after.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Coroutine, MutableMapping
from typing import Any, Literal, TypeVar

EVENT_LOOP_ENV = "FIELDLENS_EVENT_LOOP"
EventLoop = Literal["uvloop", "asyncio"]
EVENT_LOOPS: tuple[EventLoop, ...] = ("uvloop", "asyncio")
DEFAULT_EVENT_LOOP: EventLoop = "uvloop"

GRPC_EXPERIMENTS_ENV = "GRPC_EXPERIMENTS"
# Prefixed with '-': turned off (gRPC's doc/environment_variables.md).
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"

# Allocations (less deallocations) of container objects between two collections of the
# youngest generation; CPython's default is 700. The older generations keep theirs.
GC_GEN0_THRESHOLD = 10_000

_T = TypeVar("_T")


def configure_grpc_core(env: MutableMapping[str, str] | None = None) -> bool:
    """Sets GRPC_EXPERIMENTS for gRPC's core (see the module docstring) unless it is set;
    call it before anything imports grpc. Returns whether it set it.

    Children started from this process inherit it; the local launcher keeps it from Triton
    (`without_fieldlens_grpc_core`).
    """
    env = os.environ if env is None else env
    if GRPC_EXPERIMENTS_ENV in env:
        return False
    env[GRPC_EXPERIMENTS_ENV] = GRPC_EXPERIMENTS
    return True


def without_fieldlens_grpc_core(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`env` without the GRPC_EXPERIMENTS that `configure_grpc_core` put there (for a process
    that is not ours, such as Triton, which keeps its own gRPC defaults); one that an operator
    set otherwise stays."""
    if env.get(GRPC_EXPERIMENTS_ENV) == GRPC_EXPERIMENTS:
        del env[GRPC_EXPERIMENTS_ENV]
    return env


def event_loop(raw: str) -> EventLoop:
    """The FIELDLENS_EVENT_LOOP value `raw`, checked (ValueError names the choices)."""
    value = raw.strip().lower()
    for choice in EVENT_LOOPS:
        if value == choice:
            return choice
    raise ValueError(f"expected one of {', '.join(EVENT_LOOPS)}")


def run(main: Coroutine[Any, Any, _T], loop: EventLoop = DEFAULT_EVENT_LOOP) -> _T:
    """Runs `main` to completion on a fresh event loop of the kind `loop` names."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    import asyncio

    return asyncio.run(main)


def running_loop_name() -> str:
    """'uvloop' or 'asyncio': the kind of the running event loop (metrics, logs)."""
    import asyncio

    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def settle_heap(gen0_threshold: int = GC_GEN0_THRESHOLD) -> int:
    """Once a service has started: collects what start-up left, freezes the survivors out of
    later collections and sets the youngest generation's threshold. Returns the number of
    objects frozen. Objects made later (a model set switched in, learned examples) are
    collected as usual; a process that calls this again freezes those too."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(gen0_threshold, older, oldest)
    return gc.get_freeze_count()
