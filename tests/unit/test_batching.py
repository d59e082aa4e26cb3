"""Opportunistic micro-batching: no wait alone, shared calls under load, failures per batch."""

from __future__ import annotations

import asyncio

import pytest

from fieldlens.common.batching import MicroBatcher
from fieldlens.common.errors import Unavailable


async def _settle() -> None:
    """Lets the loop run everything that is ready (a few iterations)."""
    for _ in range(5):
        await asyncio.sleep(0)


class _Backend:
    """Records the batches it gets; each call waits until released (the backend is 'busy')."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def send(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return [x * 10 for x in items]


def test_a_lone_call_goes_out_at_once_and_alone() -> None:
    async def body() -> None:
        backend = _Backend()
        backend.release.set()
        sizes: list[int] = []
        batcher = MicroBatcher(backend.send, max_batch=8, max_in_flight=1, on_batch=sizes.append)
        assert await batcher.submit(3) == 30
        assert await batcher.submit(4) == 40
        assert backend.batches == [[3], [4]]
        assert sizes == [1, 1]

    asyncio.run(body())


def test_calls_arriving_while_the_backend_is_busy_leave_together_in_order() -> None:
    async def body() -> None:
        backend = _Backend()
        batcher = MicroBatcher(backend.send, max_batch=3, max_in_flight=1)
        first = asyncio.ensure_future(batcher.submit(0))
        await _settle()  # the first batch is out and busy
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        await _settle()
        assert backend.batches == [[0]] and batcher.queued == 5
        backend.release.set()
        assert await first == 0
        assert await asyncio.gather(*rest) == [10, 20, 30, 40, 50]
        # At most max_batch per call, in arrival order.
        assert backend.batches == [[0], [1, 2, 3], [4, 5]]

    asyncio.run(body())


def test_calls_of_one_loop_iteration_leave_together() -> None:
    async def body() -> None:
        backend = _Backend()
        backend.release.set()
        batcher = MicroBatcher(backend.send, max_batch=8, max_in_flight=2)
        assert await asyncio.gather(*(batcher.submit(i) for i in range(4))) == [0, 10, 20, 30]
        assert backend.batches == [[0, 1, 2, 3]]

    asyncio.run(body())


def test_max_in_flight_batches_go_out_before_any_call_waits() -> None:
    async def body() -> None:
        backend = _Backend()
        batcher = MicroBatcher(backend.send, max_batch=2, max_in_flight=2)
        calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        await _settle()
        # Two batches are out; the fifth call waits for a slot.
        assert backend.batches == [[0, 1], [2, 3]] and batcher.queued == 1
        backend.release.set()
        assert await asyncio.gather(*calls) == [0, 10, 20, 30, 40]
        assert backend.batches == [[0, 1], [2, 3], [4]]

    asyncio.run(body())


def test_a_failed_batch_fails_each_of_its_callers_with_its_own_exception() -> None:
    async def body() -> None:
        backend = _Backend()
        backend.fail = Unavailable("tiny down")
        batcher = MicroBatcher(backend.send, max_batch=8, max_in_flight=1)
        first = asyncio.ensure_future(batcher.submit(0))
        await _settle()
        others = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await _settle()
        backend.release.set()
        results = await asyncio.gather(first, *others, return_exceptions=True)
        assert all(isinstance(r, Unavailable) and r.message == "tiny down" for r in results)
        assert len({id(r) for r in results[1:]}) == 2  # not one object raised twice
        # The batcher keeps serving after a failure.
        backend.fail = None
        assert await batcher.submit(7) == 70

    asyncio.run(body())


def test_a_caller_that_gives_up_while_queued_is_not_sent() -> None:
    async def body() -> None:
        backend = _Backend()
        batcher = MicroBatcher(backend.send, max_batch=8, max_in_flight=1)
        first = asyncio.ensure_future(batcher.submit(0))
        await _settle()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await batcher.submit(1)
        kept = asyncio.ensure_future(batcher.submit(2))
        await _settle()
        backend.release.set()
        assert (await first, await kept) == (0, 20)
        assert backend.batches == [[0], [2]]

    asyncio.run(body())


def test_a_wrong_number_of_results_is_an_error_not_a_mismatch() -> None:
    async def send(items: list[int]) -> list[int]:
        return items[:-1]

    async def body() -> None:
        batcher = MicroBatcher(send, max_batch=8, max_in_flight=1)
        with pytest.raises(RuntimeError, match="got 0 results"):
            await batcher.submit(1)

    asyncio.run(body())


@pytest.mark.parametrize(("max_batch", "max_in_flight"), [(0, 1), (1, 0)])
def test_limits_must_be_positive(max_batch: int, max_in_flight: int) -> None:
    async def send(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(send, max_batch, max_in_flight)
