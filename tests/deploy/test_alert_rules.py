"""The PrometheusRule passes promtool's checks and unit tests; dashboard and adapter parse."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_helpers import (
    K8S_DIR,
    OBSERVABILITY_DIR,
    adapter_rules,
    dashboard_exprs,
    dashboard_panels,
    load_dashboard,
    metric_names,
    recorded_names,
    render_adapter_query,
    rule_exprs,
    rules,
    write_rules_file,
)

UNIT_TESTS = sorted((OBSERVABILITY_DIR / "tests").glob("*.test.yml"))


def _promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_rules_pass_promtool_check(promtool, tmp_path):
    rules_file = write_rules_file(tmp_path / "rules.yml")
    done = _promtool(promtool, "check", "rules", str(rules_file), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(list(rules()))} rules found" in done.stdout


@pytest.mark.parametrize("unit_tests", UNIT_TESTS, ids=lambda p: p.name)
def test_rules_pass_their_promtool_unit_tests(promtool, tmp_path, unit_tests):
    write_rules_file(tmp_path / "rules.yml")
    shutil.copy(unit_tests, tmp_path / unit_tests.name)
    done = _promtool(promtool, "test", "rules", unit_tests.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_tests_that_fire_and_that_stay_quiet():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts, "no alerts defined"
    assert alerts <= fires, f"alerts never shown firing: {sorted(alerts - fires)}"
    assert alerts <= quiet, f"alerts never shown quiet: {sorted(alerts - quiet)}"


def _anchors(markdown: str) -> set[str]:
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in markdown.splitlines()
        if line.startswith("#")
    }


def test_alerts_carry_severity_and_a_runbook_that_exists():
    anchors = _anchors((K8S_DIR / "README.md").read_text())
    for rule in rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "deploy/k8s/README.md" and anchor in anchors, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_recording_rules_follow_the_level_metric_operations_convention():
    for name in recorded_names():
        assert re.fullmatch(r"fieldlens:[a-z_]+:[a-z0-9_]+", name), name


def test_adapter_query_is_valid_promql(promtool, tmp_path):
    """prometheus-adapter's metricsQuery, rendered for the Triton pods, checked by promtool."""
    adapter = adapter_rules()
    assert adapter
    groups = [
        {
            "name": "prometheus-adapter",
            "rules": [
                {"record": f"adapter:{rule['name']['as']}", "expr": render_adapter_query(rule)}
                for rule in adapter
            ],
        }
    ]
    path = tmp_path / "adapter.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    done = _promtool(promtool, "check", "rules", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_is_well_formed_and_its_queries_parse():
    dashboard = load_dashboard()
    panels = list(dashboard_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    graphs = [p for p in panels if p["type"] != "row"]
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert "$namespace" in target["expr"], (panel["title"], target["expr"])
    for expr in dashboard_exprs():
        assert metric_names(expr), expr
    titles = " ".join(p["title"].lower() for p in graphs)
    for subject in (
        "stage latency",
        "requests per second",
        "status code",
        "cache hit ratio",
        "specialist vs tiny",
        "queue time",
        "compute time",
        "shadow agreement",
        "agreement by level",
        "candidate vs current latency",
        "canary share",
        "dropped",
    ):
        assert subject in titles, subject


def test_every_rule_expression_parses():
    for expr in rule_exprs():
        assert metric_names(expr), expr
