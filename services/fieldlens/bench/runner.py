"""Load generators (closed loop at a fixed concurrency, open loop at Poisson arrivals) and the
request sources they drive: unique photos for cache misses, repeated ones for hits, direct Triton.

Each call is one coroutine with its own deadline; every loop here stops at a time limit and at a
request count, whichever comes first.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fieldlens import gallery
from fieldlens.backends.triton_client import TritonClient
from fieldlens.common import settings
from fieldlens.common.errors import RETRY_AFTER_KEY
from fieldlens.router.imaging import ImageLimits, decode
from fieldlens.v1 import router_pb2, router_pb2_grpc

# A call returns flags describing its answer (e.g. "cached"); it raises on failure. A flag
# starting with NOTE is not counted but kept as a sample (a degradation's message).
Call = Callable[[], Awaitable[Sequence[str]]]

CACHED = "cached"
NOTE = "note:"
MAX_NOTES = 5
LATE_MS = 10.0  # an open-loop request sent this long after its arrival time counts as late
_DRAIN_GRACE_S = 5.0
_LIMITS = ImageLimits(settings.DEFAULT_MAX_IMAGE_BYTES, settings.DEFAULT_MAX_PIXELS)


def error_code(exc: BaseException) -> str:
    """The gRPC status name of a failed call (a Triton error's is read from its cause)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    if isinstance(exc, TimeoutError):
        return "CLIENT_TIMEOUT"
    status = getattr(exc.__cause__, "status", None)
    if callable(status):
        name = str(status())
        return name.rpartition(".")[2] or name
    return type(exc).__name__


def retry_after_s(exc: BaseException) -> float | None:
    """The server's retry hint of a failed call (trailing metadata `retry-after-ms`), seconds."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return None
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1e3)
            except ValueError:
                return None
    return None


def percentiles(values_ms: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p95, p99 and max of latencies in ms (None each when there are none)."""
    if not values_ms:
        return {k: None for k in ("mean", "p50", "p95", "p99", "max")}
    a = np.asarray(values_ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {
        "mean": float(a.mean()),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(a.max()),
    }


@dataclass
class LoadStats:
    """What one scenario point measured; a progress ticker reads `done` while it runs."""

    latencies_ms: list[float] = field(default_factory=list)
    send_latencies_ms: list[float] = field(default_factory=list)  # open loop: from the send
    errors: Counter[str] = field(default_factory=Counter)
    flags: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    dropped: int = 0
    late: int = 0
    offered: int = 0

    @property
    def done(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())

    def record(self, flags: Sequence[str]) -> None:
        for f in flags:
            if not f.startswith(NOTE):
                self.flags[f] += 1
            elif len(self.notes) < MAX_NOTES and f[len(NOTE) :] not in self.notes:
                self.notes.append(f[len(NOTE) :])

    def summary(self) -> dict[str, Any]:
        ok = len(self.latencies_ms)
        out: dict[str, Any] = {
            "requests": self.done,
            "ok": ok,
            "errors": dict(self.errors),
            "elapsed_s": self.elapsed_s,
            "qps": ok / self.elapsed_s if self.elapsed_s > 0 else None,
            "latency_ms": percentiles(self.latencies_ms),
            "flags": dict(self.flags),
        }
        if self.notes:
            out["notes"] = list(self.notes)
        out["cached_fraction"] = self.flags.get(CACHED, 0) / ok if ok else None
        if self.offered:
            out["offered"] = self.offered
            out["dropped"] = self.dropped
            out["late"] = self.late
            out["send_latency_ms"] = percentiles(self.send_latencies_ms)
        return out


async def _run_workers(
    call: Call,
    stats: LoadStats | None,
    concurrency: int,
    duration_s: float,
    budget: list[int],
    honour_hints: bool = False,
) -> None:
    stop_at = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            try:
                flags = await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is a figure: counted by status code
                if stats is not None:
                    stats.errors[error_code(exc)] += 1
                hint = retry_after_s(exc) if honour_hints else None
                if hint:  # a refused call: wait as told (not past the end) before the next
                    await asyncio.sleep(min(hint, max(0.0, stop_at - time.perf_counter())))
                continue
            if stats is not None:
                stats.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                stats.record(flags)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def closed_loop(
    call: Call,
    stats: LoadStats,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    call_timeout_s: float,
    honour_hints: bool = False,
) -> LoadStats:
    """`concurrency` workers each sending its next request as soon as the last one answers.

    QPS counts successful calls over the wall time until the last call sent before
    `duration_s` ran out has answered. With `honour_hints`, a worker whose call was refused
    with a retry hint (`retry-after-ms`) waits that long first, as a well-behaved client does.
    """
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(
            _run_workers(call, stats, concurrency, duration_s, [max_requests], honour_hints),
            duration_s + call_timeout_s + _DRAIN_GRACE_S,
        )
    except TimeoutError:
        stats.errors["BENCH_TIME_LIMIT"] += 1
    stats.elapsed_s = time.perf_counter() - t0
    return stats


async def neighbours(
    quiet: Call,
    noisy: Call,
    quiet_stats: LoadStats,
    noisy_stats: LoadStats,
    noisy_concurrency: int,
    duration_s: float,
    max_requests: int,
    call_timeout_s: float,
) -> None:
    """Two clients at once: `quiet` one call at a time, `noisy` at `noisy_concurrency` in
    flight, each its own closed loop with its own request budget. The noisy one honours retry
    hints (see `closed_loop`)."""
    await asyncio.gather(
        closed_loop(quiet, quiet_stats, 1, duration_s, max_requests, call_timeout_s),
        closed_loop(
            noisy,
            noisy_stats,
            noisy_concurrency,
            duration_s,
            max_requests,
            call_timeout_s,
            honour_hints=True,
        ),
    )


async def warm_up(
    call: Call, concurrency: int, duration_s: float, max_requests: int, call_timeout_s: float
) -> LoadStats:
    """Unrecorded load at the coming point's concurrency: Triton's dynamic batcher, the
    TorchScript executor and the connection pools settle before anything is measured."""
    return await closed_loop(
        call, LoadStats(), concurrency, duration_s, max_requests, call_timeout_s
    )


async def open_loop(
    call: Call,
    stats: LoadStats,
    rate: float,
    duration_s: float,
    max_in_flight: int,
    call_timeout_s: float,
    seed: int = 0,
) -> LoadStats:
    """Poisson arrivals at `rate`/s for `duration_s`, whatever the answers' pace.

    Latency is measured from each request's scheduled arrival, so time spent waiting for the
    client to get round to sending it counts too (no coordinated omission); `send_latency_ms`
    is the same from the actual send. An arrival finding `max_in_flight` calls outstanding is
    dropped; one sent more than LATE_MS after its arrival time is counted late.
    """
    rng = np.random.default_rng(seed)
    n = max(1, math.ceil(rate * duration_s))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    stats.offered = n
    in_flight: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        sent = time.perf_counter()
        try:
            flags = await call()
        except Exception as exc:  # counted by status code
            stats.errors[error_code(exc)] += 1
            return
        now = time.perf_counter()
        stats.latencies_ms.append((now - scheduled) * 1e3)
        stats.send_latencies_ms.append((now - sent) * 1e3)
        stats.record(flags)

    t0 = time.perf_counter()
    for at in arrivals:
        scheduled = t0 + float(at)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= max_in_flight:
            stats.dropped += 1
            continue
        if (time.perf_counter() - scheduled) * 1e3 > LATE_MS:
            stats.late += 1
        task = asyncio.create_task(one(scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=call_timeout_s + _DRAIN_GRACE_S)
        for task in pending:
            task.cancel()
            stats.errors["BENCH_TIME_LIMIT"] += 1
    stats.elapsed_s = time.perf_counter() - t0
    return stats


# -- request sources ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Photos:
    """Labelled photos read from the shards: the gallery to index and a pool for the load."""

    gallery: list[tuple[str, bytes, str]]
    pool: list[bytes]


def read_photos(
    data_dir: Path, models_dir: Path, per_class: int, pool_size: int, classes: set[str]
) -> Photos:
    """The first `per_class` photos of each class (as `fieldlens index-gallery` picks them)
    for the gallery, and the next `pool_size` photos after those for the load scenarios.

    Validation photos are skipped, as the gallery skips them. Reading stops as soon as both
    are complete, usually within the first shard.
    """
    exclude = gallery.validation_keys(models_dir)
    per_class_seen: Counter[str] = Counter()
    chosen: list[tuple[str, bytes, str]] = []
    pool: list[bytes] = []
    n_classes = len(classes)
    want_gallery = per_class * n_classes
    # A generous per-class cap keeps the pool spread over the classes.
    cap = per_class + max(1, math.ceil(2 * pool_size / max(1, n_classes)))
    for key, data, wnid in gallery.gallery_items(data_dir, cap, exclude, classes):
        if per_class_seen[wnid] < per_class:
            chosen.append((key, data, wnid))
        elif len(pool) < pool_size:
            pool.append(data)
        per_class_seen[wnid] += 1
        if len(chosen) >= want_gallery and len(pool) >= pool_size:
            break
    if not pool:
        raise FileNotFoundError(f"no photos for the load scenarios under {data_dir}")
    return Photos(chosen, pool)


class UniquePhotos:
    """Every call a photo the router has never seen: a guaranteed cache miss.

    The pool's photos are cycled through; a run nonce and a counter appended after each JPEG's
    end-of-image marker give every request its own content hash (the cache key) while the
    decoded pixels, and so the work, stay those of a real photo. The nonce keeps a run's
    misses misses against a long-lived cluster that served an earlier run.
    """

    def __init__(self, pool: Sequence[bytes], nonce: str) -> None:
        if not pool:
            raise ValueError("empty photo pool")
        self._pool = list(pool)
        self._nonce = nonce.encode()
        self.issued = 0

    def __call__(self) -> bytes:
        n, self.issued = self.issued, self.issued + 1
        return self._pool[n % len(self._pool)] + b"fieldlens-bench:" + self._nonce + b":%d" % n


class RepeatedPhotos:
    """Cycles through a fixed set: after one pass every call is a repeat (a cache hit)."""

    def __init__(self, photos: Sequence[bytes]) -> None:
        if not photos:
            raise ValueError("no photos")
        self._photos = list(photos)
        self._cycle: Iterator[bytes] = itertools.cycle(self._photos)

    def __call__(self) -> bytes:
        return next(self._cycle)

    @property
    def photos(self) -> list[bytes]:
        return list(self._photos)


class MixedPhotos:
    """A deterministic blend: `hit_fraction` of calls from `hits`, the rest from `misses`."""

    def __init__(
        self, hits: Callable[[], bytes], misses: Callable[[], bytes], hit_fraction: float
    ) -> None:
        self._hits, self._misses = hits, misses
        self._fraction = hit_fraction
        self._n = 0
        self._hit_calls = 0

    def __call__(self) -> bytes:
        self._n += 1
        # Bresenham-style: the hit count tracks fraction x calls exactly, evenly spread.
        if self._hit_calls < math.floor(self._n * self._fraction + 1e-9):
            self._hit_calls += 1
            return self._hits()
        return self._misses()


def router_call(
    stub: router_pb2_grpc.RouterStub, photos: Callable[[], bytes], timeout_s: float
) -> Call:
    """Router.Classify with default options; flags: cached, degraded:<kind> (+ its message)."""

    async def call() -> Sequence[str]:
        reply = await stub.Classify(router_pb2.ClassifyRequest(image=photos()), timeout=timeout_s)
        flags = [CACHED] if reply.cached else []
        for d in reply.degradations:
            kind = router_pb2.DegradationKind.Name(d.kind)
            flags += [f"degraded:{kind}", f"{NOTE}{kind}: {d.message}"]
        return flags

    return call


def learn_call(
    stub: router_pb2_grpc.RouterStub,
    items: Sequence[tuple[str, bytes, str]],
    nonce: str,
    metadata: tuple[tuple[str, str], ...],
    timeout_s: float,
) -> Call:
    """Router.Learn of labelled photos, each call a new image (no duplicate short cut)."""
    photos = UniquePhotos([data for _, data, _ in items], nonce + "-learn")
    labels = [label for _, _, label in items]

    async def call() -> Sequence[str]:
        label = labels[photos.issued % len(labels)]
        request = router_pb2.LearnRequest(image=photos(), taxon_id=label, source="bench")
        reply = await stub.Learn(request, timeout=timeout_s, metadata=metadata)
        return ["duplicate"] if reply.duplicate else []

    return call


def decode_for_triton(photos: Sequence[bytes]) -> list[np.ndarray]:
    """Each photo as the router hands it to Triton: decoded, 64x64x3 uint8, batch of one."""
    return [decode(p, _LIMITS).rgb[None] for p in photos]


def triton_call(
    client: TritonClient, arrays: Sequence[np.ndarray], timeout_s: float, model: str
) -> Call:
    """One inference of the broad net `model` per call through the router's own Triton client,
    batch 1."""
    cycle = itertools.cycle(arrays)

    async def call() -> Sequence[str]:
        await client.infer_broad(next(cycle), timeout_s=timeout_s, model=model)
        return ()

    return call


@dataclass
class IndexStats:
    """Router.IndexExemplars: labelled photos streamed in chunks, one call per chunk."""

    images: int = 0
    calls: list[float] = field(default_factory=list)  # ms per call
    indexed: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def summary(self, chunk: int) -> dict[str, Any]:
        return {
            "requests": len(self.calls) + sum(self.errors.values()),
            "ok": len(self.calls),
            "errors": dict(self.errors),
            "elapsed_s": self.elapsed_s,
            "images": self.images,
            "chunk_images": chunk,
            "images_per_s": self.indexed / self.elapsed_s if self.elapsed_s > 0 else None,
            "qps": len(self.calls) / self.elapsed_s if self.elapsed_s > 0 else None,
            "latency_ms": percentiles(self.calls),
            "indexed": self.indexed,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
        }


async def index_exemplars(
    stub: router_pb2_grpc.RouterStub,
    items: Sequence[tuple[str, bytes, str]],
    chunk: int,
    source: str,
    timeout_s: float,
    on_chunk: Callable[[int], None] | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> IndexStats:
    """Streams `items` to IndexExemplars, `chunk` photos per call, one call at a time (the
    router serialises writes into its store anyway)."""
    stats = IndexStats()
    t0 = time.perf_counter()
    it = iter(items)
    while batch := list(islice(it, chunk)):
        requests = [
            router_pb2.IndexExemplarsRequest(image=data, label=wnid, source=source)
            for _, data, wnid in batch
        ]
        c0 = time.perf_counter()
        try:
            reply = await stub.IndexExemplars(iter(requests), timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            stats.errors[error_code(exc)] += 1
            continue
        stats.calls.append((time.perf_counter() - c0) * 1e3)
        stats.images += len(batch)
        stats.indexed += reply.indexed
        stats.duplicates += reply.duplicates
        stats.rejected += reply.rejected
        if on_chunk is not None:
            on_chunk(len(batch))
    stats.elapsed_s = time.perf_counter() - t0
    return stats
