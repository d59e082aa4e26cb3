"""Fair share under load: per-client concurrency and rate limits and load shedding, decided
before a call reaches its handler.

`FairShare` holds the state and makes every decision; it knows nothing of gRPC and takes its
clock as an argument, so it is tested without waiting. `FairShareAdmission` is the glue the
server interceptor (`ExceptionToStatusInterceptor(admission=...)`) calls once per call: it
names the caller (`identity`), asks `FairShare`, and hands back the function that frees the
call's place when the call ends. A refusal is a typed error the interceptor maps like any
other, with a retry hint as trailing metadata (`retry-after-ms`) and in the message:

- a client over its own limits gets RESOURCE_EXHAUSTED ("client limit ...; retry in N ms");
- any call while the whole server is over its shedding bound gets UNAVAILABLE ("overloaded,
  retry in N ms"), at once, instead of queueing behind the calls already in flight.

The shedding signal is the number of calls admitted and not yet finished (in flight). In the
router a call's time is its wait for the batched backend calls plus its own work, so latency
grows with the calls in flight (Little's law: in flight = throughput x latency), and the count
is exact and costs nothing to read; a queue-age signal would need a queue the router does not
have (calls wait inside the backend batchers, one per backend).

Retry hints spread the retries of one client (or, for shedding, of everyone) over time instead
of telling every refused caller the same instant: each refusal books the next free spot of a
virtual queue that advances by the time one place takes to free up (the mean call time divided
by the limit; 1 / rate for the rate limit). A client that honours its hints thus comes back
about as fast as places free up, and one that ignores them is told to wait longer and longer
(up to MAX_RETRY_S).

All of it runs on the server's event loop: no locks.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from fieldlens.common.errors import ResourceExhausted, Unavailable
from fieldlens.common.telemetry import Metrics, get_metrics

# A client's state (its calls in flight, its bucket) is dropped once it has been idle this long,
# or longer if its bucket takes longer to fill up again; the least recently admitted idle
# client goes first whenever MAX_CLIENTS are tracked. A client that comes back starts afresh,
# with a full bucket.
IDLE_S = 60.0
MAX_CLIENTS = 10_000
# Entries an admission looks at from the least recently admitted end, to drop idle ones.
_EVICT_STEPS = 8
# Retry hints are at least 1 ms and at most this.
MAX_RETRY_S = 5.0
# The mean time of a call, used to size hints: a guess until calls have been timed, then an
# exponentially weighted mean with this weight per call.
INITIAL_CALL_S = 0.02
CALL_TIME_WEIGHT = 0.05
LIMIT_REASONS = ("in_flight", "rate")
SHED_REASONS = ("in_flight",)

# Names the client of a call from its gRPC context.
Identity = Callable[[Any], str]


def peer_identity(context: Any) -> str:
    """The default identity: the connection's peer address, e.g. "ipv4:10.0.0.7:53412".

    One client per connection: a client that opens several connections counts as several, and
    behind a proxy (an ingress, a mesh sidecar) every client is the proxy. Deployments that
    can name their clients by credential pass another `identity` to `FairShareAdmission`.
    """
    return str(context.peer() or "unknown")


@dataclass(frozen=True)
class Limits:
    """What `FairShare` enforces; a 0 turns that limit off.

    Attributes:
        client_in_flight: Most calls of one client in flight at once.
        client_rate: Calls one client may start per second, on average (token bucket).
        client_burst: Calls a client may start at once after being idle (the bucket's size);
            0 means one second's worth of `client_rate` (at least 1).
        shed_in_flight: Calls in flight (all clients) from which sheddable calls are refused.
        max_clients: Most clients whose state is kept (see IDLE_S).
        idle_s: Seconds after which an idle client's state may be dropped.
    """

    client_in_flight: int = 0
    client_rate: float = 0.0
    client_burst: int = 0
    shed_in_flight: int = 0
    max_clients: int = MAX_CLIENTS
    idle_s: float = IDLE_S

    def __post_init__(self) -> None:
        for name in ("client_in_flight", "client_burst", "shed_in_flight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.client_rate >= 0 or math.isinf(self.client_rate):
            raise ValueError("client_rate must be a finite number >= 0")
        if self.max_clients < 1 or not self.idle_s > 0:
            raise ValueError("max_clients must be >= 1 and idle_s > 0")

    @property
    def per_client(self) -> bool:
        """Whether any per-client limit is on (else no client state is kept at all)."""
        return self.client_in_flight > 0 or self.client_rate > 0

    @property
    def burst(self) -> float:
        return float(self.client_burst or max(1, math.ceil(self.client_rate)))

    @property
    def keep_idle_s(self) -> float:
        """How long an idle client's state is worth keeping: until its bucket is full again."""
        refill = self.burst / self.client_rate if self.client_rate else 0.0
        return max(self.idle_s, refill)


class _Client:
    """One client's state."""

    __slots__ = ("in_flight", "tokens", "refilled_at", "retry_at", "seen_at")

    def __init__(self, tokens: float, now: float) -> None:
        self.in_flight = 0
        self.tokens = tokens
        self.refilled_at = now
        # The virtual queue of refused calls: the next free spot (see the module docstring).
        self.retry_at = 0.0
        self.seen_at = now


class Ticket:
    """One admitted call's place; `release` frees it (once, however often it is called)."""

    __slots__ = ("_owner", "_client", "_started")

    def __init__(self, owner: FairShare, client: _Client | None, started: float | None) -> None:
        self._owner: FairShare | None = owner
        self._client = client
        self._started = started

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self._client, self._started)


def _book(now: float, queue_at: float, wait_s: float, spacing_s: float) -> tuple[float, float]:
    """The wait before a refused call should come back, and the virtual queue's next spot.

    The call gets the later of `now + wait_s` and the queue's next spot; the spot after it is
    `spacing_s` later. Both stay within MAX_RETRY_S of now.
    """
    at = min(max(now + wait_s, queue_at), now + MAX_RETRY_S)
    return at - now, min(at + spacing_s, now + MAX_RETRY_S)


def _ms(seconds: float) -> int:
    """Whole milliseconds, rounded up (but not for float noise), at least 1."""
    return max(1, math.ceil(seconds * 1000 - 1e-6))


class FairShare:
    """Per-client concurrency and rate limits and load shedding, as decisions on admission.

    Args:
        limits: What to enforce.
        clock: Monotonic seconds; tests pass a fake one.
        metrics: Where refusals are counted (`fieldlens_requests_limited_total`,
            `fieldlens_requests_shed_total`); default `get_metrics()`.
    """

    def __init__(
        self,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._shed_queue_at = 0.0
        # Calls admitted and not yet finished, every client: the shedding signal.
        self.in_flight = 0
        # Mean time of a timed call, in seconds (sizes the retry hints).
        self.call_s = INITIAL_CALL_S
        self.metrics = metrics = metrics or get_metrics()
        self._limited = {r: metrics.requests_limited.labels(reason=r) for r in LIMIT_REASONS}
        self._shed = {r: metrics.requests_shed.labels(reason=r) for r in SHED_REASONS}

    @property
    def clients(self) -> int:
        """Clients whose state is kept now."""
        return len(self._clients)

    def admit(self, client: str, *, sheddable: bool = True, timed: bool = True) -> Ticket:
        """Admit one call of `client` or refuse it.

        Args:
            client: Who makes the call (see `Identity`).
            sheddable: Whether the call may be shed when the server is over its bound.
            timed: Whether the call's duration feeds the mean call time behind the hints
                (not for streams and other calls whose length says nothing about load).

        Returns:
            The call's ticket; release it when the call ends, however it ends.

        Raises:
            Unavailable: the server is over its shedding bound (`retry_after_ms` set).
            ResourceExhausted: `client` is over one of its limits (`retry_after_ms` set).
        """
        now = self._clock()
        limits = self.limits
        if sheddable and limits.shed_in_flight and self.in_flight >= limits.shed_in_flight:
            spacing = self.call_s / limits.shed_in_flight
            wait, self._shed_queue_at = _book(now, self._shed_queue_at, spacing, spacing)
            self._shed["in_flight"].inc()
            ms = _ms(wait)
            raise Unavailable(
                f"overloaded, retry in {ms} ms: {self.in_flight} requests in flight here",
                retry_after_ms=ms,
            )
        state = None
        if limits.per_client:
            state = self._client(client, now)
            if limits.client_in_flight and state.in_flight >= limits.client_in_flight:
                spacing = self.call_s / limits.client_in_flight
                wait, state.retry_at = _book(now, state.retry_at, spacing, spacing)
                self._limited["in_flight"].inc()
                ms = _ms(wait)
                raise ResourceExhausted(
                    f"client limit of {limits.client_in_flight} requests in flight reached; "
                    f"retry in {ms} ms",
                    retry_after_ms=ms,
                )
            if limits.client_rate:
                rate = limits.client_rate
                state.tokens = min(limits.burst, state.tokens + (now - state.refilled_at) * rate)
                state.refilled_at = now
                if state.tokens < 1.0 - 1e-9:  # not refused for float noise
                    to_next = (1.0 - state.tokens) / rate
                    wait, state.retry_at = _book(now, state.retry_at, to_next, 1.0 / rate)
                    self._limited["rate"].inc()
                    ms = _ms(wait)
                    raise ResourceExhausted(
                        f"client limit of {rate:g} requests/s (burst {limits.burst:g}) "
                        f"reached; retry in {ms} ms",
                        retry_after_ms=ms,
                    )
                state.tokens = max(0.0, state.tokens - 1.0)
            state.in_flight += 1
        self.in_flight += 1
        return Ticket(self, state, now if timed else None)

    def _release(self, state: _Client | None, started: float | None) -> None:
        self.in_flight -= 1
        now = self._clock()
        if state is not None:
            state.in_flight -= 1
            state.seen_at = now
        if started is not None:
            self.call_s += CALL_TIME_WEIGHT * (now - started - self.call_s)

    def _client(self, name: str, now: float) -> _Client:
        state = self._clients.get(name)
        if state is None:
            self._evict(now)
            state = self._clients[name] = _Client(self.limits.burst, now)
        else:
            self._clients.move_to_end(name)
            state.seen_at = now
        return state

    def _evict(self, now: float) -> None:
        """Drops idle clients from the least recently admitted end: those idle for longer than
        `keep_idle_s`, and while the table is full, the oldest idle ones. A client with calls in
        flight is never dropped (it goes to the other end), so the table can hold more than
        `max_clients` only while that many clients have calls in flight."""
        clients, limits = self._clients, self.limits
        keep_s = limits.keep_idle_s
        for _ in range(max(_EVICT_STEPS, len(clients) - limits.max_clients + 1)):
            if not clients:
                return
            name, oldest = next(iter(clients.items()))
            full = len(clients) >= limits.max_clients
            if not full and now - oldest.seen_at < keep_s:
                return
            if oldest.in_flight:
                clients.move_to_end(name)
            else:
                del clients[name]


# The gRPC context as the interceptor passes it.
_Context = Any


class FairShareAdmission:
    """The interceptor's admission policy for one gRPC service (see `interceptors.Admission`).

    Every method of `service` but those in `exempt` is admitted through `fair_share`; calls to
    other services (health, reflection) and to exempt methods are not counted at all.

    Args:
        fair_share: The limits and their state.
        service: Fully-qualified gRPC service name, e.g. "fieldlens.v1.Router".
        exempt: Its methods that are never limited nor counted (cheap metadata calls).
        unsheddable: Its methods that are never shed (they still count in flight and against
            their client's limits).
        untimed: Its methods whose durations say nothing about load (streams, long admin
            calls); they do not feed the mean call time behind the retry hints.
        identity: Names a call's client from its context; default `peer_identity`. This is
            the hook for credentials: a function that returns a token's name when the call
            carries a known one, and the peer address otherwise, makes the limits per
            credential.
    """

    def __init__(
        self,
        fair_share: FairShare,
        service: str,
        *,
        exempt: Collection[str] = (),
        unsheddable: Collection[str] = (),
        untimed: Collection[str] = (),
        identity: Identity = peer_identity,
    ) -> None:
        self.fair_share = fair_share
        self.service = service
        self.exempt = frozenset(exempt)
        self.unsheddable = frozenset(unsheddable)
        self.untimed = frozenset(untimed)
        self.identity = identity
        fair_share.metrics.watch_admission(
            service, lambda: fair_share.in_flight, lambda: fair_share.clients
        )

    def __call__(self, method: str) -> Callable[[_Context], Callable[[], None]] | None:
        """The admission of `method` ("/pkg.Service/Method"), or None when it is not admitted."""
        service, _, name = method.lstrip("/").rpartition("/")
        if service != self.service or name in self.exempt:
            return None
        admit = self.fair_share.admit
        identity = self.identity
        sheddable = name not in self.unsheddable
        timed = name not in self.untimed

        def admit_call(context: _Context) -> Callable[[], None]:
            return admit(identity(context), sheddable=sheddable, timed=timed).release

        return admit_call
