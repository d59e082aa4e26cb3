"""What a bench run measures and for how long: the full and quick presets, plus overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fieldlens.common.settings import REPO_ROOT

DEFAULT_OUT_DIR = REPO_ROOT / "bench" / "results"
SWEEP_LEVELS = (1, 2, 4, 8, 16, 32, 64)
QUICK_SWEEP_LEVELS = (1, 4, 16)
MIXED_HIT_FRACTION = 0.8
OPEN_LOOP_LOAD = 0.5  # default open-loop rate as a fraction of the router's saturated QPS
# In-flight count of the cache-miss point that the CPU goal (C1) reads and --profile samples.
CPU_POINT = 16
# Noisy neighbour (fair share, issue 20): a quiet client at 1 in flight next to a noisy one at
# NOISY_CONCURRENCY, each on its own connection, cache misses. The noisy client's deadline is
# the Classify latency SLO's bound, so without limits its calls time out; the quiet one's is
# the plan's. The limits of the "on" run, set on a router restarted for it: two calls in
# flight per client, the knee of the router's sweep on 2 cores (p99 +30% from 1 to 2 in
# flight, +80% to 4).
NOISY_CONCURRENCY = 64
NOISY_DEADLINE_S = 0.25
FAIR_SHARE_ENV: tuple[tuple[str, str], ...] = (("FIELDLENS_CLIENT_IN_FLIGHT", "2"),)
# Shadow rollout (issue 19): cache misses at SHADOW_CONCURRENCY in flight on the serving set
# alone, then with a candidate (the shipped set published again under SHADOW_SUFFIX) shadowing
# SHADOW_FRACTION of them. Its goals (S1, S2) are loose, SHADOW_MAX_RATIO: the router caps
# shadow calls in flight and drops the rest, so shadowing must not cost the caller much.
SHADOW_CONCURRENCY = 8
SHADOW_FRACTION = 0.2
SHADOW_SUFFIX = "-shadow"
SHADOW_MAX_RATIO = 1.5


@dataclass(frozen=True)
class Plan:
    """Durations and sizes of one run. Every loop of the bench is bounded by these.

    Attributes:
        mode: "full" or "quick".
        duration_s: measured seconds of each load scenario point.
        warmup_s: unmeasured seconds before each point, at the same concurrency.
        sweep_levels: in-flight counts of the closed-loop sweep.
        mixed_concurrency: in-flight count of the mixed hit/miss scenario.
        open_loop_s: seconds of Poisson arrivals in the open-loop scenario.
        rate: open-loop arrivals per second; None = OPEN_LOOP_LOAD x saturated router QPS.
        gallery_per_class: exemplars indexed per class (the IndexExemplars scenario).
        miss_pool: distinct photos cycled through by the cache-miss scenarios.
        hit_pool: photos answered once, then repeated by the cache-hit scenarios.
        max_requests: cap on requests of one scenario point, whatever its duration.
        request_timeout_s: per-call deadline.
        micro_budget_s: timing budget of each micro-benchmark case.
        store_sizes: exemplar counts of the neighbour-search micro-benchmark (small, large).
        store_queries: searches timed per store size (at most; also bounded by the budget).
        profile_s: seconds py-spy samples the router for (--profile only).
    """

    mode: str
    duration_s: float
    warmup_s: float
    sweep_levels: tuple[int, ...]
    mixed_concurrency: int
    open_loop_s: float
    rate: float | None
    gallery_per_class: int
    miss_pool: int
    hit_pool: int
    max_requests: int
    request_timeout_s: float
    micro_budget_s: float
    store_sizes: tuple[int, int]
    store_queries: int
    profile_s: float

    @classmethod
    def full(cls) -> Plan:
        # About 7 minutes on 2 CPU cores: 13 sweep points x 9 s, four more scenarios, the
        # gallery, the 100k-exemplar HNSW build (~40-60 s), the shadow rollout (two points and
        # the candidate's load, ~25 s) and the noisy neighbour (three points and a router
        # restart, ~35 s).
        return cls(
            mode="full",
            duration_s=8.0,
            warmup_s=1.0,
            sweep_levels=SWEEP_LEVELS,
            mixed_concurrency=8,
            open_loop_s=12.0,
            rate=None,
            gallery_per_class=5,
            miss_pool=2000,
            hit_pool=64,
            max_requests=50_000,
            request_timeout_s=30.0,
            micro_budget_s=2.0,
            store_sizes=(10_000, 100_000),
            store_queries=500,
            profile_s=15.0,
        )

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            mode="quick",
            duration_s=1.5,
            warmup_s=0.3,
            sweep_levels=QUICK_SWEEP_LEVELS,
            mixed_concurrency=4,
            open_loop_s=2.0,
            rate=None,
            gallery_per_class=1,
            miss_pool=300,
            hit_pool=16,
            max_requests=5_000,
            request_timeout_s=30.0,
            micro_budget_s=0.3,
            store_sizes=(2_000, 20_000),
            store_queries=100,
            profile_s=3.0,
        )

    def with_overrides(
        self,
        duration_s: float | None = None,
        max_concurrency: int | None = None,
        rate: float | None = None,
    ) -> Plan:
        """A copy with command-line overrides applied (None leaves a value as it is)."""
        changes: dict[str, object] = {}
        if duration_s is not None:
            if duration_s <= 0:
                raise ValueError("--duration must be positive")
            changes["duration_s"] = duration_s
            changes["open_loop_s"] = self.open_loop_s * duration_s / self.duration_s
        if max_concurrency is not None:
            if max_concurrency < 1:
                raise ValueError("--max-concurrency must be at least 1")
            levels = [n for n in SWEEP_LEVELS if n <= max_concurrency]
            if self.mode == "quick":
                levels = [n for n in self.sweep_levels if n <= max_concurrency]
            if max_concurrency not in levels:
                levels.append(max_concurrency)
            changes["sweep_levels"] = tuple(sorted(set(levels)))
            changes["mixed_concurrency"] = min(self.mixed_concurrency, max_concurrency)
        if rate is not None:
            if rate <= 0:
                raise ValueError("--rate must be positive")
            changes["rate"] = rate
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def max_concurrency(self) -> int:
        return max(self.sweep_levels)
