"""Helpers of the deploy tests: rendering overlays, reading pod specs, PromQL metric names."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OBSERVABILITY_DIR = K8S_DIR / "observability"
DOCKER_DIR = REPO_ROOT / "docker"
MODELS_DIR = REPO_ROOT / "deploy" / "models"
MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
OVERLAYS = ("cpu", "gpu")
# Kustomizations applied on demand, outside the overlays (one Job each).
JOBS_DIR = K8S_DIR / "jobs"
PUBLISH_JOB = "publish-model-set"
# Prometheus Operator kinds: not in the Kubernetes JSON schemas, checked structurally.
OPERATOR_KINDS = frozenset({"PodMonitor", "ServiceMonitor", "PrometheusRule", "Certificate"})
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana's variables, replaced by values PromQL accepts before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$namespace": ".*"}


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one overlay, as a list of objects."""
    return render_dir(K8S_DIR / "overlays" / overlay)


def render_dir(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one kustomization directory, as a list of objects."""
    binary = kubectl()
    if binary is None:
        raise FileNotFoundError("kubectl not found")
    out = subprocess.run(
        [binary, "kustomize", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@dataclass
class Rendered:
    """The objects of one rendered overlay, indexed by kind and name."""

    overlay: str
    docs: list[dict[str, Any]]
    by_kind: dict[str, dict[str, dict[str, Any]]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_kind = {}
        for doc in self.docs:
            self.by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc

    def get(self, kind: str, name: str) -> dict[str, Any]:
        try:
            return self.by_kind[kind][name]
        except KeyError:
            raise AssertionError(f"{self.overlay}: no {kind}/{name} rendered") from None

    def kind(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.by_kind.get(kind, {})

    def workloads(self) -> Iterator[dict[str, Any]]:
        for doc in self.docs:
            if doc["kind"] in WORKLOAD_KINDS:
                yield doc

    def workload(self, name: str) -> dict[str, Any]:
        for doc in self.workloads():
            if doc["metadata"]["name"] == name:
                return doc
        raise AssertionError(f"{self.overlay}: no workload {name}")

    def min_replicas(self, name: str) -> int:
        """The fewest pods a workload runs: its autoscaler's minimum, else its replicas."""
        for hpa in self.kind("HorizontalPodAutoscaler").values():
            target = hpa["spec"]["scaleTargetRef"]
            if target["name"] == name:
                return int(hpa["spec"].get("minReplicas", 1))
        return int(self.workload(name)["spec"].get("replicas", 1))

    def config_map_data(self, name: str) -> Mapping[str, str]:
        return self.get("ConfigMap", name).get("data", {})

    def secret_data(self, name: str) -> Mapping[str, str] | None:
        secret = self.kind("Secret").get(name)
        if secret is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        data.update(secret.get("stringData", {}))
        return data


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def container(workload: Mapping[str, Any], name: str) -> dict[str, Any]:
    for c in pod_spec(workload)["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"{workload['metadata']['name']}: no container {name}")


def all_containers(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_ports(c: Mapping[str, Any]) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in c.get("ports", [])}


def env_value(c: Mapping[str, Any], name: str) -> str | None:
    for item in c.get("env", []):
        if item["name"] == name:
            return item.get("value")
    return None


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (an empty selector matches everything)."""
    if selector is None:
        return True
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


# -- PromQL ------------------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects, from the real PromQL grammar."""
    import promql_parser

    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(node, promql_parser.AggregateExpr):
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr):
            walk(node.expr)
        elif isinstance(node, promql_parser.SubqueryExpr):
            walk(node.expr)

    walk(promql_parser.parse(expr))
    return names


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def load_rule_groups() -> list[dict[str, Any]]:
    doc = yaml.safe_load((OBSERVABILITY_DIR / "prometheus-rule.yaml").read_text())
    groups: list[dict[str, Any]] = doc["spec"]["groups"]
    return groups


def rules() -> Iterator[dict[str, Any]]:
    for group in load_rule_groups():
        yield from group["rules"]


def write_rules_file(path: Path, interval: str | None = None) -> Path:
    """The PrometheusRule's spec as a plain Prometheus rules file (optionally re-timed)."""
    groups = load_rule_groups()
    if interval is not None:
        groups = [{**g, "interval": interval} for g in groups]
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(
        (OBSERVABILITY_DIR / "dashboards" / "fieldlens.json").read_text()
    )
    return dashboard


def dashboard_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    """PromQL of every dashboard target and template query, Grafana variables replaced."""
    dashboard = load_dashboard()
    exprs = [
        grafana_to_promql(t["expr"])
        for p in dashboard_panels(dashboard)
        for t in p.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        assert match, f"unsupported template query {query!r}"
        exprs.append(match.group(1))
    return exprs


def adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load((OBSERVABILITY_DIR / "prometheus-adapter-values.yaml").read_text())
    custom: list[dict[str, Any]] = values["rules"]["custom"]
    return custom


def render_adapter_query(rule: Mapping[str, Any]) -> str:
    """metricsQuery as prometheus-adapter renders it for one pod of the Triton HPA."""
    query = str(rule["metricsQuery"])
    query = query.replace("<<.GroupBy>>", "namespace, pod")
    query = query.replace("<<.LabelMatchers>>", 'namespace="fieldlens",pod=~"triton-.*"')
    assert "<<" not in query, f"unrendered template field in {query!r}"
    return query


def adapter_exprs() -> list[str]:
    exprs = []
    for rule in adapter_rules():
        exprs.append(rule["seriesQuery"])
        exprs.append(render_adapter_query(rule))
    return exprs


def rule_exprs() -> list[str]:
    return [str(r["expr"]) for r in rules()]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class Exposed:
    """The names one /metrics exposition shows, as written."""

    # Names of the samples it carries.
    samples: set[str]
    # Histogram families it declares (# TYPE ... histogram), with or without series.
    histograms: set[str]
    # Every family it declares, series or not: a labelled metric whose labels only exist in
    # some states (the rollout metrics, exported from SetRollout on) is declared from the start.
    declared: set[str]


def exposed_names(exposition: str) -> Exposed:
    """The sample names and declared families of a Prometheus text exposition, as written.

    Read directly rather than through prometheus_client's parser, which renames counters
    without a `_total` suffix (Triton's) to ones with it, unlike the Prometheus server.
    """
    samples: set[str] = set()
    histograms: set[str] = set()
    declared: set[str] = set()
    for line in exposition.splitlines():
        line = line.strip()
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            declared.add(name)
            if kind == "histogram":
                histograms.add(name)
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return Exposed(samples, histograms, declared)
