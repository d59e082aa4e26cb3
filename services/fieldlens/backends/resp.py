"""One pipelined Redis connection for the router's hot path: RESP packed and parsed by hiredis.

redis-py's asyncio pipeline is the cache's client everywhere else, but on the hot path its
Python machinery (a pipeline object, a command stack, a pool checkout, retries and response
callbacks per call) cost the router 0.12-0.14 ms of CPU per round trip of one or two
commands on uvloop; the same round trip packed by `hiredis.pack_command`, parsed by
`hiredis.Reader` (the C code redis-py itself parses with) and written to an asyncio transport
costs 0.05 ms. A cache miss makes two (look-up and write-back), so this was a fifth of the
router's CPU per answer at 16 requests in flight.

Commands are sent in order on one connection and Redis answers in order, so the replies of
concurrent `execute` calls are matched first in, first out. A call abandoned by its caller
(a timeout) keeps its place in that queue, so the replies Redis still sends for it are read
and dropped, never taken as a later call's. A lost connection fails every call waiting on it;
the caller opens a new one.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis

# A command's words: name and arguments, as hiredis.pack_command takes them.
Command = Sequence[str | bytes | int | float]


class RespError(Exception):
    """Redis answered a command with an error reply, or broke the protocol."""


class _Call:
    __slots__ = ("future", "replies", "expected")

    def __init__(self, future: asyncio.Future[list[Any]], expected: int) -> None:
        self.future, self.expected = future, expected
        self.replies: list[Any] = []


class RespConnection(asyncio.Protocol):
    """One TCP connection to Redis; `await RespConnection.open(host, port)`."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._calls: collections.deque[_Call] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._lost: BaseException | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> RespConnection:
        """Connects (bound by the caller's timeout)."""
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    @property
    def closed(self) -> bool:
        return self._transport is None or self._lost is not None

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Sends `commands` at once and returns their replies, in order: bytes or None for a
        bulk string, bytes for a status, int, or a list for an array.

        Raises:
            RespError: a command got an error reply (the connection stays usable).
            ConnectionError: the connection is closed or was lost.
        """
        if not commands:
            return []
        if self.closed:
            raise ConnectionError("redis connection closed") from self._lost
        assert self._transport is not None
        call = _Call(asyncio.get_running_loop().create_future(), len(commands))
        self._calls.append(call)
        self._transport.write(b"".join([hiredis.pack_command(tuple(c)) for c in commands]))
        replies = await call.future  # cancelled: its replies still arrive, for `call`
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise RespError(str(reply))
        return replies

    def close(self) -> None:
        """Closes the connection; calls waiting for replies fail with ConnectionError."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._fail(ConnectionError("redis connection closed"))

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they write all the same.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        calls = self._calls
        while calls:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RespError(f"redis protocol error: {exc}"))
                self.close()
                return
            if reply is False:  # incomplete: wait for more bytes
                return
            call = calls[0]
            call.replies.append(reply)
            if len(call.replies) == call.expected:
                calls.popleft()
                if not call.future.done():
                    call.future.set_result(call.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionError("redis closed the connection")
        self._transport = None
        self._fail(ConnectionError(f"redis connection lost: {self._lost}"))

    def _fail(self, exc: BaseException) -> None:
        while self._calls:
            call = self._calls.popleft()
            if not call.future.done():
                call.future.set_exception(exc)
