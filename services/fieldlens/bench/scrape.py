"""Per-stage breakdowns from /metrics: the router's stage histogram and Triton's counters,
scraped before and after a scenario and differenced."""

from __future__ import annotations

import logging
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

STAGE_HISTOGRAM = "fieldlens_stage_duration_seconds"
ROUTER_SERVICE = "router"
TRITON_MODEL = "broad"
_TRITON_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)
# The router's shadow counters (per candidate): calls compared, and calls dropped because
# the shadow calls in flight were at their cap.
SHADOW_COUNTERS = {
    "fieldlens_rollout_shadow_comparisons_total": "comparisons",
    "fieldlens_rollout_shadow_dropped_total": "dropped",
}
_TIMEOUT_S = 3.0


def fetch(hostport: str | None) -> str | None:
    """The text of http://hostport/metrics, or None when it cannot be read."""
    if not hostport:
        return None
    try:
        with urllib.request.urlopen(f"http://{hostport}/metrics", timeout=_TIMEOUT_S) as r:
            return str(r.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError) as exc:
        logger.warning("cannot scrape %s: %s", hostport, exc)
        return None


@dataclass
class Histogram:
    """One label set of a Prometheus histogram: cumulative bucket counts by upper bound."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0


def stage_histograms(text: str | None, service: str = ROUTER_SERVICE) -> dict[str, Histogram]:
    """stage -> histogram of `fieldlens_stage_duration_seconds` for one service."""
    out: dict[str, Histogram] = {}
    if not text:
        return out
    for family in text_string_to_metric_families(text):
        if family.name != STAGE_HISTOGRAM:
            continue
        for s in family.samples:
            if s.labels.get("service") != service:
                continue
            h = out.setdefault(s.labels["stage"], Histogram())
            if s.name.endswith("_bucket"):
                h.buckets[float(s.labels["le"])] = s.value
            elif s.name.endswith("_sum"):
                h.sum = s.value
            elif s.name.endswith("_count"):
                h.count = s.value
    return out


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Approximate quantile from cumulative bucket counts, linear within the bucket (as
    Prometheus' histogram_quantile does); None when the histogram is empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound  # beyond the last finite bucket: its bound is all we know
            width = c - prev_count
            frac = (rank - prev_count) / width if width > 0 else 1.0
            return prev_bound + (b - prev_bound) * frac
        prev_bound, prev_count = b, c
    return prev_bound


def stage_breakdown(
    before: str | None, after: str | None, requests: int
) -> dict[str, dict[str, float | None]]:
    """Per stage over one scenario: observations (and per request), mean and approx. p50 (ms).

    Stages observed several times per request (one `tiny` call per dispatched category) show
    a per-request count above one.
    """
    if before is None or after is None:
        return {}
    h0, h1 = stage_histograms(before), stage_histograms(after)
    out: dict[str, dict[str, float | None]] = {}
    for stage, h in sorted(h1.items()):
        base = h0.get(stage, Histogram())
        count = h.count - base.count
        if count <= 0:
            continue
        delta = {b: v - base.buckets.get(b, 0.0) for b, v in h.buckets.items()}
        p50 = bucket_quantile(0.5, delta)
        out[stage] = {
            "count": count,
            "per_request": count / requests if requests else None,
            "mean_ms": (h.sum - base.sum) / count * 1e3,
            "p50_ms": p50 * 1e3 if p50 is not None else None,
        }
    return out


def triton_counters(text: str | None, model: str = TRITON_MODEL) -> dict[str, float]:
    """Triton's cumulative counters of one model (all versions summed)."""
    out: dict[str, float] = {}
    if not text:
        return out
    for family in text_string_to_metric_families(text):
        # The parser names counter samples `<family>_total`; Triton's text has no suffix.
        if family.name not in _TRITON_COUNTERS:
            continue
        for s in family.samples:
            if s.labels.get("model") == model:
                out[family.name] = out.get(family.name, 0.0) + s.value
    return out


def triton_breakdown(
    before: str | None, after: str | None, model: str = TRITON_MODEL
) -> dict[str, Any]:
    """Triton's view of a scenario on the broad net `model`: requests, executions (batches),
    average batch size, and mean queue / compute time per request in ms."""
    c0, c1 = triton_counters(before, model), triton_counters(after, model)
    if not c0 or not c1:
        return {}
    d = {k: c1.get(k, 0.0) - c0.get(k, 0.0) for k in _TRITON_COUNTERS}
    requests = d["nv_inference_request_success"]
    if requests <= 0:
        return {"requests": 0}

    def per_request_ms(name: str) -> float:
        return d[name] / requests / 1e3

    execs = d["nv_inference_exec_count"]
    return {
        "requests": requests,
        "executions": execs,
        "avg_batch": d["nv_inference_count"] / execs if execs else None,
        "request_ms": per_request_ms("nv_inference_request_duration_us"),
        "queue_ms": per_request_ms("nv_inference_queue_duration_us"),
        "compute_input_ms": per_request_ms("nv_inference_compute_input_duration_us"),
        "compute_infer_ms": per_request_ms("nv_inference_compute_infer_duration_us"),
        "compute_output_ms": per_request_ms("nv_inference_compute_output_duration_us"),
    }


def shadow_totals(text: str | None) -> dict[str, float]:
    """The router's cumulative shadow counters, summed over candidates ({} when unread)."""
    if not text:
        return {}
    out = dict.fromkeys(SHADOW_COUNTERS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = SHADOW_COUNTERS.get(s.name)
            if key is not None:
                out[key] += s.value
    return out


def shadow_breakdown(before: str | None, after: str | None) -> dict[str, float]:
    """Shadow calls compared and dropped over one scenario ({} when a scrape failed)."""
    t0, t1 = shadow_totals(before), shadow_totals(after)
    if not t0 or not t1:
        return {}
    return {k: t1[k] - t0[k] for k in SHADOW_COUNTERS.values()}
