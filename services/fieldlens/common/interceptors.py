"""grpc.aio server interceptors: domain errors to status codes, Prometheus metrics, logging."""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeAlias

import grpc
from grpc import aio

from fieldlens.common.errors import FieldlensError
from fieldlens.common.telemetry import Metrics, get_metrics

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal error"

_Context: TypeAlias = "aio.ServicerContext[Any, Any]"
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# Opens around one call of a handler; what it does on the way in and out is the interceptor.
_CallScope: TypeAlias = "Callable[[_Context], AbstractAsyncContextManager[None]]"
_Behaviour: TypeAlias = Callable[..., Any]


def split_method(full_method: str) -> tuple[str, str]:
    """Split "/pkg.Service/Method" into ("pkg.Service", "Method")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def default_interceptors(metrics: Metrics | None = None) -> list[aio.ServerInterceptor]:
    """The standard chain, outermost first.

    gRPC runs the first interceptor outermost, so logging and metrics observe the status code
    that ExceptionToStatusInterceptor mapped the domain error to.
    """
    return [LoggingInterceptor(), MetricsInterceptor(metrics), ExceptionToStatusInterceptor()]


class _ScopedInterceptor(aio.ServerInterceptor):
    """Runs every call of every handler kind inside `_scope`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method

        def scope(context: _Context) -> AbstractAsyncContextManager[None]:
            return self._scope(method, context)

        return _wrap_handler(handler, scope)

    @abc.abstractmethod
    def _scope(self, method: str, context: _Context) -> AbstractAsyncContextManager[None]:
        """Context entered around one call of `method`."""


class ExceptionToStatusInterceptor(_ScopedInterceptor):
    """The one place where exceptions become gRPC status codes.

    A `FieldlensError` becomes its `code` with its message as details. Any other exception is
    a bug: it is logged with its traceback and the client gets INTERNAL with a generic message,
    so internals do not leak. Aborts and cancellations pass through untouched.
    """

    @asynccontextmanager
    async def _scope(self, method: str, context: _Context) -> AsyncIterator[None]:
        try:
            yield
        except aio.AbortError:
            raise
        except FieldlensError as exc:
            await context.abort(exc.code, exc.message)
        except Exception:
            logger.exception("unhandled error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)


class MetricsInterceptor(_ScopedInterceptor):
    """Counts requests by final status code and times them.

    Args:
        metrics: Collectors to update; default `get_metrics()` (the global registry).
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    @asynccontextmanager
    async def _scope(self, method: str, context: _Context) -> AsyncIterator[None]:
        metrics = self._metrics or get_metrics()
        service, name = split_method(method)
        start = time.perf_counter()

        def record(code: grpc.StatusCode) -> None:
            metrics.grpc_requests.labels(service=service, method=name, code=code.name).inc()
            metrics.grpc_duration.labels(service=service, method=name).observe(
                time.perf_counter() - start
            )

        async with _StatusWatch(context, record):
            yield


class LoggingInterceptor(_ScopedInterceptor):
    """Logs every request at debug level and every non-OK outcome as a warning."""

    @asynccontextmanager
    async def _scope(self, method: str, context: _Context) -> AsyncIterator[None]:
        start = time.perf_counter()

        def log(code: grpc.StatusCode) -> None:
            elapsed_ms = (time.perf_counter() - start) * 1e3
            if code is grpc.StatusCode.OK:
                logger.debug("%s OK in %.1f ms", method, elapsed_ms)
            else:
                logger.warning(
                    "%s %s in %.1f ms: %s", method, code.name, elapsed_ms, _details(context)
                )

        async with _StatusWatch(context, log):
            yield


class _StatusWatch:
    """Reports the status code a call ends with to `on_done`, without altering the outcome."""

    def __init__(self, context: _Context, on_done: Callable[[grpc.StatusCode], None]) -> None:
        self._context = context
        self._on_done = on_done

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        if exc_type is None:
            code = _context_code(self._context) or grpc.StatusCode.OK
        elif issubclass(exc_type, aio.AbortError):
            code = _context_code(self._context) or grpc.StatusCode.UNKNOWN
        elif issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.CANCELLED
        else:
            # What grpc itself reports for an exception that no interceptor mapped.
            code = grpc.StatusCode.UNKNOWN
        self._on_done(code)
        return False


def _context_code(context: _Context) -> grpc.StatusCode | None:
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    # Some grpc versions return the numeric code set by abort()/set_code().
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def _details(context: _Context) -> str:
    details = context.details()
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details or ""


def _wrap_handler(handler: _Handler, scope: _CallScope) -> _Handler:
    """Return a copy of `handler` whose behaviour runs inside `scope`, for all four kinds."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(handler.unary_unary, scope),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(handler.stream_unary, scope),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(handler.unary_stream, scope),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(handler.stream_stream, scope),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _wrap_unary_response(behaviour: _Behaviour, scope: _CallScope) -> _Behaviour:
    async def wrapped(request: Any, context: _Context) -> Any:
        async with scope(context):
            result = behaviour(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result

    return wrapped


def _wrap_stream_response(behaviour: _Behaviour, scope: _CallScope) -> _Behaviour:
    # The wrapper must keep the handler's style: grpc.aio treats an async generator as the
    # response stream, and a coroutine as a handler that writes with context.write().
    if inspect.isasyncgenfunction(behaviour):

        async def wrapped_agen(request: Any, context: _Context) -> AsyncIterator[Any]:
            async with scope(context):
                async for response in behaviour(request, context):
                    yield response

        return wrapped_agen

    if inspect.iscoroutinefunction(behaviour):

        async def wrapped_coro(request: Any, context: _Context) -> None:
            async with scope(context):
                await behaviour(request, context)

        return wrapped_coro

    async def wrapped_iter(request: Any, context: _Context) -> AsyncIterator[Any]:
        async with scope(context):
            for response in behaviour(request, context):
                yield response

    return wrapped_iter
