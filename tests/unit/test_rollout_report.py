"""`fieldlens model-set compare`: the routers' shadow counters read back, summed over replicas,
as tables and a plot."""

from __future__ import annotations

from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from fieldlens import cli, rollout_report
from fieldlens.common.telemetry import Metrics


def _router(comparisons: list[tuple[str, str, str, str]]) -> CollectorRegistry:
    """One router's registry after these comparisons: (top-1 now, top-1 candidate, broad now,
    broad candidate), top-1 leaves agreeing at depth 4, siblings at 3, else at the domain."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.record_rollout("v2", 0.0, 0.2)
    for a, b, broad_a, broad_b in comparisons:
        depth = 4 if a == b else 3 if broad_a == broad_b else 1
        metrics.record_shadow_comparison(
            "v2",
            {"top1": a == b, "best_effort": a == b, "broad": broad_a == broad_b},
            {"top1": depth, "best_effort": depth},
            (broad_a, broad_b),
        )
        metrics.record_rollout_request("v2", "shadow", "OK", 0.01)
    metrics.record_shadow_dropped("v2")
    return registry


ROUTER_A = [("a1", "a1", "broad/a", "broad/a")] * 6 + [("a1", "a2", "broad/a", "broad/a")] * 2
ROUTER_B = [("b1", "b1", "broad/b", "broad/b")] + [("b1", "a1", "broad/b", "broad/a")] * 1


def _text(registry: CollectorRegistry) -> str:
    return prometheus_client.generate_latest(registry).decode()


def test_replicas_add_up_by_answer_level_and_broad_group():
    reports = rollout_report.read_reports([_text(_router(ROUTER_A)), _text(_router(ROUTER_B))])
    assert set(reports) == {"v2"}
    r = reports["v2"]
    assert (r.comparisons, r.dropped) == (10, 2)
    assert r.agreement("top1") == pytest.approx(0.7)
    assert r.agreement("broad") == pytest.approx(0.9)
    assert r.depth_shares("top1") == pytest.approx({1: 0.1, 3: 0.2, 4: 0.7})
    assert r.broad_confusion() == [("broad/a", 8, 1.0, ""), ("broad/b", 2, 0.5, "broad/a")]
    assert r.requests[("shadow", "OK")] == 10


def test_no_rollout_no_report():
    registry = CollectorRegistry()
    Metrics(registry).record_rollout(None, 0.0, 0.0)
    assert rollout_report.read_reports([_text(registry)]) == {}


def test_compare_prints_the_tables_and_writes_the_plot(tmp_path: Path, capsys):
    registry = _router(ROUTER_A + ROUTER_B)
    server, thread = prometheus_client.start_http_server(0, "127.0.0.1", registry)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        plot = tmp_path / "compare.png"
        assert cli.main(["model-set", "compare", "--metrics-url", url, "--plot", str(plot)]) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    out = capsys.readouterr().out
    assert "10 shadowed requests compared" in out
    assert "70.0%" in out and "90.0%" in out  # top-1, broad agreement
    assert "broad/b" in out and "50.0%" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_without_a_rollout_says_so(tmp_path: Path, capsys):
    registry = CollectorRegistry()
    Metrics(registry)
    server, thread = prometheus_client.start_http_server(0, "127.0.0.1", registry)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        assert cli.main(["model-set", "compare", "--metrics-url", url]) == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert "no rollout" in capsys.readouterr().out
