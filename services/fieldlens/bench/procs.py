"""The cluster's processes as the bench sees them: pids from pidfiles, CPU time and memory."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fieldlens import cluster

# What the bench calls the serving layer: everything but the model server it fronts.
SERVING_LAYER = ("router", "tiny", "specialist", "redis")
SERVING = "serving_layer"
CLUSTER = "cluster"
LOADGEN = "loadgen"
CPU_KEYS = (*cluster.COMPONENTS, SERVING, CLUSTER, LOADGEN)
# A process created this long after its pidfile was written is not the one the file names
# (the pid was recycled after the component died).
_PIDFILE_SLACK_S = 2.0
_GIB = 1024**3
_EXTRA_PIDFILE = re.compile(r"-\d+\.pid$")

# A live process: (pid, create time), so that a recycled pid never reads as the same process.
ProcKey = tuple[int, float]


def _pidfiles(run_dir: Path, name: str) -> list[Path]:
    """`<name>.pid`, then `<name>-1.pid`, `<name>-2.pid`...: several processes of one component
    (routers sharing a port) each write their own."""
    extra = [p for p in run_dir.glob(f"{name}-*.pid") if _EXTRA_PIDFILE.search(p.name)]
    extra.sort(key=lambda p: int(p.stem.rpartition("-")[2]))
    return [run_dir / f"{name}.pid", *extra]


def component_pids(cfg: cluster.ClusterConfig) -> dict[str, list[int]]:
    """Live root pids of each component, from its pidfiles (one pid or several per file);
    a component without one is absent."""
    out: dict[str, list[int]] = {}
    for name in cluster.COMPONENTS:
        pids: list[int] = []
        for path in _pidfiles(cfg.run_dir, name):
            try:
                written = path.stat().st_mtime
                tokens = path.read_text().replace(",", " ").split()
            except OSError:
                continue
            for token in tokens:
                try:
                    pid = int(token)
                    if psutil.Process(pid).create_time() <= written + _PIDFILE_SLACK_S:
                        pids.append(pid)
                except (ValueError, psutil.Error):
                    continue
        if pids:
            out[name] = list(dict.fromkeys(pids))
    return out


def process_tree(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes rooted at `pids` and all their live descendants, each once."""
    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in (root, *root.children(recursive=True)):
                seen.setdefault(p.pid, p)
        except psutil.Error:
            continue
    return list(seen.values())


def tree_cpu(pids: Iterable[int]) -> dict[ProcKey, float]:
    """CPU seconds (user + system) of every live process in the trees rooted at `pids`.

    Each process counts its own time plus that of the children it has reaped: a child that
    exits moves its time from its own entry to its parent's, so the sum over a tree neither
    loses nor double-counts it.
    """
    out: dict[ProcKey, float] = {}
    for p in process_tree(pids):
        try:
            with p.oneshot():
                t = p.cpu_times()
                key = (p.pid, p.create_time())
        except psutil.Error:
            continue
        out[key] = t.user + t.system + t.children_user + t.children_system
    return out


def cpu_spent(before: Mapping[ProcKey, float], after: Mapping[ProcKey, float]) -> float:
    """CPU seconds a tree spent between two `tree_cpu` readings.

    A process that appeared in between counts whole (its life is within the window, or
    nearly); one that vanished counts nothing itself, since its reaper's total carries its
    time from then on.
    """
    return sum(t - before.get(key, 0.0) for key, t in after.items())


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (everyone's processes, kernel work)."""
    t = psutil.cpu_times()
    # guest time is already inside user; steal is time the hypervisor gave to others.
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


@dataclass(frozen=True)
class CpuSample:
    """CPU counters of the cluster's processes, the bench's own and the machine's at one time."""

    at: float  # time.perf_counter()
    components: dict[str, dict[ProcKey, float]] = field(default_factory=dict)
    loadgen: float = 0.0
    machine: float = 0.0


class CpuMeter:
    """Reads the CPU time of the cluster's components (from pidfiles) and of the load
    generator (this process alone: the local cluster's components are its children too)."""

    def __init__(self, cfg: cluster.ClusterConfig) -> None:
        self.cfg = cfg
        self._self = psutil.Process()

    def sample(self) -> CpuSample:
        # Pidfiles are read each time, so a component restarted between scenarios is followed.
        trees = {name: tree_cpu(pids) for name, pids in component_pids(self.cfg).items()}
        own = self._self.cpu_times()
        return CpuSample(
            at=time.perf_counter(),
            components={name: cpu for name, cpu in trees.items() if cpu},
            loadgen=own.user + own.system,
            machine=_busy_seconds(),
        )

    @staticmethod
    def summary(before: CpuSample, after: CpuSample, answers: int) -> dict[str, Any]:
        """What one scenario cost: CPU ms per answer by component, serving layer, cluster and
        load generator, and cores kept busy. A component whose processes could not be read
        either time is None (and so is every total that includes it), never zero."""
        seconds: dict[str, float | None] = {}
        processes: dict[str, int] = {}
        for name in cluster.COMPONENTS:
            a, b = before.components.get(name), after.components.get(name)
            seconds[name] = cpu_spent(a, b) if a and b else None
            processes[name] = len(b or {})
        missing = [n for n in cluster.COMPONENTS if seconds[n] is None]

        def total(names: Sequence[str]) -> float | None:
            parts = [seconds[n] for n in names]
            return sum(p for p in parts if p is not None) if None not in parts else None

        seconds[SERVING] = total(SERVING_LAYER)
        seconds[CLUSTER] = total(cluster.COMPONENTS)
        seconds[LOADGEN] = after.loadgen - before.loadgen
        wall = after.at - before.at

        def per(value: float | None, by: float) -> float | None:
            return value / by if value is not None and by > 0 else None

        out: dict[str, Any] = {
            "cpu_ms_per_request": {
                k: per(v * 1e3 if v is not None else None, answers) for k, v in seconds.items()
            },
            "cpu": {
                "seconds": seconds,
                "wall_s": wall,
                "answers": answers,
                "processes": processes,
                # Cores kept busy over the run; `machine` counts everyone on the host, so
                # machine - cluster - loadgen is what other work took while it ran.
                "cores_busy": {
                    SERVING: per(seconds[SERVING], wall),
                    CLUSTER: per(seconds[CLUSTER], wall),
                    LOADGEN: per(seconds[LOADGEN], wall),
                    "machine": per(after.machine - before.machine, wall),
                },
            },
        }
        if missing:
            out["cpu"]["missing"] = missing
        return out


def cpu_accounting(cfg: cluster.ClusterConfig) -> dict[str, Any]:
    """Where the CPU figures come from: the pidfiles read and the components without any."""
    pids = component_pids(cfg)
    missing = [n for n in cluster.COMPONENTS if n not in pids]
    out: dict[str, Any] = {"run_dir": str(cfg.run_dir), "pids": pids, "missing": missing}
    if missing:
        out["note"] = (
            f"no live pid in a pidfile under {cfg.run_dir} for {', '.join(missing)}: their CPU "
            "(and the serving-layer and cluster totals) is not measured; pass --run-dir"
        )
    return out


def cluster_memory(cfg: cluster.ClusterConfig) -> dict[str, Any]:
    """Resident memory of every component from its pidfiles, child processes included (Triton's
    Python-backend stubs); RSS counts shared pages in every process, PSS shares them out."""
    components: dict[str, Any] = {}
    total_rss = total_pss = 0
    for name, pids in component_pids(cfg).items():
        rss = pss = 0
        n = 0
        for p in process_tree(pids):
            try:
                rss += p.memory_info().rss
                pss += getattr(p.memory_full_info(), "pss", 0)
                n += 1
            except psutil.Error:
                continue
        if not n:
            continue
        components[name] = {
            "pids": pids,
            "processes": n,
            "rss_mib": rss / 2**20,
            "pss_mib": pss / 2**20,
        }
        total_rss += rss
        total_pss += pss
    if not components:
        return {"components": {}, "rss_gib": None, "pss_gib": None}
    return {
        "components": components,
        "rss_gib": total_rss / _GIB,
        "pss_gib": total_pss / _GIB,
        "complete": sorted(components) == sorted(cluster.COMPONENTS),
    }
