"""The grpc.aio server interceptor of every fieldlens service: domain errors to status codes,
Prometheus metrics and logging, in one layer."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from grpc import aio

from fieldlens.common.errors import FieldlensError
from fieldlens.common.telemetry import Metrics, get_metrics

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal error"

_Context: TypeAlias = "aio.ServicerContext[Any, Any]"
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_Behaviour: TypeAlias = Callable[..., Any]
# Admission control (common/limits.py): for one method, the function the interceptor calls with
# each call's context before the handler runs; it raises a FieldlensError to refuse the call,
# or returns what frees the call's place when it ends.
Admit: TypeAlias = Callable[[_Context], Callable[[], None]]
# Method ("/pkg.Service/Method") -> its Admit, or None for a method that is not admitted.
Admission: TypeAlias = Callable[[str], Admit | None]


def split_method(full_method: str) -> tuple[str, str]:
    """Split "/pkg.Service/Method" into ("pkg.Service", "Method")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def default_interceptors(
    metrics: Metrics | None = None, admission: Admission | None = None
) -> list[aio.ServerInterceptor]:
    """The standard chain: one ExceptionToStatusInterceptor."""
    return [ExceptionToStatusInterceptor(metrics, admission)]


class ExceptionToStatusInterceptor(aio.ServerInterceptor):
    """The one place where exceptions become gRPC status codes; it also observes every call.

    A `FieldlensError` becomes its `code` with its message as details. Any other exception is
    a bug: it is logged with its traceback and the client gets INTERNAL with a generic message,
    so internals do not leak. Aborts and cancellations pass through untouched. Every call is
    then counted by its final status code and timed (`fieldlens_grpc_requests_total`,
    `fieldlens_grpc_request_duration_seconds`), and logged: at debug level when OK, as a
    warning otherwise.

    One interceptor rather than one per concern: grpc.aio runs each interceptor's wrapper on
    every call, and the router answers hundreds a second on a shared core. Wrapped handlers are
    built once per method and reused. For the same reason admission control (per-client limits,
    load shedding) is a hook of this interceptor rather than one of its own: a refused call is
    mapped, counted and logged like any other failure.

    Args:
        metrics: Collectors to update; default `get_metrics()` (the global registry).
        admission: Admits or refuses each call before its handler runs; None admits all.
    """

    def __init__(self, metrics: Metrics | None = None, admission: Admission | None = None) -> None:
        self._metrics = metrics
        self._admission = admission
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        admit = self._admission(method) if self._admission is not None else None
        wrapped = _wrap_handler(handler, _Call(method, self._metrics or get_metrics(), admit))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class _Call:
    """What the interceptor does around each call of one method."""

    def __init__(self, method: str, metrics: Metrics, admit: Admit | None = None) -> None:
        self.method = method
        self.service, self.name = split_method(method)
        self.metrics = metrics
        self.admit = admit

    async def failed(self, exc: Exception, context: _Context) -> aio.AbortError:
        """Aborts the call with the status `exc` maps to; returns the abort to raise."""
        try:
            if isinstance(exc, FieldlensError):
                await context.abort(exc.code, exc.message, exc.trailing_metadata)
            else:
                logger.exception("unhandled error in %s", self.method)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)
        except aio.AbortError as abort:
            return abort
        raise RuntimeError("context.abort() returned")  # grpc.aio always raises there

    def done(self, context: _Context, started: float, exc: BaseException | None) -> None:
        """Counts, times and logs one finished call."""
        if exc is None:
            code = _context_code(context) or grpc.StatusCode.OK
        elif isinstance(exc, aio.AbortError):
            code = _context_code(context) or grpc.StatusCode.UNKNOWN
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            code = grpc.StatusCode.CANCELLED
        else:
            # What grpc itself reports for an exception that nothing mapped.
            code = grpc.StatusCode.UNKNOWN
        seconds = time.perf_counter() - started
        self.metrics.record_request(self.service, self.name, code.name, seconds)
        if code is grpc.StatusCode.OK:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s OK in %.1f ms", self.method, seconds * 1e3)
        else:
            logger.warning(
                "%s %s in %.1f ms: %s", self.method, code.name, seconds * 1e3, _details(context)
            )


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


def _wrap_handler(handler: _Handler, call: _Call) -> _Handler:
    """A copy of `handler` whose behaviour runs inside `call`, for all four kinds."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(handler.unary_unary, call),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(handler.stream_unary, call),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(handler.unary_stream, call),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(handler.stream_stream, call),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _wrap_unary_response(behaviour: _Behaviour, call: _Call) -> _Behaviour:
    async def wrapped(request: Any, context: _Context) -> Any:
        started = time.perf_counter()
        outcome: BaseException | None = None
        release = None
        try:
            if call.admit is not None:
                release = call.admit(context)
            result = behaviour(request, context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except (aio.AbortError, asyncio.CancelledError) as exc:
            outcome = exc
            raise
        except Exception as exc:
            outcome = await call.failed(exc, context)
            raise outcome from None
        finally:
            if release is not None:
                release()
            call.done(context, started, outcome)

    return wrapped


def _wrap_stream_response(behaviour: _Behaviour, call: _Call) -> _Behaviour:
    # The wrapper must keep the handler's style: grpc.aio treats an async generator as the
    # response stream, and a coroutine as a handler that writes with context.write().
    if inspect.iscoroutinefunction(behaviour):

        async def wrapped_coro(request: Any, context: _Context) -> None:
            await _wrap_unary_response(behaviour, call)(request, context)

        return wrapped_coro

    async def wrapped_stream(request: Any, context: _Context) -> AsyncIterator[Any]:
        started = time.perf_counter()
        outcome: BaseException | None = None
        release = None
        try:
            if call.admit is not None:
                release = call.admit(context)
            responses = behaviour(request, context)
            if inspect.isasyncgen(responses):
                async for response in responses:
                    yield response
            else:
                for response in responses:
                    yield response
        except (aio.AbortError, asyncio.CancelledError, GeneratorExit) as exc:
            outcome = exc
            raise
        except Exception as exc:
            outcome = await call.failed(exc, context)
            raise outcome from None
        finally:
            if release is not None:
                release()
            call.done(context, started, outcome)

    return wrapped_stream
