"""Result cache behind a narrow interface; Redis implementation that fails fast and typed.

Failure contract (the one the router relies on): `get` returns the cached bytes or None on a
miss, `set` returns None; ANY cache failure -- Redis down, slow, refusing, or the circuit open
after a recent failure -- raises `fieldlens.common.errors.Unavailable` and nothing else. The
router catches `Unavailable`, flags the response as degraded and carries on without the
cache. `ping` never raises.

A dead Redis costs at most one short connect timeout (default 50 ms) per cool-down period:
after a failure the client stops contacting Redis for `cooldown_s`, then lets a single call
through as a probe; this keeps a Redis outage from adding latency to every request and from
turning into a reconnect storm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from fieldlens.backends.resp import RespConnection, RespError
from fieldlens.common.batching import MicroBatcher
from fieldlens.common.errors import Unavailable

logger = logging.getLogger(__name__)

KEY_PREFIX = "fieldlens:v1"
DEFAULT_CONNECT_TIMEOUT_S = 0.05
DEFAULT_OP_TIMEOUT_S = 0.05
DEFAULT_COOLDOWN_S = 1.0
DEFAULT_MAX_CONNECTIONS = 32
# Concurrent look-ups and write-backs travel together in one pipeline: one round trip and one
# Redis command batch for many requests, and few connections however many are in flight.
BATCH_MAX = 64
BATCH_IN_FLIGHT = 1

# One pipelined operation: ("get", key, generations hash, 0) or ("set", key, value, ttl in ms).
_Op = tuple[str, str, bytes | str, int]


def cache_key(content_hash: str, model_set_version: str, generation: str = "0") -> str:
    """Cache key of one answer: image content hash x model-set version x knowledge generation.

    Bumping the model-set version or a category's generation makes older answers unreachable
    (they age out through their TTL) without scanning or deleting keys.
    """
    if not content_hash or not model_set_version:
        raise ValueError("content_hash and model_set_version must be non-empty")
    return f"{KEY_PREFIX}:{model_set_version}:{generation}:{content_hash}"


def generations_key(model_set_version: str) -> str:
    """Hash of knowledge generations (broad group -> count of Learn writes) of a model set."""
    return f"{KEY_PREFIX}:{model_set_version}:knowledge"


@runtime_checkable
class ResultCache(Protocol):
    """What the router needs from a result cache; see the module docstring for failures."""

    async def get(self, key: str) -> bytes | None: ...

    async def get_with_generations(
        self, key: str, generations: str
    ) -> tuple[bytes | None, dict[str, int]]: ...

    async def bump_generation(self, generations: str, category: str) -> int: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def parse_addr(addr: str, default_port: int = 6379) -> tuple[str, int]:
    """Split `host:port` (or `host`) into its parts."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        return addr, default_port
    try:
        return host or "127.0.0.1", int(port)
    except ValueError as exc:
        raise ValueError(f"malformed address {addr!r}, expected host:port") from exc


class RedisCache:
    """`ResultCache` over `redis.asyncio` with short timeouts and a circuit breaker.

    The connection pool is created on first use; the object must then stay on one event loop.

    Args:
        host: Redis host.
        port: Redis port.
        connect_timeout_s: TCP connect timeout.
        op_timeout_s: per-command socket timeout.
        cooldown_s: after a failure, how long calls fail fast before one probe is let through.
        max_connections: pool size cap.
        on_failure: called with the operation name ("get", "set", "ping") on every failure,
            fast-failed ones included, e.g. to count degraded requests.
        on_batch: called with the number of look-ups and write-backs in each pipeline sent
            (metrics: `fieldlens_backend_batch_size{backend="redis"}`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        on_failure: Callable[[str], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._connect_timeout_s = connect_timeout_s
        self._op_timeout_s = op_timeout_s
        self._cooldown_s = cooldown_s
        self._max_connections = max_connections
        self._on_failure = on_failure
        self._client: Redis | None = None
        # The hot path's pipelined connection (look-ups and write-backs), opened on first use.
        self._conn: RespConnection | None = None
        # 0.0 = closed circuit; otherwise calls before this monotonic time fail fast.
        self._open_until = 0.0
        self._ops: MicroBatcher[_Op, tuple[bytes | None, dict[str, int]] | None] = MicroBatcher(
            self._pipeline, BATCH_MAX, BATCH_IN_FLIGHT, on_batch
        )

    @classmethod
    def from_addr(cls, addr: str, **kwargs: object) -> RedisCache:
        """Build from a `host:port` string (the REDIS_ADDR convention)."""
        host, port = parse_addr(addr)
        return cls(host, port, **kwargs)  # type: ignore[arg-type]

    @property
    def addr(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def circuit_open(self) -> bool:
        return time.monotonic() < self._open_until

    def _redis(self) -> Redis:
        if self._client is None:
            # A caller waits for a free connection (within its deadline) rather than fail with
            # MaxConnectionsError when every connection is busy.
            pool = BlockingConnectionPool(
                max_connections=self._max_connections,
                timeout=self._deadline(),
                host=self._host,
                port=self._port,
                socket_connect_timeout=self._connect_timeout_s,
                socket_timeout=self._op_timeout_s,
                # The breaker decides when to try again; client-side retries would multiply
                # the timeout a dead Redis costs each request.
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
            self._client = Redis.from_pool(pool)  # closing the client closes the pool
        return self._client

    def _admit(self, op: str) -> None:
        if self._open_until == 0.0:
            return
        now = time.monotonic()
        if now < self._open_until:
            self._fail(op)
            raise Unavailable(f"cache {self.addr} unavailable (circuit open)")
        # Half-open: this call is the probe; everyone else keeps failing fast until it returns.
        self._open_until = now + self._cooldown_s

    def _fail(self, op: str) -> None:
        if self._on_failure is not None:
            self._on_failure(op)

    def _trip(self, op: str, exc: BaseException) -> Unavailable:
        was_closed = self._open_until == 0.0
        self._open_until = time.monotonic() + self._cooldown_s
        self._fail(op)
        if was_closed:
            logger.warning(
                "cache %s %s failed, bypassing for %.1fs: %r", self.addr, op, self._cooldown_s, exc
            )
        else:
            logger.debug("cache %s %s probe failed: %r", self.addr, op, exc)
        return Unavailable(f"cache {self.addr} {op} failed: {exc!r}")

    def _recover(self) -> None:
        if self._open_until != 0.0:
            logger.info("cache %s reachable again", self.addr)
            self._open_until = 0.0

    def _deadline(self) -> float:
        # Outer bound in case a timeout slips through the socket layer (e.g. DNS, TLS).
        return self._connect_timeout_s + self._op_timeout_s + 0.05

    async def get(self, key: str) -> bytes | None:
        """Cached bytes, or None on a miss. Raises Unavailable on any cache failure."""
        self._admit("get")
        try:
            value = await asyncio.wait_for(self._redis().get(key), self._deadline())
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._trip("get", exc) from exc
        self._recover()
        return value if value is None else bytes(value)

    async def get_with_generations(
        self, key: str, generations: str
    ) -> tuple[bytes | None, dict[str, int]]:
        """`get(key)` and the knowledge generations hash, in one round trip (shared with the
        look-ups and write-backs of other requests in flight)."""
        self._admit("get")
        got = await self._ops.submit(("get", key, generations, 0))
        assert got is not None
        return got

    async def _pipeline(self, ops: list[_Op]) -> list[tuple[bytes | None, dict[str, int]] | None]:
        """Every op of a batch in one pipeline: the GETs and SETs in order, then each
        generations hash the GETs named, once. On the hot path, so over `RespConnection`
        (hiredis on an asyncio transport), not redis-py's pipeline (see backends/resp.py)."""
        hashes = list(dict.fromkeys(str(g) for kind, _, g, _ in ops if kind == "get"))
        commands: list[tuple[str | bytes | int, ...]] = [
            ("GET", key) if kind == "get" else ("SET", key, arg, "PX", ttl_ms)
            for kind, key, arg, ttl_ms in ops
        ]
        commands += [("HGETALL", g) for g in hashes]
        try:
            async with asyncio.timeout(self._deadline()):
                if self._conn is None or self._conn.closed:
                    self._conn = await RespConnection.open(self._host, self._port)
                replies = await self._conn.execute(commands)
        except (RespError, OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            if self._conn is not None:
                self._conn.close()  # the next call (the circuit's probe) connects afresh
                self._conn = None
            raise self._trip(ops[0][0], exc) from exc
        self._recover()
        gens = {
            g: {k.decode(): int(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}
            for g, reply in zip(hashes, replies[len(ops) :], strict=True)
        }
        return [
            (None if value is None else bytes(value), gens[str(arg)]) if kind == "get" else None
            for (kind, _, arg, _), value in zip(ops, replies, strict=False)
        ]

    async def bump_generation(self, generations: str, category: str) -> int:
        """Increments one category's knowledge generation; returns the new value."""
        self._admit("bump")
        try:
            value = await asyncio.wait_for(
                self._redis().hincrby(generations, category, 1), self._deadline()
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._trip("bump", exc) from exc
        self._recover()
        return int(value)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store `value` under `key` for `ttl_s` seconds. Raises Unavailable on failure."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._admit("set")
        await self._ops.submit(("set", key, value, max(1, int(ttl_s * 1000))))

    async def ping(self) -> bool:
        """True when Redis answers; never raises (readiness probes and health checks)."""
        try:
            ok = bool(await asyncio.wait_for(self._redis().ping(), self._deadline()))
        except (RedisError, OSError, TimeoutError) as exc:
            logger.debug("cache %s ping failed: %r", self.addr, exc)
            self._fail("ping")
            return False
        if ok:
            self._recover()
        return ok

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
