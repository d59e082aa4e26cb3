"""Service bootstrap shared by every fieldlens process: server, metrics, honest health, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from grpc import aio

from fieldlens.common.runtime import GRPC_EXPERIMENTS_ENV, running_loop_name, settle_heap
from fieldlens.common.server import GrpcServer, ServicerRegistration, serve_until_signal
from fieldlens.common.settings import CommonSettings, SettingsError
from fieldlens.common.telemetry import configure_logging, get_metrics, start_metrics_server
from fieldlens.common.threads import set_cpu_threads

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 2.0


async def serve_grpc(
    common: CommonSettings,
    registration: ServicerRegistration,
    service_name: str,
    ready: Callable[[], Awaitable[bool]] | None = None,
    on_close: Callable[[], Awaitable[None]] | None = None,
    *,
    interceptors: Sequence[aio.ServerInterceptor] | None = None,
) -> None:
    """Runs one service until SIGTERM/SIGINT.

    Args:
        common: Listen address, limits, grace and metrics port.
        registration: (add_servicer_fn, servicer).
        service_name: Fully-qualified gRPC service name, reported by health and reflection.
        ready: Polled every few seconds; health is SERVING only while it returns True (the
            dependencies the service cannot do without answer). None means always ready.
        on_close: Closes clients after the server has stopped.
        interceptors: The server's interceptors; None = `default_interceptors()` (the router
            passes its admission control, common/limits.py, to them).
    """
    metrics = start_metrics_server(common.metrics_port, common.metrics_addr)
    server = GrpcServer(
        common.listen_addr,
        [registration],
        [service_name],
        max_message_bytes=common.max_message_bytes,
        grace_s=common.grace_s,
        serving_at_start=ready is None,
        tls=common.tls,
        health_addr=common.health_addr,
        interceptors=interceptors,
    )
    port = await server.start()
    logger.info("%s listening on port %d", service_name, port)

    async def watch() -> None:
        assert ready is not None
        while True:
            try:
                ok = await ready()
            except Exception:  # a failing probe means not ready, never a dead watcher
                logger.exception("readiness check of %s failed", service_name)
                ok = False
            await server.set_serving(service_name, ok)
            await asyncio.sleep(HEALTH_INTERVAL_S)

    watcher = asyncio.create_task(watch()) if ready is not None else None
    # Started: what start-up built stays for the process's life, so the collector stops
    # walking it (common/runtime.py).
    frozen = settle_heap()
    loop, experiments = running_loop_name(), os.environ.get(GRPC_EXPERIMENTS_ENV, "")
    get_metrics().runtime.labels(
        event_loop=loop, grpc_experiments=experiments, gc_frozen=str(frozen)
    ).set(1)
    logger.info(
        "%s runs on %s; gRPC core experiments %r; %d start-up objects frozen out of the collector",
        service_name,
        loop,
        experiments,
        frozen,
    )

    async def close() -> None:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if on_close is not None:
            await on_close()
        if metrics is not None:
            metrics.close()

    await serve_until_signal(server, close)


def main_with_settings(
    name: str, load: Callable[[], Any], serve: Callable[[Any], Coroutine[Any, Any, None]]
) -> None:
    """Reads settings once (failing fast with exit code 2), sizes the CPU thread pools, then
    runs `serve(settings)`.

    The pools are limited before `serve` does any maths: the modules imported so far load
    numpy, and with it OpenBLAS and its pool (sized by OPENBLAS_NUM_THREADS where a launcher
    set it), but compute nothing at import, so a thread beyond the limit is never woken.
    """
    from fieldlens.common.server import run_service

    try:
        settings = load()
    except SettingsError as exc:
        print(f"{name}: {exc}", flush=True)
        raise SystemExit(2) from None
    configure_logging(settings.common.log_level)
    set_cpu_threads(settings.common.cpu_threads)
    run_service(serve(settings), settings.common.log_level, settings.common.event_loop)
