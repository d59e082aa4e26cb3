"""Bench results: the machine, the goals (P1-P6, C1, S1-S2, F1-F2), JSON / Markdown / PNG
output, terminal tables and the comparison with an earlier run."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fieldlens.bench import procs
from fieldlens.bench.plan import (
    CPU_POINT,
    SHADOW_CONCURRENCY,
    SHADOW_FRACTION,
    SHADOW_MAX_RATIO,
)
from fieldlens.cluster import COMPONENTS, REPO_ROOT
from fieldlens.common import runtime

SCHEMA = 1
REGRESSION_THRESHOLD = 0.20  # relative change counted as a regression
# ...when the serving layer's CPU per request also grew by at least this much (ms): in
# scenarios that do not use it (direct Triton calls) it idles at 0.01-0.04 ms, and a few
# thousandths more read as +30%.
CPU_REGRESSION_FLOOR_MS = 0.05
PACKAGES = (
    "torch",
    "numpy",
    "grpcio",
    "uvloop",
    "tritonclient",
    "qdrant-edge-py",
    "nvidia-pytriton",
)
# Load scenarios every complete run has (the sweep adds sweep_<target>_c<n> for n > 1).
SCENARIOS = (
    "index_exemplars",
    "triton_direct",
    "router_miss",
    "router_hit",
    "router_mixed",
    "open_loop",
    "learn",
)
SWEEP_TARGETS = ("router", "triton")
# Noisy neighbour (fair share), on the bench's own cluster only: the quiet client's figures,
# with the noisy client's under `noisy`.
FAIR_SHARE_SCENARIOS = ("noisy_neighbour_defaults", "quiet_alone", "noisy_neighbour_limited")
# Shadow rollout, on the bench's own cluster only: the same cache-miss load without and with a
# candidate shadowing part of it; the shadow calls compared and dropped under `shadow`.
SHADOW_SCENARIOS = ("shadow_off", "shadow_on")
TIMEOUT_CODES = ("DEADLINE_EXCEEDED", "CLIENT_TIMEOUT")


@dataclass(frozen=True)
class Goal:
    """One goal (P: issue 6, C: issue 16, S: issue 19, F: issue 20): `value op threshold`
    passes."""

    key: str
    what: str
    op: str  # "<=" or ">="
    threshold: float
    value: Callable[[dict[str, Any]], float | None]

    def check(self, value: float | None) -> bool | None:
        if value is None or not math.isfinite(value):
            return None
        return value <= self.threshold if self.op == "<=" else value >= self.threshold


def _get(d: Any, *path: str | int) -> Any:
    for p in path:
        if isinstance(d, dict) and p in d:
            d = d[p]
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
        return None
    return float(a) / float(b)


def _noisy_timeouts(results: dict[str, Any], scenario: str) -> int | None:
    errors = _get(results, "scenarios", scenario, "noisy", "errors")
    if not isinstance(errors, dict):
        return None
    return sum(int(errors.get(code, 0)) for code in TIMEOUT_CODES)


def _saturated(results: dict[str, Any], target: str) -> float | None:
    qps = [p.get("qps") for p in _get(results, "sweep", target) or []]
    finite = [q for q in qps if isinstance(q, int | float)]
    return max(finite) if finite else None


GOALS: tuple[Goal, ...] = (
    Goal(
        "P1",
        "router p50 (cache miss, concurrency 1) / direct Triton p50",
        "<=",
        1.5,
        lambda r: _ratio(
            _get(r, "scenarios", "router_miss", "latency_ms", "p50"),
            _get(r, "scenarios", "triton_direct", "latency_ms", "p50"),
        ),
    ),
    Goal(
        "P2",
        "cache-hit p50 / cache-miss p50 (router, concurrency 1)",
        "<=",
        0.1,
        lambda r: _ratio(
            _get(r, "scenarios", "router_hit", "latency_ms", "p50"),
            _get(r, "scenarios", "router_miss", "latency_ms", "p50"),
        ),
    ),
    Goal(
        "P3",
        "router saturated QPS / direct Triton saturated QPS (max over the sweep)",
        ">=",
        0.8,
        lambda r: _ratio(_saturated(r, "router"), _saturated(r, "triton")),
    ),
    Goal(
        "P4a",
        "tiny ensemble, whole tree, per image at batch 64 (ms)",
        "<=",
        0.5,
        lambda r: _get(r, "micro", "tiny", "real", "batch64", "per_image_ms"),
    ),
    Goal(
        "P4b",
        "tiny ensemble at batch 64: 10x taxonomy time / shipped taxonomy time",
        "<=",
        2.0,
        lambda r: _ratio(
            _get(r, "micro", "tiny", "x10", "batch64", "median_ms"),
            _get(r, "micro", "tiny", "real", "batch64", "median_ms"),
        ),
    ),
    Goal(
        "P5",
        "neighbour search p50: large store / small store (embedding-like vectors, filtered top-5)",
        "<=",
        2.0,
        lambda r: _ratio(
            _get(r, "micro", "neighbours", "large", "median_ms"),
            _get(r, "micro", "neighbours", "small", "median_ms"),
        ),
    ),
    Goal(
        "P6",
        "local cluster resident memory, all processes incl. children (GiB RSS)",
        "<=",
        3.0,
        lambda r: _get(r, "memory", "rss_gib"),
    ),
    Goal(
        "C1",
        f"serving layer (router+tiny+specialist+redis) CPU ms per cache-miss request at "
        f"{CPU_POINT} in flight",
        "<=",
        2.0,
        lambda r: _get(
            r, "scenarios", f"sweep_router_c{CPU_POINT}", "cpu_ms_per_request", procs.SERVING
        ),
    ),
    # Loose: they flag a shadow that costs the caller, not a tuned budget.
    Goal(
        "S1",
        f"cache-miss p99 at {SHADOW_CONCURRENCY} in flight, {SHADOW_FRACTION:.0%} shadowed to a "
        "candidate / no shadow (loose)",
        "<=",
        SHADOW_MAX_RATIO,
        lambda r: _ratio(
            _get(r, "scenarios", "shadow_on", "latency_ms", "p99"),
            _get(r, "scenarios", "shadow_off", "latency_ms", "p99"),
        ),
    ),
    Goal(
        "S2",
        f"serving layer CPU ms per cache-miss request at {SHADOW_CONCURRENCY} in flight, "
        f"{SHADOW_FRACTION:.0%} shadowed / no shadow (loose)",
        "<=",
        SHADOW_MAX_RATIO,
        lambda r: _ratio(
            _get(r, "scenarios", "shadow_on", "cpu_ms_per_request", procs.SERVING),
            _get(r, "scenarios", "shadow_off", "cpu_ms_per_request", procs.SERVING),
        ),
    ),
    Goal(
        "F1",
        "quiet client's p99 (1 in flight) next to a noisy one (64 in flight), per-client "
        "limits on / its p99 alone (cache misses)",
        "<=",
        2.0,
        lambda r: _ratio(
            _get(r, "scenarios", "noisy_neighbour_limited", "latency_ms", "p99"),
            _get(r, "scenarios", "quiet_alone", "latency_ms", "p99"),
        ),
    ),
    Goal(
        "F2",
        "noisy client's calls past their 250 ms deadline, per-client limits on (it is refused "
        "RESOURCE_EXHAUSTED instead)",
        "<=",
        0,
        lambda r: _noisy_timeouts(r, "noisy_neighbour_limited"),
    ),
)


def ratios(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every goal's value and PASS / MISS (None: not measured in this run)."""
    out = {}
    for g in GOALS:
        value = g.value(results)
        out[g.key] = {
            "what": g.what,
            "value": value,
            "goal": f"{g.op} {g.threshold:g}",
            "pass": g.check(value),
        }
    return out


# -- the machine ---------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def describe_machine() -> dict[str, Any]:
    """CPU, cores, memory, load, versions and git commit: what the figures depend on."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": _cpu_model(),
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": psutil.virtual_memory().total / 1024**3,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_start": list(os.getloadavg()),
        # The load generator's (the services report theirs as fieldlens_runtime).
        "event_loop": runtime.DEFAULT_EVENT_LOOP,
        "grpc_experiments": os.environ.get(runtime.GRPC_EXPERIMENTS_ENV, ""),
    }


# -- files ---------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(results), indent=1, sort_keys=False) + "\n")


def load_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a fieldlens bench results file (schema {SCHEMA})")
    return data


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency (p50, p99) against throughput over the closed-loop sweep: router vs Triton."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colours = {"router": "tab:blue", "triton": "tab:orange"}
    labels = {"router": "router Classify (cache miss)", "triton": "direct Triton broad"}
    for target in SWEEP_TARGETS:
        points = [
            p
            for p in _get(results, "sweep", target) or []
            if p.get("qps") is not None and p.get("p50") is not None
        ]
        if not points:
            continue
        qps = [p["qps"] for p in points]
        for key, style in (("p50", "-o"), ("p99", "--s")):
            ax.plot(
                qps,
                [p[key] for p in points],
                style,
                color=colours[target],
                label=f"{labels[target]} {key}",
                markersize=4,
            )
        for p in points:
            ax.annotate(
                f"c={p['concurrency']}",
                (p["qps"], p["p50"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
                color=colours[target],
            )
    ax.set_yscale("log")
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms, log scale)")
    machine = results.get("machine", {})
    ax.set_title(
        f"fieldlens latency vs throughput ({results.get('mode', '?')} run, "
        f"{machine.get('cores_logical', '?')} cores)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _errors(d: dict[str, Any]) -> str:
    errs = d.get("errors") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(errs.items())) or "0"


def _scenario_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, s in (results.get("scenarios") or {}).items():
        lat = s.get("latency_ms") or {}
        load = s.get("load", "")
        notes = []
        if s.get("cached_fraction") is not None and name.startswith("router"):
            notes.append(f"cached {s['cached_fraction']:.0%}")
        degraded = {k: v for k, v in (s.get("flags") or {}).items() if k.startswith("degraded")}
        if degraded:
            notes.append(", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in degraded.items()))
        if "images_per_s" in s:
            notes.append(f"{fmt(s.get('images_per_s'), 1)} images/s, {s.get('indexed')} indexed")
        if "offered" in s:
            notes.append(f"dropped {s.get('dropped')}, late {s.get('late')}")
        noisy = s.get("noisy")
        if noisy:
            notes.append(
                f"noisy client ({noisy.get('concurrency')} in flight, "
                f"{fmt(noisy.get('deadline_ms'), 0)} ms deadline): {noisy.get('ok')} ok, "
                f"{fmt(noisy.get('qps'), 1)} QPS, p99 {fmt(_get(noisy, 'latency_ms', 'p99'))} ms"
                f", errors {_errors(noisy)}"
            )
        shadow = s.get("shadow")
        if shadow:
            fraction = shadow.get("fraction")
            notes.append(
                (f"{fraction:.0%} shadowed to {shadow.get('candidate')}: " if fraction else "")
                + f"{fmt(shadow.get('comparisons'), 0)} shadow calls compared, "
                f"{fmt(shadow.get('dropped'), 0)} dropped"
            )
        rows.append(
            [
                name,
                str(load),
                str(s.get("requests", "-")),
                fmt(s.get("qps"), 1),
                fmt(lat.get("p50")),
                fmt(lat.get("p95")),
                fmt(lat.get("p99")),
                fmt(lat.get("max")),
                _errors(s),
                "; ".join(notes),
            ]
        )
    return rows


SCENARIO_COLUMNS = (
    "scenario",
    "load",
    "requests",
    "QPS",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "errors",
    "notes",
)


CPU_COLUMNS = (
    "scenario",
    "answers",
    *COMPONENTS,
    "serving layer",
    "cluster",
    "loadgen",
    "cores busy: serving / cluster / loadgen / machine",
)
CPU_NOTE = (
    "CPU time (user + system) per answer in ms, read from /proc right before and after each "
    "measured run; triton includes its Python-backend stubs, serving layer = router + tiny + "
    "specialist + redis, cluster = all five, loadgen = the bench process itself; cores busy = "
    "CPU seconds / wall seconds (machine: every process on the host, others' work included). "
    "index_exemplars answers one call per 256 photos."
)


def _cpu_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, s in (results.get("scenarios") or {}).items():
        per = s.get("cpu_ms_per_request")
        if not per:
            continue
        busy = _get(s, "cpu", "cores_busy") or {}
        cores = " / ".join(
            fmt(busy.get(k)) for k in (procs.SERVING, procs.CLUSTER, procs.LOADGEN, "machine")
        )
        rows.append(
            [name, str(_get(s, "cpu", "answers")), *(fmt(per.get(k)) for k in procs.CPU_KEYS)]
            + [cores]
        )
    return rows


def _cpu_missing(results: dict[str, Any]) -> str | None:
    note = _get(results, "cpu_accounting", "note")
    return str(note) if note else None


def _profile_rows(results: dict[str, Any]) -> list[list[str]]:
    prof = results.get("profile") or {}
    samples = prof.get("samples") or 0
    return [
        [
            str(i),
            str(r["function"]),
            fmt(100 * r["own"] / samples if samples else None, 1),
            fmt(100 * r["total"] / samples if samples else None, 1),
        ]
        for i, r in enumerate(prof.get("top_own") or [], 1)
    ]


PROFILE_COLUMNS = ("#", "function", "own %", "total %")


def _profile_title(results: dict[str, Any]) -> str:
    prof = results.get("profile") or {}
    return (
        f"router profile, cache misses at {prof.get('concurrency')} in flight: top functions by "
        f"own samples ({prof.get('samples')} samples, {fmt(prof.get('qps'), 1)} QPS while "
        f"profiled; all of them in {Path(str(_get(prof, 'files', 'md'))).name})"
    )


def _stage_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    scenarios = results.get("scenarios") or {}
    stages: list[str] = []
    for s in scenarios.values():
        for stage in s.get("stages") or {}:
            if stage not in stages:
                stages.append(stage)
    order = ["decode", "cache_get", "broad", "classify", "specialist", "tiny", "neighbours"]
    order += ["merge", "cache_set"]
    stages.sort(key=lambda x: order.index(x) if x in order else len(order))
    rows = []
    for name, s in scenarios.items():
        st = s.get("stages") or {}
        if not st:
            continue
        rows.append(
            [name]
            + [
                f"{fmt(st[k]['mean_ms'])} / {fmt(st[k]['p50_ms'])}" if k in st else "-"
                for k in stages
            ]
        )
    return stages, rows


def _triton_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, s in (results.get("scenarios") or {}).items():
        t = s.get("triton") or {}
        if not t.get("requests"):
            continue
        rows.append(
            [
                name,
                fmt(t.get("requests"), 0),
                fmt(t.get("avg_batch"), 1),
                fmt(t.get("queue_ms")),
                fmt(t.get("compute_infer_ms")),
                fmt(t.get("request_ms")),
            ]
        )
    return rows


def _micro_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    tiny = _get(results, "micro", "tiny") or {}
    for variant in ("real", f"x{tiny.get('scale', 10)}"):
        t = tiny.get(variant)
        if not t:
            continue
        for b in ("batch1", "batch64"):
            r = t.get(b) or {}
            rows.append(
                [
                    f"tiny ensemble {variant} ({t.get('rows')} rows) {b}",
                    fmt(r.get("median_ms"), 3),
                    fmt(r.get("per_image_ms"), 4),
                    fmt(r.get("p99_ms"), 3),
                    "",
                ]
            )
    for key in ("neighbours", "neighbours_uniform"):
        rows.extend(_neighbour_rows(_get(results, "micro", key) or {}))
    return rows


def _neighbour_rows(nb: dict[str, Any]) -> list[list[str]]:
    rows = []
    for variant in ("small", "large"):
        n = nb.get(variant)
        if not n:
            continue
        growth = _ratio(n.get("median_ms"), (nb.get("small") or {}).get("median_ms"))
        scaling = f"; {fmt(growth)}x the small store's p50" if variant == "large" else ""
        rows.append(
            [
                f"neighbour search {n.get('size')} {n.get('distribution', 'uniform')} vectors, "
                f"{n.get('filter_groups')} of {n.get('groups')} groups, top-{n.get('k')}",
                fmt(n.get("median_ms"), 3),
                "",
                fmt(n.get("p99_ms"), 3),
                f"upsert {fmt(n.get('upsert_s'), 1)} s, optimize {fmt(n.get('optimize_s'), 1)}"
                f" s, HNSW over {n.get('indexed_vectors', '?')} vectors, recall@"
                f"{n.get('k')} {fmt(n.get('recall_at_k'))}{scaling}",
            ]
        )
    return rows


def _memory_rows(results: dict[str, Any]) -> list[list[str]]:
    mem = results.get("memory") or {}
    rows = [
        [name, str(c.get("processes")), fmt(c.get("rss_mib"), 0), fmt(c.get("pss_mib"), 0)]
        for name, c in (mem.get("components") or {}).items()
    ]
    if rows:
        rows.append(
            [
                "total",
                "",
                fmt((mem.get("rss_gib") or 0) * 1024, 0),
                fmt((mem.get("pss_gib") or 0) * 1024, 0),
            ]
        )
    return rows


def _ratio_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for key, r in (results.get("ratios") or {}).items():
        state = {True: "PASS", False: "MISS", None: "n/a"}[r.get("pass")]
        rows.append([key, r["what"], fmt(r.get("value"), 3), r["goal"], state])
    return rows


def _table(title: str, columns: Iterable[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _note_lines(results: dict[str, Any]) -> list[str]:
    """Sample messages of the degraded answers, per scenario."""
    return [
        f"{name}: {note}"
        for name, s in (results.get("scenarios") or {}).items()
        for note in s.get("notes") or []
    ]


def print_results(results: dict[str, Any], console: Console) -> None:
    """The run's figures as terminal tables, ratios last."""
    console.print(_table("load scenarios", SCENARIO_COLUMNS, _scenario_rows(results)))
    for line in _note_lines(results):
        console.print(f"  [yellow]degraded[/yellow] {escape(line)}", highlight=False)
    stages, rows = _stage_rows(results)
    if rows:
        console.print(
            _table(
                "router stages from /metrics: mean / approx. p50 (ms)", ["scenario", *stages], rows
            )
        )
    rows = _triton_rows(results)
    if rows:
        cols = ["scenario", "requests", "avg batch", "queue ms", "infer ms", "request ms"]
        console.print(_table("Triton `broad` from its /metrics (per request)", cols, rows))
    rows = _cpu_rows(results)
    if rows:
        console.print(_table("CPU ms per answer", CPU_COLUMNS, rows))
        console.print(f"  {CPU_NOTE}", highlight=False)
    missing = _cpu_missing(results)
    if missing:
        console.print(f"  [yellow]CPU: {escape(missing)}[/yellow]", highlight=False)
    prof = results.get("profile") or {}
    if prof.get("error"):
        console.print(f"[red]router profile failed: {escape(prof['error'])}[/red]")
    elif prof:
        console.print(_table(_profile_title(results), PROFILE_COLUMNS, _profile_rows(results)))
    rows = _micro_rows(results)
    if rows:
        cols = ["micro-benchmark", "median ms/call", "ms/image", "p99 ms", "notes"]
        console.print(_table("micro-benchmarks", cols, rows))
    rows = _memory_rows(results)
    if rows:
        console.print(
            _table("resident memory (MiB)", ["component", "processes", "RSS", "PSS"], rows)
        )
    table = _table("goals", ["ratio", "what", "value", "goal", "result"], [])
    for row in _ratio_rows(results):
        colour = {"PASS": "green", "MISS": "red"}.get(row[-1], "yellow")
        table.add_row(*row[:-1], f"[{colour}]{row[-1]}[/{colour}]")
    console.print(table)


def _md_table(columns: Iterable[str], rows: list[list[str]]) -> str:
    cols = list(columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    m = results.get("machine") or {}
    parts = [
        f"# fieldlens bench ({results.get('mode')} run, {results.get('started_at')})",
        "",
        f"{m.get('cpu')}, {m.get('cores_logical')} logical cores, {fmt(m.get('ram_gib'), 1)} "
        f"GiB RAM; Python {m.get('python')}, torch {_get(m, 'packages', 'torch')}; commit "
        f"{str(m.get('git_commit', ''))[:12]}{' (dirty)' if m.get('git_dirty') else ''}; load "
        f"average at start {', '.join(fmt(x) for x in m.get('loadavg_start') or [])}.",
        "",
        "## Goals",
        "",
        _md_table(
            ["ratio", "what", "value", "goal", "result"],
            _ratio_rows(results),
        ),
        "",
        "## Load scenarios",
        "",
        _md_table(SCENARIO_COLUMNS, _scenario_rows(results)),
    ]
    notes = _note_lines(results)
    if notes:
        parts += ["", "Degraded answers, sample messages:", ""] + [f"- {n}" for n in notes]
    rows = _cpu_rows(results)
    if rows:
        parts += ["", "## CPU per answer (ms)", "", CPU_NOTE, "", _md_table(CPU_COLUMNS, rows)]
    missing = _cpu_missing(results)
    if missing:
        parts += ["", f"CPU: {missing}"]
    prof = results.get("profile") or {}
    if prof.get("error"):
        parts += ["", "## Router profile", "", f"Failed: {prof['error']}"]
    elif prof:
        md = Path(str(_get(prof, "files", "md"))).name
        svg = Path(str(_get(prof, "files", "svg"))).name
        parts += [
            "",
            "## Router profile",
            "",
            f"{_profile_title(results)}; flame graph [{svg}]({svg}), tables [{md}]({md}).",
            "",
            _md_table(PROFILE_COLUMNS, _profile_rows(results)),
        ]
    stages, rows = _stage_rows(results)
    if rows:
        parts += [
            "",
            "## Router stages (mean / approx. p50 ms)",
            "",
            _md_table(["scenario", *stages], rows),
        ]
    rows = _micro_rows(results)
    if rows:
        cols = ["micro-benchmark", "median ms/call", "ms/image", "p99 ms", "notes"]
        parts += ["", "## Micro-benchmarks", "", _md_table(cols, rows)]
    rows = _memory_rows(results)
    if rows:
        parts += [
            "",
            "## Resident memory (MiB)",
            "",
            _md_table(["component", "processes", "RSS", "PSS"], rows),
        ]
    comparison = results.get("compare")
    if comparison:
        parts += [
            "",
            f"## Compared with {comparison.get('previous')}",
            "",
            _md_table(COMPARE_COLUMNS, [_compare_row(d) for d in comparison.get("deltas", [])]),
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")


# -- comparison ------------------------------------------------------------------------------
COMPARE_COLUMNS = ("item", "metric", "before", "after", "change", "flag")


def _delta(
    item: str,
    metric: str,
    before: Any,
    after: Any,
    higher_is_better: bool,
    judged: bool,
    floor: float = 0.0,
) -> dict[str, Any] | None:
    """`floor`: the least absolute change that can be a regression."""
    if not isinstance(before, int | float) or not isinstance(after, int | float):
        return None
    change = (after - before) / before if before else None
    worse = None
    if change is not None:
        worse = -change if higher_is_better else change
    return {
        "item": item,
        "metric": metric,
        "before": before,
        "after": after,
        "change": change,
        "regression": bool(
            judged
            and worse is not None
            and worse > REGRESSION_THRESHOLD
            and abs(after - before) >= floor
        ),
    }


def compare(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Deltas of the headline figures; a >20% worse p50, QPS or serving-layer CPU per request
    (that also by at least CPU_REGRESSION_FLOOR_MS), micro time, memory or index rate is flagged
    as a regression, as is a goal that passed before and misses now."""
    deltas: list[dict[str, Any] | None] = []
    prev_s, cur_s = previous.get("scenarios") or {}, current.get("scenarios") or {}
    for name in cur_s:
        if name not in prev_s:
            continue
        a, b = prev_s[name], cur_s[name]
        deltas.append(_delta(name, "qps", a.get("qps"), b.get("qps"), True, True))
        for q, judged in (("p50", True), ("p99", False)):
            deltas.append(
                _delta(
                    name,
                    f"{q} ms",
                    _get(a, "latency_ms", q),
                    _get(b, "latency_ms", q),
                    False,
                    judged,
                )
            )
        if "images_per_s" in b:
            deltas.append(
                _delta(name, "images/s", a.get("images_per_s"), b.get("images_per_s"), True, True)
            )
        cpu = ("cpu_ms_per_request", procs.SERVING)
        deltas.append(
            _delta(
                name,
                "serving CPU ms/req",
                _get(a, *cpu),
                _get(b, *cpu),
                False,
                True,
                CPU_REGRESSION_FLOOR_MS,
            )
        )
    micro = (
        ("tiny real batch64", ("micro", "tiny", "real", "batch64", "median_ms")),
        ("tiny x10 batch64", ("micro", "tiny", "x10", "batch64", "median_ms")),
        ("neighbours small", ("micro", "neighbours", "small", "median_ms")),
        ("neighbours large", ("micro", "neighbours", "large", "median_ms")),
    )
    for item, path in micro:
        deltas.append(_delta(item, "ms", _get(previous, *path), _get(current, *path), False, True))
    deltas.append(
        _delta(
            "memory",
            "RSS GiB",
            _get(previous, "memory", "rss_gib"),
            _get(current, "memory", "rss_gib"),
            False,
            True,
        )
    )
    prev_r, cur_r = previous.get("ratios") or {}, current.get("ratios") or {}
    for key, r in cur_r.items():
        p = prev_r.get(key) or {}
        d = _delta(key, "ratio", p.get("value"), r.get("value"), False, False)
        if d is not None:
            d["regression"] = p.get("pass") is True and r.get("pass") is False
            deltas.append(d)
    rows = [d for d in deltas if d is not None]
    warnings = []
    if previous.get("mode") != current.get("mode"):
        warnings.append(f"modes differ: {previous.get('mode')} then {current.get('mode')}")
    pm, cm = previous.get("machine") or {}, current.get("machine") or {}
    for key in ("cpu", "cores_logical"):
        if pm.get(key) != cm.get(key):
            warnings.append(f"machines differ ({key}: {pm.get(key)} then {cm.get(key)})")
    return {
        "deltas": rows,
        "regressions": sum(1 for d in rows if d["regression"]),
        "warnings": warnings,
    }


def _compare_row(d: dict[str, Any]) -> list[str]:
    change = d.get("change")
    return [
        d["item"],
        d["metric"],
        fmt(d.get("before"), 3),
        fmt(d.get("after"), 3),
        f"{change:+.0%}" if isinstance(change, float) else "-",
        "REGRESSION" if d.get("regression") else "",
    ]


def print_comparison(comparison: dict[str, Any], console: Console) -> None:
    table = _table(f"compared with {comparison.get('previous')}", COMPARE_COLUMNS, [])
    for d in comparison["deltas"]:
        row = _compare_row(d)
        if d.get("regression"):
            row = [f"[red]{c}[/red]" for c in row]
        table.add_row(*row)
    console.print(table)
    for w in comparison.get("warnings", []):
        console.print(f"[yellow]note: {w}; deltas mix conditions[/yellow]")
    n = comparison["regressions"]
    console.print(
        f"[red]{n} regression(s) beyond {REGRESSION_THRESHOLD:.0%}[/red]"
        if n
        else f"[green]no regression beyond {REGRESSION_THRESHOLD:.0%}[/green]"
    )
