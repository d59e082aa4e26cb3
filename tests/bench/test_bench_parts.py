"""The bench's pure parts: histogram maths, comparison, synthetic taxonomy, request sources."""

from __future__ import annotations

import asyncio
import copy
import io
import math

import grpc
import pytest
from PIL import Image

from fieldlens import cluster
from fieldlens.bench import micro, plan, procs, report, runner, scrape, suite
from fieldlens.common.model_set import load_model_set
from fieldlens.router.imaging import decode
from fieldlens.tiny.ensemble import TreeLayout

MODELS_DIR = cluster.ClusterConfig().models_dir

METRICS = """\
# TYPE fieldlens_stage_duration_seconds histogram
fieldlens_stage_duration_seconds_bucket{{service="router",stage="broad",le="0.005"}} {a}
fieldlens_stage_duration_seconds_bucket{{service="router",stage="broad",le="0.01"}} {b}
fieldlens_stage_duration_seconds_bucket{{service="router",stage="broad",le="+Inf"}} {c}
fieldlens_stage_duration_seconds_sum{{service="router",stage="broad"}} {s}
fieldlens_stage_duration_seconds_count{{service="router",stage="broad"}} {c}
"""


def test_bucket_quantile_interpolates_within_the_bucket():
    buckets = {0.005: 0.0, 0.01: 10.0, math.inf: 10.0}
    assert scrape.bucket_quantile(0.5, buckets) == pytest.approx(0.0075)
    assert scrape.bucket_quantile(0.5, {0.005: 0.0, math.inf: 0.0}) is None
    # Everything beyond the last finite bound: that bound is the best estimate.
    assert scrape.bucket_quantile(0.5, {0.005: 0.0, math.inf: 4.0}) == 0.005


def test_stage_breakdown_differences_two_scrapes():
    before = METRICS.format(a=5, b=5, c=5, s=0.01)
    after = METRICS.format(a=5, b=15, c=15, s=0.085)
    stages = scrape.stage_breakdown(before, after, requests=10)
    assert stages["broad"]["count"] == 10
    assert stages["broad"]["per_request"] == 1.0
    assert stages["broad"]["mean_ms"] == pytest.approx(7.5)
    assert stages["broad"]["p50_ms"] == pytest.approx(7.5)
    assert scrape.stage_breakdown(None, after, 10) == {}


def _results(p50: float, qps: float, serving_cpu_ms: float = 1.0) -> dict:
    cpu = dict.fromkeys(procs.CPU_KEYS, 0.5) | {procs.SERVING: serving_cpu_ms}
    miss = {"qps": qps, "latency_ms": {"p50": p50, "p99": 2 * p50}, "cpu_ms_per_request": cpu}
    return {
        "schema": report.SCHEMA,
        "mode": "quick",
        "machine": {"cpu": "x", "cores_logical": 2},
        "scenarios": {"router_miss": miss},
        "ratios": {"P1": {"value": 1.2, "pass": True}},
    }


def test_compare_flags_a_worse_p50_or_qps_only_beyond_the_threshold():
    base = _results(10.0, 100.0)
    same = report.compare(base, copy.deepcopy(base))
    assert same["regressions"] == 0 and not same["warnings"]
    slower = report.compare(base, _results(13.0, 100.0))
    flagged = {(d["item"], d["metric"]) for d in slower["deltas"] if d["regression"]}
    assert flagged == {("router_miss", "p50 ms")}
    assert report.compare(base, _results(11.0, 85.0))["regressions"] == 0
    fewer = report.compare(base, _results(10.0, 70.0))
    assert {d["metric"] for d in fewer["deltas"] if d["regression"]} == {"qps"}
    missed = _results(10.0, 100.0)
    missed["ratios"]["P1"] = {"value": 1.9, "pass": False}
    assert report.compare(base, missed)["regressions"] == 1


def test_compare_flags_serving_layer_cpu_per_request_beyond_the_threshold():
    base = _results(10.0, 100.0, serving_cpu_ms=2.0)
    assert report.compare(base, _results(10.0, 100.0, serving_cpu_ms=2.3))["regressions"] == 0
    costly = report.compare(base, _results(10.0, 100.0, serving_cpu_ms=2.5))
    assert [(d["item"], d["metric"]) for d in costly["deltas"] if d["regression"]] == [
        ("router_miss", "serving CPU ms/req")
    ]
    # Idle figures (a scenario that does not use the serving layer): +50% of 0.02 ms is noise.
    idle = _results(10.0, 100.0, serving_cpu_ms=0.02)
    assert report.compare(idle, _results(10.0, 100.0, serving_cpu_ms=0.03))["regressions"] == 0
    # An earlier results file without CPU figures compares on the rest.
    del base["scenarios"]["router_miss"]["cpu_ms_per_request"]
    assert report.compare(base, _results(10.0, 100.0, serving_cpu_ms=9.0))["regressions"] == 0


def test_cpu_figures_reach_the_goal_tables_and_markdown(tmp_path):
    results = _results(10.0, 100.0)
    per = dict.fromkeys(procs.CPU_KEYS, 1.0) | {procs.SERVING: 1.5, "tiny": None}
    results["scenarios"][f"sweep_router_c{plan.CPU_POINT}"] = {
        "cpu_ms_per_request": per,
        "cpu": {"answers": 40, "cores_busy": {"machine": 1.9}},
    }
    results["cpu_accounting"] = {"note": "no live pid for tiny"}
    results["ratios"] = report.ratios(results)
    assert results["ratios"]["C1"]["value"] == 1.5 and results["ratios"]["C1"]["pass"] is True
    rows = report._cpu_rows(results)
    assert rows[1][:4] == [f"sweep_router_c{plan.CPU_POINT}", "40", "1.00", "1.00"]
    assert rows[1][4] == "-"  # tiny not measured: a dash, not a zero
    assert rows[1][-1] == "- / - / - / 1.90"
    report.write_markdown(results, tmp_path / "latest.md")
    md = (tmp_path / "latest.md").read_text()
    assert "## CPU per answer (ms)" in md and "CPU: no live pid for tiny" in md


def test_ratios_are_none_when_not_measured():
    r = report.ratios({"scenarios": {}, "micro": {}})
    assert set(r) == {"P1", "P2", "P3", "P4a", "P4b", "P5", "P6", "C1", "S1", "S2", "F1", "F2"}
    assert all(v["value"] is None and v["pass"] is None for v in r.values())


def test_scaled_taxonomy_has_ten_times_the_edges():
    taxonomy = load_model_set(MODELS_DIR).taxonomy
    base, big = (
        TreeLayout.from_taxonomy(taxonomy),
        TreeLayout.from_taxonomy(micro.scaled_taxonomy(taxonomy, 10)),
    )
    assert len(big.row_taxon) == 10 * len(base.row_taxon)
    assert len(big.levels) == len(base.levels)


def test_unique_photos_decode_like_the_original_but_hash_apart():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "JPEG")
    source = runner.UniquePhotos([buf.getvalue()], "run1")
    a, b = source(), source()
    assert a != b and source.issued == 2
    da, db = decode(a, runner._LIMITS), decode(b, runner._LIMITS)
    assert (da.rgb == db.rgb).all() and da.content_hash != db.content_hash


def test_mixed_photos_send_the_hit_fraction_exactly():
    mixed = runner.MixedPhotos(lambda: b"hit", lambda: b"miss", 0.8)
    sent = [mixed() for _ in range(100)]
    assert sent.count(b"hit") == 80
    assert sent[:5].count(b"hit") == 4


def test_plan_overrides_cap_the_sweep():
    p = plan.Plan.full().with_overrides(duration_s=2.0, max_concurrency=10, rate=7.0)
    assert p.sweep_levels == (1, 2, 4, 8, 10)
    assert p.duration_s == 2.0 and p.rate == 7.0 and p.mixed_concurrency == 8
    with pytest.raises(ValueError):
        plan.Plan.quick().with_overrides(duration_s=0)


def test_only_loopback_targets_are_accepted():
    assert suite._require_loopback("127.0.0.1:50051") == "127.0.0.1:50051"
    assert suite._require_loopback("localhost:1")
    with pytest.raises(suite.BenchError):
        suite._require_loopback("192.0.2.10:50051")


def _noisy_results(quiet_alone_p99: float, limited_p99: float, timeouts: int) -> dict:
    noisy = {
        "concurrency": 64,
        "deadline_ms": 250.0,
        "ok": 500,
        "qps": 60.0,
        "latency_ms": {"p99": 40.0},
        "errors": {"RESOURCE_EXHAUSTED": 700, "DEADLINE_EXCEEDED": timeouts},
    }
    return {
        "scenarios": {
            "quiet_alone": {"latency_ms": {"p99": quiet_alone_p99}},
            "noisy_neighbour_limited": {"latency_ms": {"p99": limited_p99}, "noisy": noisy},
        },
        "micro": {},
    }


def test_noisy_neighbour_goals_read_the_quiet_p99s_and_the_noisy_timeouts():
    r = report.ratios(_noisy_results(30.0, 45.0, 0))
    assert r["F1"]["value"] == pytest.approx(1.5) and r["F1"]["pass"] is True
    assert r["F2"]["value"] == 0 and r["F2"]["pass"] is True
    r = report.ratios(_noisy_results(30.0, 90.0, 3))
    assert r["F1"]["pass"] is False and r["F2"] == {**r["F2"], "value": 3, "pass": False}
    row = next(
        row
        for row in report._scenario_rows(_noisy_results(30.0, 45.0, 0))
        if row[0] == "noisy_neighbour_limited"
    )
    assert "noisy client (64 in flight, 250 ms deadline): 500 ok" in row[-1]
    assert "RESOURCE_EXHAUSTED 700" in row[-1]


def _refused(hint_ms: str | None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(*([("retry-after-ms", hint_ms)] if hint_ms else []))
    return grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailing, "client limit"
    )


def test_retry_hints_are_read_from_trailing_metadata():
    assert runner.retry_after_s(_refused("250")) == 0.25
    assert runner.retry_after_s(_refused(None)) is None
    assert runner.retry_after_s(_refused("soon")) is None
    assert runner.retry_after_s(TimeoutError()) is None


def test_a_worker_honouring_hints_waits_as_told_and_others_do_not():
    async def body() -> tuple[int, int]:
        calls = {"hinted": 0, "plain": 0}

        def refusing(key: str):
            async def call():
                calls[key] += 1
                raise _refused("200")

            return call

        hinted, plain = runner.LoadStats(), runner.LoadStats()
        await asyncio.gather(
            runner.closed_loop(refusing("hinted"), hinted, 1, 0.5, 10_000, 5.0, honour_hints=True),
            runner.closed_loop(refusing("plain"), plain, 1, 0.5, 500, 5.0),
        )
        assert hinted.errors == {"RESOURCE_EXHAUSTED": calls["hinted"]}
        return calls["hinted"], calls["plain"]

    hinted, plain = asyncio.run(body())
    assert 1 <= hinted <= 4  # one call per 200 ms hint at most, in half a second
    assert plain == 500  # no hint honoured: it spins until its request budget runs out


def test_step_count_counts_the_local_parts_on_a_local_cluster():
    p = plan.Plan.quick()
    local, external = (
        suite._step_count(p, True, False, False),
        suite._step_count(p, False, False, False),
    )
    assert local == external + 10  # start and stop, shadow 4, noisy neighbour 4
    assert suite._step_count(p, True, False, False, only="fair-share") == 7
    assert suite._step_count(p, True, False, False, only="shadow") == 7


def _shadow_results(p99_off: float, p99_on: float, cpu_off: float, cpu_on: float) -> dict:
    def point(p99: float, cpu: float) -> dict:
        return {"latency_ms": {"p99": p99}, "cpu_ms_per_request": {procs.SERVING: cpu}}

    on = point(p99_on, cpu_on)
    on["shadow"] = {"candidate": "v1-shadow", "fraction": 0.2, "comparisons": 40.0, "dropped": 2.0}
    return {"scenarios": {"shadow_off": point(p99_off, cpu_off), "shadow_on": on}, "micro": {}}


def test_shadow_goals_compare_the_shadowed_run_with_the_plain_one():
    r = report.ratios(_shadow_results(40.0, 50.0, 2.0, 2.4))
    assert r["S1"]["value"] == pytest.approx(1.25) and r["S1"]["pass"] is True
    assert r["S2"]["value"] == pytest.approx(1.2) and r["S2"]["pass"] is True
    assert r["S1"]["goal"] == f"<= {plan.SHADOW_MAX_RATIO:g}"
    r = report.ratios(_shadow_results(40.0, 80.0, 2.0, 4.0))
    assert r["S1"]["pass"] is False and r["S2"]["pass"] is False
    row = next(
        row
        for row in report._scenario_rows(_shadow_results(40.0, 50.0, 2.0, 2.4))
        if row[0] == "shadow_on"
    )
    assert "20% shadowed to v1-shadow: 40 shadow calls compared, 2 dropped" in row[-1]


def test_shadow_counters_are_differenced_over_candidates():
    def text(compared: float, dropped: float) -> str:
        return (
            "# TYPE fieldlens_rollout_shadow_comparisons counter\n"
            f'fieldlens_rollout_shadow_comparisons_total{{candidate="a"}} {compared}\n'
            f'fieldlens_rollout_shadow_comparisons_total{{candidate="b"}} 1.0\n'
            "# TYPE fieldlens_rollout_shadow_dropped counter\n"
            f'fieldlens_rollout_shadow_dropped_total{{candidate="a"}} {dropped}\n'
        )

    assert scrape.shadow_breakdown(text(3, 1), text(10, 4)) == {"comparisons": 7, "dropped": 3}
    assert scrape.shadow_breakdown(None, text(10, 4)) == {}
    assert scrape.shadow_totals("") == {}
