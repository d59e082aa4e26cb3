"""RedisCache against a real redis-server, including the server dying and coming back."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import pytest

from fieldlens.backends.cache import RedisCache, ResultCache, cache_key, generations_key
from fieldlens.common import runtime
from fieldlens.common.errors import Unavailable

if TYPE_CHECKING:
    from conftest import RedisProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T = TypeVar("T")
COOLDOWN_S = 0.3


def _run(body: Callable[[], Awaitable[T]]) -> T:
    # On the services' own event loop (uvloop by default): transports differ between loops.
    return runtime.run(body())  # type: ignore[arg-type]


def test_cache_key_layout() -> None:
    assert cache_key("ab12", "ms3", "7") == "fieldlens:v1:ms3:7:ab12"
    assert cache_key("ab12", "ms3") == "fieldlens:v1:ms3:0:ab12"
    with pytest.raises(ValueError, match="must be non-empty"):
        cache_key("", "ms3")


def test_roundtrip_miss_and_ttl(redis_server: RedisProcess) -> None:
    async def body() -> None:
        cache = RedisCache.from_addr(redis_server.addr)
        assert isinstance(cache, ResultCache)
        try:
            assert await cache.ping()
            key = cache_key("feedface" * 8, "test-set")
            assert await cache.get(key) is None
            await cache.set(key, b"\x00answer\xff", ttl_s=0.3)
            assert await cache.get(key) == b"\x00answer\xff"
            await asyncio.sleep(0.5)
            assert await cache.get(key) is None, "the entry should have expired"
        finally:
            await cache.close()

    _run(body)


async def _timed(call: Awaitable[object]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await call
    except Exception as exc:  # the test inspects which exception escaped
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def test_dead_server_degrades_fast_and_recovers(fresh_redis: RedisProcess) -> None:
    failures: list[str] = []

    async def body() -> None:
        cache = RedisCache.from_addr(
            fresh_redis.addr, cooldown_s=COOLDOWN_S, on_failure=failures.append
        )
        key = cache_key("0123" * 16, "test-set")
        try:
            await cache.set(key, b"v1", ttl_s=60)
            assert await cache.get(key) == b"v1"

            fresh_redis.kill()
            for call in (cache.get(key), cache.set(key, b"v2", 60), cache.get(key)):
                elapsed, exc = await _timed(call)
                assert isinstance(exc, Unavailable), f"expected Unavailable, got {exc!r}"
                assert elapsed < 1.0, f"a dead cache cost {elapsed:.3f}s"
            assert cache.circuit_open
            assert await cache.ping() is False
            assert failures[:3] == ["get", "set", "get"]

            fresh_redis.start()
            await asyncio.sleep(COOLDOWN_S + 0.05)
            await cache.set(key, b"v3", ttl_s=60)
            assert await cache.get(key) == b"v3"
            assert not cache.circuit_open
        finally:
            await cache.close()

    _run(body)


def test_never_started_server_is_unavailable_quickly() -> None:
    from fieldlens.cluster import free_port

    async def body() -> None:
        cache = RedisCache("127.0.0.1", free_port(), cooldown_s=COOLDOWN_S)
        try:
            elapsed, exc = await _timed(cache.get("k"))
            assert isinstance(exc, Unavailable) and elapsed < 1.0
            assert await cache.ping() is False
        finally:
            await cache.close()

    _run(body)


def test_hung_server_costs_one_short_timeout(fresh_redis: RedisProcess) -> None:
    assert fresh_redis.proc is not None
    proc = fresh_redis.proc

    failures: list[str] = []

    async def body() -> None:
        cache = RedisCache.from_addr(
            fresh_redis.addr, cooldown_s=COOLDOWN_S, on_failure=failures.append
        )
        key = cache_key("89ab" * 16, "test-set")
        try:
            await cache.set(key, b"v", ttl_s=60)
            # A stopped process keeps its socket open but never answers: the worst case.
            proc.send_signal(signal.SIGSTOP)
            try:
                elapsed, exc = await _timed(cache.get(key))
                assert isinstance(exc, Unavailable) and elapsed < 0.5, (elapsed, exc)
                assert "get failed" in str(exc) and cache.circuit_open
                # The open circuit answers the next call itself: Redis is not asked again.
                with pytest.raises(Unavailable, match=r"unavailable \(circuit open\)"):
                    await cache.get(key)
                assert failures == ["get", "get"]
            finally:
                proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(COOLDOWN_S + 0.05)
            assert await cache.get(key) == b"v"
        finally:
            await cache.close()

    _run(body)


def test_knowledge_generations_round_trip_with_the_entry(redis_server: RedisProcess) -> None:
    async def body() -> None:
        cache = RedisCache.from_addr(redis_server.addr)
        gens = generations_key("gen-test-set")
        key = cache_key("beef" * 16, "gen-test-set")
        try:
            assert await cache.get_with_generations(key, gens) == (None, {})
            await cache.set(key, b"answer", ttl_s=30)
            assert await cache.bump_generation(gens, "broad/cat") == 1
            assert await cache.bump_generation(gens, "broad/cat") == 2
            assert await cache.bump_generation(gens, "broad/dog") == 1
            value, seen = await cache.get_with_generations(key, gens)
            assert value == b"answer"
            assert seen == {"broad/cat": 2, "broad/dog": 1}
        finally:
            await cache.close()

    _run(body)


def test_generation_bump_fails_typed_when_redis_is_down(fresh_redis: RedisProcess) -> None:
    async def body() -> None:
        cache = RedisCache.from_addr(fresh_redis.addr, cooldown_s=COOLDOWN_S)
        try:
            fresh_redis.kill()
            with pytest.raises(Unavailable, match="bump failed"):
                await cache.bump_generation(generations_key("s"), "broad/cat")
        finally:
            await cache.close()

    _run(body)


def test_pipelined_lookups_of_requests_in_flight_match_their_replies(
    redis_server: RedisProcess,
) -> None:
    """Look-ups and write-backs of many requests at once share pipelines on one connection:
    each gets its own reply, and the generations its key's set names."""

    async def body() -> None:
        cache = RedisCache.from_addr(redis_server.addr)
        keys = [cache_key(f"{i:064x}", "pipe-set") for i in range(50)]
        gens = [generations_key(f"pipe-set-{i % 3}") for i in range(50)]
        try:
            for i in range(3):
                await cache.bump_generation(generations_key(f"pipe-set-{i}"), f"broad/g{i}")
            await asyncio.gather(*(cache.set(k, f"v{i}".encode(), 30) for i, k in enumerate(keys)))
            got = await asyncio.gather(
                *(cache.get_with_generations(k, g) for k, g in zip(keys, gens, strict=True))
            )
            assert got == [(f"v{i}".encode(), {f"broad/g{i % 3}": 1}) for i in range(50)]
        finally:
            await cache.close()

    _run(body)


def test_a_hung_pipeline_times_out_and_its_late_replies_reach_no_one(
    fresh_redis: RedisProcess,
) -> None:
    """A look-up Redis does not answer in time fails Unavailable; when Redis wakes up, the
    replies it then sends for that look-up are not taken as the next one's."""
    assert fresh_redis.proc is not None
    proc = fresh_redis.proc

    async def body() -> None:
        cache = RedisCache.from_addr(fresh_redis.addr, cooldown_s=COOLDOWN_S)
        gens = generations_key("hung-set")
        first, second = cache_key("aa" * 32, "hung-set"), cache_key("bb" * 32, "hung-set")
        try:
            await cache.set(first, b"first", 60)
            await cache.set(second, b"second", 60)
            proc.send_signal(signal.SIGSTOP)
            try:
                elapsed, exc = await _timed(cache.get_with_generations(first, gens))
                assert isinstance(exc, Unavailable) and elapsed < 0.5, (elapsed, exc)
            finally:
                proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(COOLDOWN_S + 0.05)
            assert await cache.get_with_generations(second, gens) == (b"second", {})
            assert not cache.circuit_open
        finally:
            await cache.close()

    _run(body)


def test_an_error_reply_is_unavailable_and_the_next_call_works(redis_server: RedisProcess) -> None:
    async def body() -> None:
        cache = RedisCache.from_addr(redis_server.addr, cooldown_s=COOLDOWN_S)
        wrong = generations_key("wrongtype-set")
        key = cache_key("cc" * 32, "wrongtype-set")
        try:
            await cache.set(wrong, b"not a hash", 60)  # HGETALL on a string: WRONGTYPE
            with pytest.raises(Unavailable, match="WRONGTYPE"):
                await cache.get_with_generations(key, wrong)
            await asyncio.sleep(COOLDOWN_S + 0.05)
            await cache.set(key, b"fine", 60)
            assert await cache.get_with_generations(key, generations_key("other")) == (
                b"fine",
                {},
            )
        finally:
            await cache.close()

    _run(body)


def test_a_restarted_server_is_reconnected_to(fresh_redis: RedisProcess) -> None:
    async def body() -> None:
        cache = RedisCache.from_addr(fresh_redis.addr, cooldown_s=COOLDOWN_S)
        key = cache_key("dd" * 32, "restart-set")
        try:
            await cache.set(key, b"before", 60)
            fresh_redis.kill()
            fresh_redis.start()
            await asyncio.sleep(COOLDOWN_S + 0.05)
            # The old connection is dead: at most this call fails, then a new one is opened.
            try:
                await cache.set(key, b"after", 60)
            except Unavailable:
                await asyncio.sleep(COOLDOWN_S + 0.05)
                await cache.set(key, b"after", 60)
            assert await cache.get_with_generations(key, generations_key("restart-set")) == (
                b"after",
                {},
            )
        finally:
            await cache.close()

    _run(body)
