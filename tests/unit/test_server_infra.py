"""GrpcServer, interceptors and telemetry against a real grpc.aio server on a free port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import CollectorRegistry

from fieldlens.common import errors
from fieldlens.common.interceptors import INTERNAL_ERROR_MESSAGE, default_interceptors
from fieldlens.common.server import GrpcServer, serve_until_signal
from fieldlens.common.telemetry import (
    Metrics,
    StageTimer,
    get_metrics,
    start_metrics_server,
)
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc, router_pb2, router_pb2_grpc

CLASSIFIER = "fieldlens.v1.Classifier"
ROUTER = "fieldlens.v1.Router"
RAW = "test.Raw"
SECRET = "secret internal detail"


class _Classifier(classifier_pb2_grpc.ClassifierServicer):
    async def Classify(
        self, request: classifier_pb2.CategoryRequest, context: aio.ServicerContext
    ) -> classifier_pb2.CategoryResponse:
        if request.category == "bad":
            raise errors.InvalidInput("category 'bad' is not served here")
        if request.category == "boom":
            raise RuntimeError(SECRET)
        if request.category == "denied":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "aborted by hand")
        return classifier_pb2.CategoryResponse(
            category=request.category,
            scores=[classifier_pb2.ScoredTaxon(taxon_id="n01443537", probability=0.9, leaf=True)],
            served_by=classifier_pb2.TINY,
        )


class _Router(router_pb2_grpc.RouterServicer):
    async def ClassifyStream(
        self, request_iterator: AsyncIterator[router_pb2.ClassifyRequest], context: Any
    ) -> AsyncIterator[router_pb2.ClassifyResponse]:
        async for request in request_iterator:
            if request.request_id == "bad":
                raise errors.InvalidInput("item 'bad' rejected")
            yield router_pb2.ClassifyResponse(request_id=request.request_id)

    async def IndexExemplars(
        self, request_iterator: AsyncIterator[router_pb2.IndexExemplarsRequest], context: Any
    ) -> router_pb2.IndexExemplarsResponse:
        async for _ in request_iterator:
            raise errors.Unavailable("vector store is down")
        return router_pb2.IndexExemplarsResponse()


async def _unary_stream_not_found(
    request: bytes, context: aio.ServicerContext
) -> AsyncIterator[bytes]:
    yield b"first"
    raise errors.NotFound("no such taxon")


async def _unary_stream_write_boom(request: bytes, context: aio.ServicerContext) -> None:
    await context.write(b"first")
    raise RuntimeError(SECRET)


def _raw_handlers() -> grpc.GenericRpcHandler:
    # unary-stream handlers in both aio styles (async generator, context.write coroutine);
    # the fieldlens protos have no unary-stream RPC, so raw bytes stand in.
    return grpc.method_handlers_generic_handler(
        RAW,
        {
            "Gen": grpc.unary_stream_rpc_method_handler(_unary_stream_not_found),
            "Write": grpc.unary_stream_rpc_method_handler(_unary_stream_write_boom),
        },
    )


def _add_generic(handler: grpc.GenericRpcHandler, server: aio.Server) -> None:
    server.add_generic_rpc_handlers((handler,))


@dataclass
class _Running:
    server: GrpcServer
    channel: aio.Channel
    metrics: Metrics
    target: str

    def requests(self, service: str, method: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "fieldlens_grpc_requests_total", {"service": service, "method": method, "code": code}
        )
        return value or 0.0


@asynccontextmanager
async def _running(**kwargs: Any) -> AsyncIterator[_Running]:
    metrics = get_metrics(CollectorRegistry())
    server = GrpcServer(
        "127.0.0.1:0",
        [
            (classifier_pb2_grpc.add_ClassifierServicer_to_server, _Classifier()),
            (router_pb2_grpc.add_RouterServicer_to_server, _Router()),
            (_add_generic, _raw_handlers()),
        ],
        [CLASSIFIER, ROUTER],
        interceptors=default_interceptors(metrics),
        grace_s=0.5,
        **kwargs,
    )
    port = await server.start()
    target = f"127.0.0.1:{port}"
    channel = aio.insecure_channel(target)
    try:
        yield _Running(server, channel, metrics, target)
    finally:
        await channel.close()
        await server.stop(0)


def _run(body: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=20))


async def _classify(channel: aio.Channel, category: str, **fields: Any) -> Any:
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    return await stub.Classify(classifier_pb2.CategoryRequest(category=category, **fields))


def test_domain_errors_map_to_status_codes_and_server_keeps_serving() -> None:
    async def body() -> None:
        async with _running() as r:
            with pytest.raises(aio.AioRpcError) as bad:
                await _classify(r.channel, "bad")
            assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert bad.value.details() == "category 'bad' is not served here"

            with pytest.raises(aio.AioRpcError) as boom:
                await _classify(r.channel, "boom")
            assert boom.value.code() is grpc.StatusCode.INTERNAL
            assert boom.value.details() == INTERNAL_ERROR_MESSAGE

            ok = await _classify(r.channel, "n01503061")
            assert ok.category == "n01503061"
            assert ok.scores[0].leaf

            assert r.requests(CLASSIFIER, "Classify", "INVALID_ARGUMENT") == 1
            assert r.requests(CLASSIFIER, "Classify", "INTERNAL") == 1
            assert r.requests(CLASSIFIER, "Classify", "OK") == 1
            duration_count = r.metrics.registry.get_sample_value(
                "fieldlens_grpc_request_duration_seconds_count",
                {"service": CLASSIFIER, "method": "Classify"},
            )
            assert duration_count == 3

    _run(body)


def test_unexpected_error_is_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with _running() as r:
            with pytest.raises(aio.AioRpcError) as boom:
                await _classify(r.channel, "boom")
            assert boom.value.code() is grpc.StatusCode.INTERNAL
            assert boom.value.details() == INTERNAL_ERROR_MESSAGE  # the secret stays in the log

    _run(body)
    logged = [rec for rec in caplog.records if rec.name == "fieldlens.common.interceptors"]
    assert any(rec.exc_info and SECRET in str(rec.exc_info[1]) for rec in logged)


def test_context_abort_is_counted_with_its_code() -> None:
    async def body() -> None:
        async with _running() as r:
            with pytest.raises(aio.AioRpcError) as denied:
                await _classify(r.channel, "denied")
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert denied.value.details() == "aborted by hand"
            # grpc.aio's abort() sends the status before the handler's exception has passed
            # through the interceptor that counts it: on a busy machine the client may see it
            # first, so the count is awaited (it must still come, and with that code).
            for _ in range(200):
                if r.requests(CLASSIFIER, "Classify", "PERMISSION_DENIED"):
                    break
                await asyncio.sleep(0.01)
            assert r.requests(CLASSIFIER, "Classify", "PERMISSION_DENIED") == 1

    _run(body)


def test_streaming_handler_errors_are_mapped() -> None:
    async def body() -> None:
        async with _running() as r:
            router = router_pb2_grpc.RouterStub(r.channel)

            call = router.ClassifyStream(
                iter([router_pb2.ClassifyRequest(request_id=i) for i in ("a", "bad", "c")])
            )
            received = []
            with pytest.raises(aio.AioRpcError) as stream_stream:
                async for response in call:
                    received.append(response.request_id)
            assert received == ["a"]
            assert stream_stream.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert stream_stream.value.details() == "item 'bad' rejected"

            with pytest.raises(aio.AioRpcError) as stream_unary:
                await router.IndexExemplars(iter([router_pb2.IndexExemplarsRequest(label="x")]))
            assert stream_unary.value.code() is grpc.StatusCode.UNAVAILABLE
            assert stream_unary.value.details() == "vector store is down"

            for method, code, details in (
                ("Gen", grpc.StatusCode.NOT_FOUND, "no such taxon"),
                ("Write", grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE),
            ):
                unary_stream: aio.UnaryStreamMultiCallable[bytes, bytes] = r.channel.unary_stream(
                    f"/{RAW}/{method}"
                )
                chunks: list[bytes] = []
                with pytest.raises(aio.AioRpcError) as err:
                    async for chunk in unary_stream(b"x"):
                        chunks.append(chunk)
                assert chunks == [b"first"]
                assert (err.value.code(), err.value.details()) == (code, details)

            assert r.requests(ROUTER, "ClassifyStream", "INVALID_ARGUMENT") == 1
            assert r.requests(ROUTER, "IndexExemplars", "UNAVAILABLE") == 1
            assert r.requests(RAW, "Gen", "NOT_FOUND") == 1
            assert r.requests(RAW, "Write", "INTERNAL") == 1

    _run(body)


def test_health_follows_set_serving() -> None:
    async def body() -> None:
        async with _running() as r:
            health = health_pb2_grpc.HealthStub(r.channel)

            async def status(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return (await health.Check(request)).status

            serving = health_pb2.HealthCheckResponse.SERVING
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status(CLASSIFIER) == serving
            assert await status("") == serving

            await r.server.set_serving(CLASSIFIER, False)
            assert await status(CLASSIFIER) == not_serving
            assert await status("") == not_serving
            assert await status(ROUTER) == serving

            await r.server.set_serving(CLASSIFIER, True)
            assert await status("") == serving

    _run(body)


def test_not_serving_at_start_until_ready() -> None:
    async def body() -> None:
        async with _running(serving_at_start=False) as r:
            health = health_pb2_grpc.HealthStub(r.channel)
            response = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await r.server.set_all_serving(True)
            response = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert response.status == health_pb2.HealthCheckResponse.SERVING

    _run(body)


def test_reflection_lists_services() -> None:
    async def body() -> None:
        async with _running() as r:
            # The reflection client is synchronous; run it off the loop that serves it.
            services = await asyncio.to_thread(_reflected_services, r.target)
            assert {CLASSIFIER, ROUTER, "grpc.health.v1.Health"} <= set(services)

    _run(body)


def _reflected_services(target: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        proto = database.FindFileContainingSymbol(CLASSIFIER)
        assert proto.name == "fieldlens/v1/classifier.proto"
        return services


def test_oversized_request_is_resource_exhausted() -> None:
    async def body() -> None:
        async with _running(max_message_bytes=1024) as r:
            with pytest.raises(aio.AioRpcError) as err:
                await _classify(r.channel, "n01503061", image_rgb=b"\0" * 4096)
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await _classify(r.channel, "n01503061")).category == "n01503061"

    _run(body)


def test_second_server_on_same_port_fails_to_bind() -> None:
    async def body() -> None:
        async with _running() as r:
            clash = GrpcServer(r.target, [], [], interceptors=[])
            with pytest.raises(OSError, match=f"cannot bind {r.target}"):
                await clash.start()

    _run(body)


def test_sigterm_reports_not_serving_then_stops() -> None:
    stopped = []

    async def on_stop() -> None:
        stopped.append(True)

    async def body() -> None:
        async with _running() as r:
            health = health_pb2_grpc.HealthStub(r.channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            serving = asyncio.create_task(serve_until_signal(r.server, on_stop))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            os.kill(os.getpid(), signal.SIGTERM)
            second = await watch.read()
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await serving
            watch.cancel()

    _run(body)
    assert stopped == [True]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_stage_timer_observes_histogram_and_records_durations() -> None:
    metrics = get_metrics(CollectorRegistry())
    timer = StageTimer("router", metrics)
    with timer.stage("decode"):
        pass
    with pytest.raises(ValueError, match="failed stages are timed too"), timer.stage("broad"):
        raise ValueError("failed stages are timed too")

    assert [d.stage for d in timer.durations] == ["decode", "broad"]
    assert all(d.seconds >= 0 for d in timer.durations)
    for stage in ("decode", "broad"):
        count = metrics.registry.get_sample_value(
            "fieldlens_stage_duration_seconds_count", {"service": "router", "stage": stage}
        )
        assert count == 1


def test_get_metrics_builds_once_per_registry() -> None:
    registry = CollectorRegistry()
    metrics = get_metrics(registry)
    assert get_metrics(registry) is metrics
    assert get_metrics(CollectorRegistry()) is not metrics
    metrics.record_cache("hit")
    metrics.record_dispatch("n02084071", "specialist", fallback=True)
    metrics.record_degradation("NEIGHBOURS_UNAVAILABLE")
    assert registry.get_sample_value("fieldlens_cache_requests_total", {"result": "hit"}) == 1
    assert (
        registry.get_sample_value(
            "fieldlens_dispatch_total",
            {"category": "n02084071", "target": "specialist", "fallback": "true"},
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "fieldlens_degradations_total", {"kind": "neighbours_unavailable"}
        )
        == 1
    )


def test_model_set_gauge_names_only_the_serving_set() -> None:
    registry = CollectorRegistry()
    metrics = get_metrics(registry)
    metrics.record_model_set("ms-a", "emb-1")
    metrics.record_model_set("ms-b", "emb-2")
    gauge = [
        (s.labels["version"], s.labels["embedding_version"], s.value)
        for s in metrics.model_set.collect()[0].samples
    ]
    assert gauge == [("ms-b", "emb-2", 1.0)]
    metrics.record_switch(ok=True, seconds=8.0)
    metrics.record_switch(ok=False)
    assert registry.get_sample_value("fieldlens_model_set_switches_total", {"result": "ok"}) == 1
    assert (
        registry.get_sample_value("fieldlens_model_set_switches_total", {"result": "failed"}) == 1
    )
    # Only successful switches are timed.
    assert registry.get_sample_value("fieldlens_model_set_switch_seconds_count") == 1
    assert registry.get_sample_value("fieldlens_model_set_switch_seconds_sum") == 8.0


def test_metrics_endpoint_serves_and_port_zero_disables(unused_tcp_port: int) -> None:
    assert start_metrics_server(0) is None
    registry = CollectorRegistry()
    get_metrics(registry).record_cache("miss")
    endpoint = start_metrics_server(unused_tcp_port, registry=registry)
    assert endpoint is not None
    try:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        assert 'fieldlens_cache_requests_total{result="miss"} 1.0' in text
    finally:
        endpoint.close()


@pytest.fixture
def unused_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
