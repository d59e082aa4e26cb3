"""Opportunistic micro-batching of concurrent calls to one backend, with no added wait.

A call is sent as soon as the event loop has run what was ready when it came (so calls made in
the same loop iteration, e.g. by requests whose broad-net batch just returned, leave together),
while fewer than `max_in_flight` batches are out. Calls that arrive while the backend is busy
queue, and leave together (up to `max_batch` of them) the moment a batch returns. Nothing waits
on a timer: a lone request pays no delay, and under load the per-call costs of a backend hop (a
gRPC round trip on both sides, a Python handler, Triton's per-request work) are paid once per
batch instead of once per request.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

_In = TypeVar("_In")
_Out = TypeVar("_Out")


class MicroBatcher(Generic[_In, _Out]):
    """Coalesces concurrent `submit` calls into batched `send` calls.

    Args:
        send: Sends one batch; returns one result per item, in order. An exception fails every
            item of the batch (each caller gets its own copy of it).
        max_batch: Most items in one batch.
        max_in_flight: Most batches out at once; one more lets the next batch travel while the
            backend computes the last.
        on_batch: Called with the size of every batch sent (metrics).
    """

    def __init__(
        self,
        send: Callable[[list[_In]], Awaitable[Sequence[_Out]]],
        max_batch: int,
        max_in_flight: int = 2,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._send = send
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._queue: deque[tuple[_In, asyncio.Future[_Out]]] = deque()
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_batch = on_batch

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item: _In) -> _Out:
        """The result of `item`, sent alone or with whatever else is waiting."""
        return await self.enqueue(item)

    def enqueue(self, item: _In) -> asyncio.Future[_Out]:
        """`submit` without awaiting: the future of `item`'s result (cancel it to give up)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Out] = loop.create_future()
        self._queue.append((item, future))
        if self._in_flight < self.max_in_flight and not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._queue and self._in_flight < self.max_in_flight:
            self._launch()

    def _launch(self) -> None:
        batch: list[tuple[_In, asyncio.Future[_Out]]] = []
        while self._queue and len(batch) < self.max_batch:
            entry = self._queue.popleft()
            if not entry[1].done():  # its caller gave up while it waited
                batch.append(entry)
        if not batch:
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[_In, asyncio.Future[_Out]]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} got {len(results)} results")
        except asyncio.CancelledError:  # shutting down: nobody will answer these
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(copy.copy(exc))
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._flush()
