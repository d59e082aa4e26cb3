"""Rules, dashboard and autoscaler against what the local cluster really exports, scraped by the
real Prometheus server (the binary of Debian's prometheus package)."""

from __future__ import annotations

import math

import pytest
from k8s_helpers import (
    adapter_exprs,
    base_name,
    dashboard_exprs,
    metric_names,
    recorded_names,
    rule_exprs,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STAGES = {"decode", "cache_get", "broad", "tiny", "neighbours", "classify", "merge", "cache_set"}


def _exists(name: str, samples: set[str], histograms: set[str], declared: set[str]) -> bool:
    """A sample of that name, a histogram family it is a series of, or a family declared
    without series yet (the rollout metrics, whose labels exist only during a rollout)."""
    if name != base_name(name) and base_name(name) in histograms:
        return True
    return name in samples or (name in declared and name not in histograms)


@pytest.mark.parametrize(
    "source",
    ["prometheus-rule", "grafana-dashboard", "prometheus-adapter"],
)
def test_every_referenced_metric_is_exported_by_the_live_cluster(live_stack, source):
    exprs = {
        "prometheus-rule": rule_exprs,
        "grafana-dashboard": dashboard_exprs,
        "prometheus-adapter": adapter_exprs,
    }[source]()
    samples = set().union(*(e.samples for e in live_stack.scraped.values()))
    histograms = set().union(*(e.histograms for e in live_stack.scraped.values()))
    declared = set().union(*(e.declared for e in live_stack.scraped.values()))
    recorded = recorded_names()
    referenced = set().union(*(metric_names(e) for e in exprs))
    assert referenced
    missing = sorted(
        n for n in referenced if n not in recorded and not _exists(n, samples, histograms, declared)
    )
    assert not missing, f"{source} references metrics no component exports: {missing}"


def test_each_component_exports_its_own_metrics(live_stack):
    scraped = live_stack.scraped
    for name in ("router", "specialist", "tiny"):
        assert "fieldlens_grpc_requests_total" in scraped[name].samples, name
    router = scraped["router"].samples
    for metric in (
        "fieldlens_stage_duration_seconds_bucket",
        "fieldlens_cache_requests_total",
        "fieldlens_dispatch_total",
        "fieldlens_degradations_total",
    ):
        assert metric in router, metric
    # Declared with no series while no rollout runs: the dashboard's rollout row and the
    # rollout alerts name families the router has from its start.
    for metric in (
        "fieldlens_rollout_requests_total",
        "fieldlens_rollout_request_seconds",
        "fieldlens_rollout_shadow_comparisons_total",
        "fieldlens_rollout_shadow_agreements_total",
    ):
        assert metric in scraped["router"].declared, metric
    assert "nv_inference_queue_duration_us" in scraped["triton"].samples


def test_prometheus_scrapes_every_component(prometheus):
    targets = prometheus.api("/api/v1/targets")["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == set(prometheus.metrics_targets)
    assert all(t["health"] == "up" for t in targets), targets


def _values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def test_prometheus_computes_classify_latency_quantile(prometheus):
    result = prometheus.query(
        "histogram_quantile(0.5, sum by (le) (rate("
        'fieldlens_grpc_request_duration_seconds_bucket{method="Classify"}[30s])))',
        at=prometheus.traffic_end,
    )
    values = _values(result)
    assert len(values) == 1, result
    assert math.isfinite(values[0]) and values[0] > 0, result


def test_prometheus_computes_per_stage_quantiles(prometheus):
    result = prometheus.query(
        "histogram_quantile(0.9, sum by (stage, le) (rate("
        'fieldlens_stage_duration_seconds_bucket{service="router"}[30s])))',
        at=prometheus.traffic_end,
    )
    by_stage = {r["metric"]["stage"]: float(r["value"][1]) for r in result}
    assert STAGES <= set(by_stage), by_stage
    for stage in STAGES:
        assert math.isfinite(by_stage[stage]) and by_stage[stage] > 0, (stage, by_stage)


def test_recording_rules_select_live_series(prometheus):
    """Every recording rule yields a series from real data, so its label matchers
    (service="fieldlens.v1.Router", method="Classify", le="0.25", stage="merge", ...) match
    what the services export."""
    empty = [name for name in sorted(recorded_names()) if not prometheus.query(name)]
    assert not empty, f"recording rules with no series: {empty}"
    hit_ratio = _values(prometheus.query("fieldlens:cache_hit:ratio_rate30m"))
    assert 0 < hit_ratio[0] < 1, hit_ratio
    degraded = prometheus.query(
        'fieldlens:degradations_per_answer:ratio_rate10m{kind="cache_unavailable"}'
    )
    assert degraded and float(degraded[0]["value"][1]) > 0, degraded


def test_rules_evaluate_without_errors(prometheus):
    groups = prometheus.api("/api/v1/rules")["groups"]
    assert groups
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
