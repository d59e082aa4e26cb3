"""Prometheus metrics, per-stage timing and logging set-up shared by every fieldlens service."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

# Seconds; spans a cache hit (sub-millisecond) to a cold specialist pass on CPU.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Requests per coalesced backend call: 1 at low load, up to the batch limit under load.
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
# Seconds; a model-set switch takes seconds (same backbone) to minutes (a large re-index).
SWITCH_BUCKETS: tuple[float, ...] = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
DEFAULT_METRICS_ADDR = "127.0.0.1"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

CacheResult = Literal["hit", "miss", "stale", "error"]
# Who answered a request during a rollout: the current set, the candidate in its stead (canary),
# or the candidate off the response path (shadow).
RolloutArm = Literal["current", "canary", "shadow"]
# The answers a shadow comparison looks at: the top-1 suggestion, the best-effort answer, and
# the most probable broad group.
ComparedAnswer = Literal["top1", "best_effort", "broad"]
DispatchTarget = Literal["specialist", "tiny"]


class Metrics:
    """Every fieldlens collector, registered once in one registry.

    prometheus_client registers a collector in its registry when it is constructed and refuses
    a second one of the same name, so collectors are built here on first use (see
    `get_metrics`) rather than at import: importing a module has no side effect, and tests can
    use a fresh `CollectorRegistry` each.

    Args:
        registry: Where the collectors are registered.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.grpc_requests = Counter(
            "fieldlens_grpc_requests",
            "gRPC requests handled, by final status code.",
            ("service", "method", "code"),
            registry=registry,
        )
        self.grpc_duration = Histogram(
            "fieldlens_grpc_request_duration_seconds",
            "Server-side duration of gRPC requests, streaming ones included end to end.",
            ("service", "method"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.write_requests = Counter(
            "fieldlens_write_requests",
            "Write RPCs (Learn, LearnStream, Forget, IndexExemplars, SwitchModelSet) by client "
            "(a token's name from the tokens file, write-token for FIELDLENS_WRITE_TOKEN, empty "
            "when unauthenticated) and final status code.",
            ("method", "client", "code"),
            registry=registry,
        )
        self.stage_duration = Histogram(
            "fieldlens_stage_duration_seconds",
            "Duration of one stage of request handling.",
            ("service", "stage"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "fieldlens_backend_batch_size",
            "Requests served by one coalesced backend call (see common/batching.py), by backend.",
            ("service", "backend"),
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.learned_examples = Counter(
            "fieldlens_learned_examples",
            "Labelled examples learned online (durable and applied).",
            registry=registry,
        )
        self.learn_seconds = Histogram(
            "fieldlens_learn_seconds",
            "Time of one Learn batch from embedding to the last durable write.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache_requests = Counter(
            "fieldlens_cache_requests",
            "Result-cache look-ups by outcome.",
            ("result",),
            registry=registry,
        )
        self.dispatch = Counter(
            "fieldlens_dispatch",
            "Broad categories dispatched, by the classifier that answered.",
            ("category", "target", "fallback"),
            registry=registry,
        )
        self.degradations = Counter(
            "fieldlens_degradations",
            "Optional stages that failed and were worked around, by kind.",
            ("kind",),
            registry=registry,
        )

        self.runtime = Gauge(
            "fieldlens_runtime",
            "1, labelled with how this process runs (common/runtime.py): its event loop, gRPC "
            "core experiments and objects frozen out of the garbage collector at start.",
            ("event_loop", "grpc_experiments", "gc_frozen"),
            registry=registry,
        )
        self.model_set = Gauge(
            "fieldlens_model_set",
            "1 for the model set this router serves (its version and embedding space).",
            ("version", "embedding_version"),
            registry=registry,
        )
        self.model_set_switches = Counter(
            "fieldlens_model_set_switches",
            "Model-set switches started here (Router.SwitchModelSet or following another "
            "replica), by outcome.",
            ("result",),
            registry=registry,
        )
        for result in ("ok", "failed"):  # exported at 0 before the first switch
            self.model_set_switches.labels(result=result)
        self.model_set_switch_seconds = Histogram(
            "fieldlens_model_set_switch_seconds",
            "Duration of one successful model-set switch, from the request to the new set "
            "serving (nets loaded, knowledge restored, re-index and re-learning included).",
            buckets=SWITCH_BUCKETS,
            registry=registry,
        )
        # Rollouts (router/rollout.py): a candidate set next to the current one.
        self.rollout_canary_weight = Gauge(
            "fieldlens_rollout_canary_weight",
            "Share of images the candidate model set answers instead of the current one.",
            ("candidate",),
            registry=registry,
        )
        self.rollout_shadow_fraction = Gauge(
            "fieldlens_rollout_shadow_fraction",
            "Share of the current set's Classify requests the candidate also answers, off the "
            "response path.",
            ("candidate",),
            registry=registry,
        )
        self.rollout_requests = Counter(
            "fieldlens_rollout_requests",
            "Classify requests during a rollout, by arm (current: the current set served it; "
            "canary: the candidate served it; shadow: the candidate answered it off the "
            "response path) and status code.",
            ("candidate", "arm", "code"),
            registry=registry,
        )
        self.rollout_seconds = Histogram(
            "fieldlens_rollout_request_seconds",
            "Time of one Classify answer on the router during a rollout, by arm (see "
            "fieldlens_rollout_requests).",
            ("candidate", "arm"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rollout_comparisons = Counter(
            "fieldlens_rollout_shadow_comparisons",
            "Shadowed requests both sets answered: the denominator of the agreement ratios.",
            ("candidate",),
            registry=registry,
        )
        self.rollout_agreements = Counter(
            "fieldlens_rollout_shadow_agreements",
            "Shadowed requests whose two answers were the same, by answer (top1: the top "
            "suggestion; best_effort: the best-effort answer; broad: the most probable broad "
            "group).",
            ("candidate", "answer"),
            registry=registry,
        )
        self.rollout_agreement_depth = Counter(
            "fieldlens_rollout_shadow_agreement_depth",
            "Shadowed requests by the deepest taxonomy level at which the two answers agree: "
            "the depth of the deepest taxon both answers' paths share (Taxon.depth: 0 the "
            "root, 1 a domain, 2 a broad group, the leaves deepest), by answer (top1, "
            "best_effort).",
            ("candidate", "answer", "depth"),
            registry=registry,
        )
        self.rollout_broad_pairs = Counter(
            "fieldlens_rollout_shadow_broad_pairs",
            "Shadowed requests by the most probable broad group of each answer (current_broad: "
            "the serving set's; candidate_broad: the candidate's; none when an answer has "
            "none): the confusion between the two sets by broad group, at most one series per "
            "pair of broad groups.",
            ("candidate", "current_broad", "candidate_broad"),
            registry=registry,
        )
        self.rollout_shadow_dropped = Counter(
            "fieldlens_rollout_shadow_dropped",
            "Shadow calls not made because the bound on shadow calls in flight was reached.",
            ("candidate",),
            registry=registry,
        )

        # Admission (common/limits.py): a service exports these once it admits calls, its
        # reasons at 0 from the start.
        self.requests_limited = Counter(
            "fieldlens_requests_limited",
            "Calls refused RESOURCE_EXHAUSTED because their client was over a per-client "
            "limit, by limit (in_flight, rate).",
            ("reason",),
            registry=registry,
        )
        self.requests_shed = Counter(
            "fieldlens_requests_shed",
            "Calls answered UNAVAILABLE at once because the server was over its load-shedding "
            "bound, by signal (in_flight).",
            ("reason",),
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            "fieldlens_requests_in_flight",
            "Admitted calls not yet finished (the load-shedding signal), by gRPC service.",
            ("service",),
            registry=registry,
        )
        self.limited_clients = Gauge(
            "fieldlens_limited_clients",
            "Clients whose per-client limit state is kept (bounded; idle ones are dropped).",
            ("service",),
            registry=registry,
        )

        # Labelled children, looked up once: `labels()` takes a lock and builds a key per call,
        # which the router would otherwise pay several times per request.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_stage(self, service: str, stage: str, seconds: float) -> None:
        """One duration of one stage of request handling."""
        self._child(self.stage_duration, service, stage).observe(seconds)

    def batch_observer(self, service: str, backend: str) -> Callable[[int], None]:
        """What a MicroBatcher calls with the size of each batch it sends to `backend`."""
        return self._child(self.batch_size, service, backend).observe  # type: ignore[no-any-return]

    def record_model_set(self, version: str, embedding_version: str) -> None:
        """The set now serving: the only series of `fieldlens_model_set` set to 1."""
        self.model_set.clear()
        self.model_set.labels(version=version, embedding_version=embedding_version).set(1)

    def record_switch(self, ok: bool, seconds: float = 0.0) -> None:
        """Count one switch attempt; time the ones that succeeded."""
        self.model_set_switches.labels(result="ok" if ok else "failed").inc()
        if ok:
            self.model_set_switch_seconds.observe(seconds)

    def record_rollout(self, candidate: str | None, canary_weight: float, fraction: float) -> None:
        """The rollout now running (None: none); only its candidate's gauges are exported."""
        for gauge in (self.rollout_canary_weight, self.rollout_shadow_fraction):
            gauge.clear()
        if candidate is not None:
            self.rollout_canary_weight.labels(candidate=candidate).set(canary_weight)
            self.rollout_shadow_fraction.labels(candidate=candidate).set(fraction)
            for arm in ("current", "canary", "shadow"):  # exported at 0 from the start
                self._child(self.rollout_requests, candidate, arm, "OK")
            self._child(self.rollout_comparisons, candidate)
            self._child(self.rollout_shadow_dropped, candidate)
            for answer in ("top1", "best_effort", "broad"):
                self._child(self.rollout_agreements, candidate, answer)

    def record_rollout_request(
        self, candidate: str, arm: RolloutArm, code: str, seconds: float
    ) -> None:
        """Count one answer of one arm of a rollout by status code, and time it."""
        self._child(self.rollout_requests, candidate, arm, code).inc()
        self._child(self.rollout_seconds, candidate, arm).observe(seconds)

    def record_shadow_comparison(
        self,
        candidate: str,
        agreed: Mapping[ComparedAnswer, bool],
        depths: Mapping[str, int],
        broads: tuple[str, str] | None = None,
    ) -> None:
        """Count one shadow comparison: which answers agreed, the deepest level at which each
        compared answer agrees (`depths`: {"top1": d, "best_effort": d}), and the pair of
        most probable broad groups (`broads`: the current set's, the candidate's)."""
        self._child(self.rollout_comparisons, candidate).inc()
        for answer, same in agreed.items():
            if same:
                self._child(self.rollout_agreements, candidate, answer).inc()
        for answer, depth in depths.items():
            self._child(self.rollout_agreement_depth, candidate, answer, str(depth)).inc()
        if broads is not None:
            current, other = (broad or "none" for broad in broads)
            self._child(self.rollout_broad_pairs, candidate, current, other).inc()

    def record_shadow_dropped(self, candidate: str) -> None:
        """Count one shadow call left out at the bound on shadow calls in flight."""
        self._child(self.rollout_shadow_dropped, candidate).inc()

    def record_learn(self, examples: int, seconds: float) -> None:
        """Count learned examples and time one durable Learn batch."""
        self.learned_examples.inc(examples)
        self.learn_seconds.observe(seconds)

    def record_cache(self, result: CacheResult) -> None:
        """Count one cache look-up."""
        self._child(self.cache_requests, result).inc()

    def record_dispatch(self, category: str, target: DispatchTarget, fallback: bool) -> None:
        """Count one broad category dispatched to `target` (fallback: specialist was down)."""
        self._child(self.dispatch, category, target, "true" if fallback else "false").inc()

    def record_degradation(self, kind: str) -> None:
        """Count one degradation; `kind` is a DegradationKind name, lower-cased here."""
        self._child(self.degradations, kind.lower()).inc()

    def record_write(self, method: str, client: str, code: str) -> None:
        """Count one write RPC by the client that made it and its final status code."""
        self._child(self.write_requests, method, client, code).inc()

    def watch_admission(
        self, service: str, in_flight: Callable[[], float], clients: Callable[[], float]
    ) -> None:
        """Export an admission's calls in flight and tracked clients, read at scrape time."""
        self.requests_in_flight.labels(service=service).set_function(in_flight)
        self.limited_clients.labels(service=service).set_function(clients)

    def record_request(self, service: str, method: str, code: str, seconds: float) -> None:
        """Count one gRPC request by its final status code and time it."""
        self._child(self.grpc_requests, service, method, code).inc()
        self._child(self.grpc_duration, service, method).observe(seconds)


_metrics: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()
_metrics_lock = threading.Lock()


def get_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Return the `Metrics` of `registry` (default: the global one), building it on first use."""
    if registry is None:
        registry = prometheus_client.REGISTRY
    with _metrics_lock:
        metrics = _metrics.get(registry)
        if metrics is None:
            metrics = Metrics(registry)
            _metrics[registry] = metrics
        return metrics


@dataclass(frozen=True)
class StageDuration:
    """How long one stage of one request took."""

    stage: str
    seconds: float

    @property
    def milliseconds(self) -> float:
        return self.seconds * 1e3


class StageTimer:
    """Collects the stage durations of one request, to be copied into its response.

    Args:
        service: Value of the `service` label, e.g. "router".
        metrics: Where to observe durations; default `get_metrics()`.
    """

    __slots__ = ("service", "metrics", "durations")

    def __init__(self, service: str, metrics: Metrics | None = None) -> None:
        self.service = service
        self.metrics = metrics or get_metrics()
        self.durations: list[StageDuration] = []

    def observe(self, name: str, started: float) -> None:
        """Records stage `name` as lasting from `started` (time.perf_counter()) until now."""
        seconds = time.perf_counter() - started
        self.metrics.observe_stage(self.service, name, seconds)
        self.durations.append(StageDuration(name, seconds))

    def stage(self, name: str) -> _Stage:
        """Context manager timing one stage of this request: it observes the stage histogram
        and appends to `durations`, also when the stage raises (slow failures are what the
        histogram is for)."""
        return _Stage(self, name)


class _Stage:
    __slots__ = ("_timer", "_name", "_start")

    def __init__(self, timer: StageTimer, name: str) -> None:
        self._timer = timer
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        self._timer.observe(self._name, self._start)


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(
    port: int,
    addr: str = DEFAULT_METRICS_ADDR,
    registry: CollectorRegistry | None = None,
) -> MetricsEndpoint | None:
    """Serve /metrics on addr:port from a daemon thread; port 0 disables it and returns None.

    The default address is loopback so that a local run exposes nothing; deployments set
    FIELDLENS_METRICS_ADDR=0.0.0.0 for the scraper.
    """
    if port == 0:
        logger.info("metrics endpoint disabled")
        return None
    server, thread = prometheus_client.start_http_server(
        port, addr=addr, registry=registry if registry is not None else prometheus_client.REGISTRY
    )
    logger.info("metrics on http://%s:%d/metrics", addr, port)
    return MetricsEndpoint(server, thread)


def configure_logging(level: str | int = "INFO") -> None:
    """Send log records to stderr in one format; replaces handlers set up before."""
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)
