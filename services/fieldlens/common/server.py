"""grpc.aio server bootstrap with health, reflection, message limits and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fieldlens.common import runtime
from fieldlens.common.interceptors import default_interceptors
from fieldlens.common.runtime import DEFAULT_EVENT_LOOP, EventLoop
from fieldlens.common.settings import DEFAULT_GRACE_S, DEFAULT_MAX_MESSAGE_BYTES
from fieldlens.common.telemetry import configure_logging
from fieldlens.common.tls import TlsFiles, server_credentials

logger = logging.getLogger(__name__)

# (add_XServicer_to_server, servicer) as produced by the generated *_pb2_grpc modules.
ServicerRegistration = tuple[Callable[[Any, aio.Server], None], object]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
MAX_CONNECTION_AGE_MS = 5 * 60 * 1000
MAX_CONNECTION_AGE_GRACE_MS = 30 * 1000


class GrpcServer:
    """A grpc.aio server with the standard health and reflection services.

    Health reports each of `service_names` and the overall status "" (SERVING only while every
    named service is), so Kubernetes' `grpc:` probes and grpcurl work without extra code.

    Args:
        listen_addr: host:port to bind; port 0 picks a free port (see `start`).
        servicers: (add_servicer_fn, servicer) pairs to register.
        service_names: Fully-qualified names of the services in `servicers`, e.g.
            "fieldlens.v1.Classifier"; used for health and reflection.
        max_message_bytes: Limit on one message, received or sent; larger requests fail with
            RESOURCE_EXHAUSTED before reaching a handler.
        interceptors: Server interceptors, outermost first; None means `default_interceptors()`.
        grace_s: Default seconds in-flight RPCs get to finish in `stop`.
        serving_at_start: Initial health of the named services. Pass False when the service
            must first check its dependencies, then call `set_serving(name, True)`.
        tls: The port serves TLS (mTLS with a client CA) when these name a certificate.
        health_addr: host:port of a second, plaintext port that answers only grpc.health
            (Kubernetes' grpc probes cannot speak TLS); None = none.
    """

    def __init__(
        self,
        listen_addr: str,
        servicers: Sequence[ServicerRegistration],
        service_names: Sequence[str],
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        interceptors: Sequence[aio.ServerInterceptor] | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        serving_at_start: bool = True,
        tls: TlsFiles | None = None,
        health_addr: str | None = None,
    ) -> None:
        self.listen_addr = listen_addr
        self._servicers = list(servicers)
        self.service_names = tuple(service_names)
        self.max_message_bytes = max_message_bytes
        self._interceptors = default_interceptors() if interceptors is None else list(interceptors)
        self.grace_s = grace_s
        self._serving = dict.fromkeys(self.service_names, serving_at_start)
        self._health = health.aio.HealthServicer()
        self._server: aio.Server | None = None
        self._port: int | None = None
        self._tls = tls or TlsFiles()
        self.health_addr = health_addr
        self._health_server: aio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port; only valid after `start`."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def health_servicer(self) -> health.aio.HealthServicer:
        return self._health

    async def start(self) -> int:
        """Build, bind and start the server; return the bound port."""
        if self._server is not None:
            raise RuntimeError("server already started")
        server = aio.server(
            interceptors=self._interceptors,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                # Without this a second instance on the same port binds too and silently
                # takes half the connections; failing to bind is the honest outcome.
                ("grpc.so_reuseport", 0),
                # Recycle connections so round-robin clients discover new pods after a scale-up.
                ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
                ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
            ],
        )
        for add_servicer, servicer in self._servicers:
            add_servicer(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = _bind(server, self.listen_addr, self._tls)
        await self._publish_health()
        if self.health_addr is not None:
            self._health_server = aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            _bind(self._health_server, self.health_addr, None)
            await self._health_server.start()
        await server.start()
        self._server, self._port = server, port
        logger.info(
            "serving %s on %s (port %d, %s)",
            ", ".join(self.service_names),
            self.listen_addr,
            port,
            ("mTLS" if self._tls.client_ca else "TLS") if self._tls.serves else "plaintext",
        )
        return port

    async def set_serving(self, service: str, serving: bool) -> None:
        """Set one service's health; the overall "" status follows all of them."""
        if service not in self._serving:
            raise KeyError(f"unknown service {service!r}; known: {self.service_names}")
        if self._serving[service] != serving:
            logger.info("%s is %s", service, "SERVING" if serving else "NOT_SERVING")
        self._serving[service] = serving
        await self._publish_health()

    async def set_all_serving(self, serving: bool) -> None:
        """Set every named service's health at once."""
        for service in self.service_names:
            self._serving[service] = serving
        await self._publish_health()

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING everywhere, then let in-flight RPCs finish for `grace` seconds."""
        if self._server is None:
            return
        grace_s = self.grace_s if grace is None else grace
        logger.info("stopping; %.1f s grace for in-flight RPCs", grace_s)
        # Health first, so probes and load balancers stop sending before the port closes.
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        self._server = None
        if self._health_server is not None:
            await self._health_server.stop(None)
            self._health_server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _publish_health(self) -> None:
        for service, serving in self._serving.items():
            await self._health.set(service, _SERVING if serving else _NOT_SERVING)
        overall = all(self._serving.values())
        await self._health.set(health.OVERALL_HEALTH, _SERVING if overall else _NOT_SERVING)


def _bind(server: aio.Server, addr: str, tls: TlsFiles | None) -> int:
    try:
        if tls is not None and tls.serves:
            port = server.add_secure_port(addr, server_credentials(tls))
        else:
            port = server.add_insecure_port(addr)
    except RuntimeError as exc:
        raise OSError(f"cannot bind {addr}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot bind {addr}")
    return port


async def serve_until_signal(
    server: GrpcServer,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    *,
    signals: Iterable[signal.Signals] = _STOP_SIGNALS,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Wait for SIGTERM/SIGINT (or `stop_event`), then stop `server` gracefully.

    `on_stop` runs after the server has stopped, to close clients the handlers were using.
    """
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    installed = []
    for sig in signals:
        loop.add_signal_handler(sig, _on_signal, sig, stop)
        installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.stop()
        if on_stop is not None:
            await on_stop()
    logger.info("stopped")


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    logger.info("received %s", sig.name)
    stop.set()


def run_service(
    main: Coroutine[Any, Any, None],
    log_level: str | int = "INFO",
    event_loop: EventLoop = DEFAULT_EVENT_LOOP,
) -> None:
    """Entry-point helper: configure logging, then run `main` on a fresh event loop of the
    kind `event_loop` names (common/runtime.py)."""
    configure_logging(log_level)
    runtime.run(main, event_loop)
