"""Fair share (common/limits.py): the limiter on a fake clock, then in a real grpc.aio server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from fieldlens.common import errors
from fieldlens.common.interceptors import default_interceptors
from fieldlens.common.limits import (
    MAX_RETRY_S,
    FairShare,
    FairShareAdmission,
    Limits,
    peer_identity,
)
from fieldlens.common.server import GrpcServer
from fieldlens.common.settings import RouterSettings
from fieldlens.common.telemetry import Metrics, get_metrics
from fieldlens.v1 import router_pb2, router_pb2_grpc

ROUTER = "fieldlens.v1.Router"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _share(**limits: Any) -> tuple[FairShare, _Clock, Metrics]:
    clock = _Clock()
    metrics = get_metrics(CollectorRegistry())
    return FairShare(Limits(**limits), clock=clock, metrics=metrics), clock, metrics


def _count(metrics: Metrics, name: str, reason: str) -> float:
    return metrics.registry.get_sample_value(name, {"reason": reason}) or 0.0


# -- the limiter --------------------------------------------------------------------------------
def test_a_client_over_its_calls_in_flight_is_refused_and_others_are_not():
    share, _, metrics = _share(client_in_flight=2)
    held = [share.admit("a"), share.admit("a")]
    with pytest.raises(errors.ResourceExhausted) as refused:
        share.admit("a")
    assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms >= 1
    assert f"retry in {refused.value.retry_after_ms} ms" in refused.value.message
    assert "2 requests in flight" in refused.value.message
    assert ("retry-after-ms", str(refused.value.retry_after_ms)) in (
        refused.value.trailing_metadata
    )
    other = share.admit("b")
    assert share.in_flight == 3
    held[0].release()
    share.admit("a").release()
    for ticket in (held[1], other):
        ticket.release()
    assert share.in_flight == 0
    assert _count(metrics, "fieldlens_requests_limited_total", "in_flight") == 1
    assert _count(metrics, "fieldlens_requests_limited_total", "rate") == 0


def test_release_frees_a_place_once_however_often_it_is_called():
    share, _, _ = _share(client_in_flight=1)
    ticket = share.admit("a")
    ticket.release()
    ticket.release()
    assert share.in_flight == 0
    share.admit("a")
    with pytest.raises(errors.ResourceExhausted):
        share.admit("a")


def test_token_bucket_allows_a_burst_then_the_rate():
    share, clock, metrics = _share(client_rate=10.0, client_burst=3)
    for _ in range(3):
        share.admit("a").release()
    with pytest.raises(errors.ResourceExhausted) as refused:
        share.admit("a")
    # One token comes back every 100 ms; the hint says when.
    assert refused.value.retry_after_ms == 100
    assert "10 requests/s (burst 3)" in refused.value.message
    clock.advance(0.05)
    with pytest.raises(errors.ResourceExhausted):
        share.admit("a")
    clock.advance(0.05)
    share.admit("a").release()
    # Over 10 s at 10/s after an empty bucket: 100 calls, whatever the attempts.
    admitted = 0
    for _ in range(1000):
        clock.advance(0.01)
        try:
            share.admit("a").release()
            admitted += 1
        except errors.ResourceExhausted:
            pass
    assert 99 <= admitted <= 101
    assert _count(metrics, "fieldlens_requests_limited_total", "rate") > 0
    share.admit("b").release()  # another client has its own bucket


def test_the_bucket_never_holds_more_than_the_burst():
    share, clock, _ = _share(client_rate=2.0)  # burst: one second's worth
    assert share.limits.burst == 2
    share.admit("a").release()
    clock.advance(3600)
    share.admit("a").release()
    share.admit("a").release()
    with pytest.raises(errors.ResourceExhausted):
        share.admit("a")


def test_retry_hints_spread_a_clients_retries_and_stay_bounded():
    share, clock, _ = _share(client_in_flight=1)
    share.call_s = 0.04  # a place frees up every 40 ms
    share.admit("a")
    hints = []
    for _ in range(3):
        with pytest.raises(errors.ResourceExhausted) as refused:
            share.admit("a")
        hints.append(refused.value.retry_after_ms)
    assert hints == [40, 80, 120]
    # The queue moves on with time: a client that waited is not told to wait for old refusals.
    clock.advance(1.0)
    with pytest.raises(errors.ResourceExhausted) as refused:
        share.admit("a")
    assert refused.value.retry_after_ms == 40
    # A client that never waits is told to wait longer and longer, up to MAX_RETRY_S.
    for _ in range(1000):
        with pytest.raises(errors.ResourceExhausted) as refused:
            share.admit("a")
    assert refused.value.retry_after_ms == int(MAX_RETRY_S * 1000)


def test_mean_call_time_follows_timed_calls_only():
    share, clock, _ = _share()
    before = share.call_s
    ticket = share.admit("a", timed=False)
    clock.advance(60)
    ticket.release()
    assert share.call_s == before
    for _ in range(200):
        ticket = share.admit("a")
        clock.advance(0.1)
        ticket.release()
    assert share.call_s == pytest.approx(0.1, rel=0.01)


def test_idle_clients_are_dropped_and_come_back_with_a_full_bucket():
    share, clock, _ = _share(client_rate=1.0, client_burst=2, idle_s=10.0)
    share.admit("a").release()
    share.admit("a").release()
    with pytest.raises(errors.ResourceExhausted):
        share.admit("a")
    clock.advance(11)
    share.admit("b").release()  # a new client: the idle one goes
    assert share.clients == 1
    share.admit("a").release()
    share.admit("a").release()


def test_the_client_table_is_bounded_and_keeps_busy_clients():
    share, clock, _ = _share(client_in_flight=1, max_clients=3)
    busy = share.admit("busy")
    for name in ("x", "y"):
        share.admit(name).release()
    for i in range(100):
        clock.advance(0.001)
        share.admit(f"c{i}").release()
        assert share.clients <= 3
    # The busy client kept its state: still at its limit.
    with pytest.raises(errors.ResourceExhausted):
        share.admit("busy")
    busy.release()
    share.admit("busy").release()


def test_no_client_state_without_per_client_limits():
    share, _, _ = _share(shed_in_flight=10)
    for i in range(50):
        share.admit(f"c{i}").release()
    assert share.clients == 0


def test_shedding_refuses_sheddable_calls_over_the_bound_only():
    share, _, metrics = _share(shed_in_flight=2)
    held = [share.admit("a"), share.admit("b")]
    with pytest.raises(errors.Unavailable) as shed:
        share.admit("c")
    assert shed.value.message.startswith("overloaded, retry in ")
    assert shed.value.retry_after_ms is not None and shed.value.retry_after_ms >= 1
    write = share.admit("c", sheddable=False)  # counted, not shed
    assert share.in_flight == 3
    write.release()
    held[0].release()
    share.admit("c").release()
    assert _count(metrics, "fieldlens_requests_shed_total", "in_flight") == 1


def test_shedding_comes_before_the_clients_limits():
    share, _, metrics = _share(client_in_flight=1, shed_in_flight=1)
    share.admit("a")
    with pytest.raises(errors.Unavailable):
        share.admit("a")
    assert _count(metrics, "fieldlens_requests_limited_total", "in_flight") == 0


def test_limits_are_checked():
    for bad in (
        {"client_in_flight": -1},
        {"client_rate": -1.0},
        {"client_rate": float("inf")},
        {"client_rate": float("nan")},
        {"shed_in_flight": -2},
        {"max_clients": 0},
    ):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_admission_admits_only_the_services_limited_methods():
    metrics = get_metrics(CollectorRegistry())
    share = FairShare(Limits(client_in_flight=1, shed_in_flight=1), metrics=metrics)
    admission = FairShareAdmission(
        share, ROUTER, exempt=("GetInfo",), unsheddable=("Learn",), identity=lambda c: "x"
    )
    assert admission(f"/{ROUTER}/GetInfo") is None
    assert admission("/grpc.health.v1.Health/Check") is None
    classify, learn = admission(f"/{ROUTER}/Classify"), admission(f"/{ROUTER}/Learn")
    assert classify is not None and learn is not None
    release = classify(None)
    value = metrics.registry.get_sample_value
    assert value("fieldlens_requests_in_flight", {"service": ROUTER}) == 1
    assert value("fieldlens_limited_clients", {"service": ROUTER}) == 1
    with pytest.raises(errors.Unavailable):
        classify(None)
    with pytest.raises(errors.ResourceExhausted):  # not shed, but over the client's limit
        learn(None)
    release()
    assert value("fieldlens_requests_in_flight", {"service": ROUTER}) == 0


def test_router_settings_read_the_limits():
    env = {"FIELDLENS_CLIENT_IN_FLIGHT": "4", "FIELDLENS_CLIENT_RATE": "2.5"}
    settings = RouterSettings.from_env(env | {"FIELDLENS_SHED_IN_FLIGHT": "0"})
    assert (settings.client_in_flight, settings.client_rate) == (4, 2.5)
    assert (settings.client_burst, settings.shed_in_flight) == (0, 0)
    defaults = RouterSettings.from_env({})
    assert (defaults.client_in_flight, defaults.client_rate) == (64, 0.0)
    assert defaults.shed_in_flight == 256


def test_the_routers_admission_exempts_metadata_and_never_sheds_writes():
    from fieldlens.router.service import SERVICE, fair_share

    env = {"FIELDLENS_CLIENT_IN_FLIGHT": "0", "FIELDLENS_SHED_IN_FLIGHT": "1"}
    admission = fair_share(RouterSettings.from_env(env), identity=lambda context: "c")
    assert admission(f"/{SERVICE}/GetInfo") is None
    assert admission(f"/{SERVICE}/GetTaxonomy") is None
    classify, learn = admission(f"/{SERVICE}/Classify"), admission(f"/{SERVICE}/Learn")
    assert classify is not None and learn is not None
    release = classify(None)
    with pytest.raises(errors.Unavailable):
        classify(None)
    learn(None)()  # a write goes through an overloaded router
    release()
    assert admission.fair_share.in_flight == 0


# -- in a real server -------------------------------------------------------------------------
class _SlowRouter(router_pb2_grpc.RouterServicer):
    """Classify of request_id "slow" waits for `go`; everything else answers at once."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started = 0

    async def Classify(
        self, request: router_pb2.ClassifyRequest, context: Any
    ) -> router_pb2.ClassifyResponse:
        if request.request_id == "slow":
            self.started += 1
            await self.go.wait()
        return router_pb2.ClassifyResponse(request_id=request.request_id)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[router_pb2.ClassifyRequest], context: Any
    ) -> AsyncIterator[router_pb2.ClassifyResponse]:
        async for request in request_iterator:
            yield router_pb2.ClassifyResponse(request_id=request.request_id)

    async def GetInfo(
        self, request: router_pb2.GetInfoRequest, context: Any
    ) -> router_pb2.GetInfoResponse:
        return router_pb2.GetInfoResponse(model_set_version="ms-test")

    async def Learn(
        self, request: router_pb2.LearnRequest, context: Any
    ) -> router_pb2.LearnResponse:
        return router_pb2.LearnResponse()


@dataclass
class _Server:
    servicer: _SlowRouter
    metrics: Metrics
    target: str
    channels: list[aio.Channel]

    def channel(self) -> router_pb2_grpc.RouterStub:
        # A pool of its own: a connection of its own, so a peer address (a client) of its own.
        channel = aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        return router_pb2_grpc.RouterStub(channel)

    def requests(self, code: str, method: str = "Classify") -> float:
        labels = {"service": ROUTER, "method": method, "code": code}
        return self.metrics.registry.get_sample_value("fieldlens_grpc_requests_total", labels) or 0


@asynccontextmanager
async def _serving(limits: Limits) -> AsyncIterator[_Server]:
    metrics = get_metrics(CollectorRegistry())
    servicer = _SlowRouter()
    admission = FairShareAdmission(
        FairShare(limits, metrics=metrics),
        ROUTER,
        exempt=("GetInfo", "GetTaxonomy"),
        unsheddable=("Learn",),
        untimed=("ClassifyStream",),
        identity=peer_identity,
    )
    server = GrpcServer(
        "127.0.0.1:0",
        [(router_pb2_grpc.add_RouterServicer_to_server, servicer)],
        [ROUTER],
        interceptors=default_interceptors(metrics, admission),
        grace_s=0.5,
    )
    port = await server.start()
    running = _Server(servicer, metrics, f"127.0.0.1:{port}", [])
    try:
        yield running
    finally:
        servicer.go.set()
        for channel in running.channels:
            await channel.close()
        await server.stop(0)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def _run(body: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout=20))


def _slow() -> router_pb2.ClassifyRequest:
    return router_pb2.ClassifyRequest(request_id="slow")


def test_the_call_over_a_clients_limit_is_refused_fast_while_another_client_is_served():
    async def body() -> None:
        async with _serving(Limits(client_in_flight=2)) as s:
            noisy, quiet = s.channel(), s.channel()
            held = [asyncio.ensure_future(noisy.Classify(_slow(), timeout=10)) for _ in range(2)]
            await _until(lambda: s.servicer.started == 2)

            with pytest.raises(aio.AioRpcError) as refused:
                await noisy.Classify(router_pb2.ClassifyRequest(request_id="third"), timeout=5)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            trailing = dict(refused.value.trailing_metadata() or ())
            hint = int(trailing["retry-after-ms"])
            assert hint >= 1 and trailing["grpc-retry-pushback-ms"] == str(hint)
            assert f"retry in {hint} ms" in refused.value.details()

            answer = await quiet.Classify(router_pb2.ClassifyRequest(request_id="q"), timeout=5)
            assert answer.request_id == "q"
            # Metadata calls are exempt: the noisy client still gets them.
            assert (await noisy.GetInfo(router_pb2.GetInfoRequest())).model_set_version
            health = health_pb2_grpc.HealthStub(s.channels[0])
            status = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert status.status == health_pb2.HealthCheckResponse.SERVING

            s.servicer.go.set()
            assert [r.request_id for r in await asyncio.gather(*held)] == ["slow", "slow"]
            # Its places are free again.
            await noisy.Classify(router_pb2.ClassifyRequest(request_id="again"), timeout=5)
            assert s.requests("RESOURCE_EXHAUSTED") == 1
            assert s.requests("OK") == 4
            limited = s.metrics.registry.get_sample_value(
                "fieldlens_requests_limited_total", {"reason": "in_flight"}
            )
            assert limited == 1

    _run(body)


def test_an_overloaded_server_sheds_reads_but_not_writes():
    async def body() -> None:
        async with _serving(Limits(shed_in_flight=2)) as s:
            a, b, c = s.channel(), s.channel(), s.channel()
            held = [asyncio.ensure_future(x.Classify(_slow(), timeout=10)) for x in (a, b)]
            await _until(lambda: s.servicer.started == 2)

            with pytest.raises(aio.AioRpcError) as shed:
                await c.Classify(router_pb2.ClassifyRequest(request_id="c"), timeout=5)
            assert shed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert shed.value.details().startswith("overloaded, retry in ")
            assert int(dict(shed.value.trailing_metadata() or ())["retry-after-ms"]) >= 1
            await c.Learn(router_pb2.LearnRequest(), timeout=5)  # a write is not shed

            s.servicer.go.set()
            await asyncio.gather(*held)
            await c.Classify(router_pb2.ClassifyRequest(request_id="c"), timeout=5)
            assert s.requests("UNAVAILABLE") == 1
            shed_total = s.metrics.registry.get_sample_value(
                "fieldlens_requests_shed_total", {"reason": "in_flight"}
            )
            assert shed_total == 1

    _run(body)


def test_a_stream_holds_one_place_for_its_whole_life():
    async def body() -> None:
        async with _serving(Limits(client_in_flight=1)) as s:
            client = s.channel()
            stream = client.ClassifyStream()
            await stream.write(router_pb2.ClassifyRequest(request_id="1"))
            assert (await stream.read()).request_id == "1"
            with pytest.raises(aio.AioRpcError) as refused:
                await client.Classify(router_pb2.ClassifyRequest(request_id="u"), timeout=5)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            await stream.done_writing()
            assert await stream.read() is aio.EOF
            await _until(lambda: s.requests("OK", "ClassifyStream") == 1)
            await client.Classify(router_pb2.ClassifyRequest(request_id="u"), timeout=5)

    _run(body)
