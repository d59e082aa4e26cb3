"""The bench's CPU accounting against processes that burn a known amount of CPU, and py-spy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fieldlens import cluster
from fieldlens.bench import procs, profiling

BURN_S = 0.3
# Burns BURN_S of its own CPU time when told to, then waits for its stdin to close.
BURNER = """
import sys, time
def burn(seconds):
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pass
print("ready", flush=True)
sys.stdin.readline()
burn(float(sys.argv[1]))
print("done", flush=True)
sys.stdin.read()
"""
SPIN = """
import time
def spin():
    while True:
        sum(range(1000))
spin()
"""


def _start(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _burn(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"


def _finish(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(10)


@pytest.fixture
def burner() -> Iterator[subprocess.Popen[str]]:
    proc = _start([sys.executable, "-c", BURNER, str(BURN_S)])
    yield proc
    _finish(proc)


def test_a_process_is_charged_the_cpu_it_burned(burner):
    before = procs.tree_cpu([burner.pid])
    _burn(burner)
    spent = procs.cpu_spent(before, procs.tree_cpu([burner.pid]))
    # /proc counts in clock ticks (10 ms); reading stdin and printing add a little.
    assert BURN_S - 0.02 <= spent <= BURN_S + 0.1


def test_a_child_counts_while_alive_and_after_it_is_reaped():
    # sh runs the burner as its child, reaps it, then waits in `sleep` (same pid).
    root = _start(
        ["sh", "-c", '"$0" -c "$1" "$2"; exec sleep 60', sys.executable, BURNER, str(BURN_S)]
    )
    try:
        before = procs.tree_cpu([root.pid])
        assert len(before) == 2
        _burn(root)
        alive = procs.tree_cpu([root.pid])
        assert BURN_S - 0.02 <= procs.cpu_spent(before, alive) <= BURN_S + 0.1
        assert root.stdin is not None
        root.stdin.close()  # the burner exits; sh reaps it and becomes `sleep`
        deadline = time.monotonic() + 10
        while len(procs.process_tree([root.pid])) > 1 or "sleep" not in " ".join(
            psutil.Process(root.pid).cmdline()
        ):
            assert time.monotonic() < deadline, "the burner did not exit"
            time.sleep(0.05)
        reaped = procs.tree_cpu([root.pid])
        assert len(reaped) == 1
        # The burner's whole life moved into sh's reaped-children time: the burn, plus its
        # start-up before the first reading (the one overcount of a child reaped mid-window).
        assert BURN_S - 0.02 <= procs.cpu_spent(before, reaped) <= BURN_S + 0.3
    finally:
        _finish(root)


def _pidfile(path: Path, *pids: int) -> None:
    path.write_text(" ".join(map(str, pids)) + "\n")


@pytest.fixture
def waiter() -> Iterator[subprocess.Popen[str]]:
    """A process without children that burns nothing (this test process will not do: a
    cluster another test started may be its children, and trees count descendants)."""
    proc = _start([sys.executable, "-c", BURNER, "0"])
    yield proc
    _finish(proc)


def test_pidfiles_may_list_several_processes_and_stale_ones_are_ignored(tmp_path, burner, waiter):
    cfg = cluster.ClusterConfig(run_dir=tmp_path)
    _pidfile(tmp_path / "router.pid", waiter.pid)
    _pidfile(tmp_path / "router-1.pid", burner.pid)
    _pidfile(tmp_path / "router-old.pid", 1)  # not `<name>-<n>.pid`
    _pidfile(tmp_path / "tiny.pid", waiter.pid, burner.pid)
    # Written before the process it names started: a recycled pid, not the component.
    _pidfile(tmp_path / "redis.pid", burner.pid)
    old = psutil.Process(burner.pid).create_time() - 60
    os.utime(tmp_path / "redis.pid", (old, old))
    _pidfile(tmp_path / "specialist.pid", 0x7FFFFFF0)  # no such process
    pids = procs.component_pids(cfg)
    assert pids == {"router": [waiter.pid, burner.pid], "tiny": [waiter.pid, burner.pid]}
    accounting = procs.cpu_accounting(cfg)
    assert accounting["missing"] == ["redis", "triton", "specialist"]
    assert "redis, triton, specialist" in accounting["note"]

    meter = procs.CpuMeter(cfg)
    before = meter.sample()
    _burn(burner)
    summary = procs.CpuMeter.summary(before, meter.sample(), answers=10)
    per = summary["cpu_ms_per_request"]
    # Both routers summed: the burner's 300 ms over 10 answers, plus the waiter's (none).
    assert per["router"] >= (BURN_S - 0.02) * 1e3 / 10
    assert per["redis"] is None and per["triton"] is None and per["specialist"] is None
    assert per["serving_layer"] is None and per["cluster"] is None
    assert per["loadgen"] is not None and per["loadgen"] >= 0
    assert summary["cpu"]["missing"] == ["redis", "triton", "specialist"]
    assert summary["cpu"]["processes"]["router"] == 2

    memory = procs.cluster_memory(cfg)
    assert memory["components"]["router"]["processes"] == 2 and not memory["complete"]


def _sample(at: float, loadgen: float, **seconds: float) -> procs.CpuSample:
    return procs.CpuSample(
        at=at,
        components={n: {(cluster.COMPONENTS.index(n), 0.0): s} for n, s in seconds.items()},
        loadgen=loadgen,
        machine=10 * at,
    )


def test_cpu_summary_divides_by_answers_and_totals_the_serving_layer():
    zero = dict.fromkeys(cluster.COMPONENTS, 0.0)
    before = _sample(0.0, 1.0, **zero)
    after = _sample(2.0, 1.5, redis=0.1, triton=2.0, tiny=0.2, specialist=0.0, router=0.7)
    out = procs.CpuMeter.summary(before, after, answers=100)
    per = out["cpu_ms_per_request"]
    assert per["router"] == pytest.approx(7.0) and per["triton"] == pytest.approx(20.0)
    assert per["serving_layer"] == pytest.approx(10.0)  # router + tiny + specialist + redis
    assert per["cluster"] == pytest.approx(30.0)
    assert per["loadgen"] == pytest.approx(5.0)
    busy = out["cpu"]["cores_busy"]
    assert busy["cluster"] == pytest.approx(1.5) and busy["machine"] == pytest.approx(10.0)
    assert "missing" not in out["cpu"]
    none = procs.CpuMeter.summary(before, after, answers=0)["cpu_ms_per_request"]
    assert set(none.values()) == {None}


# -- profiles --------------------------------------------------------------------------------
COLLAPSED = """\
process 7:"python -m fieldlens.router";main (a.py:1);serve (a.py:10);decode (b.py:5) 6
process 7:"python -m fieldlens.router";main (a.py:1);serve (a.py:10);infer (c.py:3) 3
process 7:"python -m fieldlens.router";main (a.py:1);walk (d.py:2);walk (d.py:2) 1
not a stack line
"""


def test_collapsed_stacks_become_top_function_tables():
    stacks = profiling.parse_collapsed(COLLAPSED)
    assert sum(stacks.values()) == 10
    rows = {r.function: r for r in profiling.function_samples(stacks)}
    assert [r.function for r in profiling.function_samples(stacks)][:2] == [
        "decode (b.py:5)",
        "infer (c.py:3)",
    ]
    assert (rows["main (a.py:1)"].own, rows["main (a.py:1)"].total) == (0, 10)
    assert (rows["serve (a.py:10)"].own, rows["serve (a.py:10)"].total) == (0, 9)
    assert (rows["walk (d.py:2)"].own, rows["walk (d.py:2)"].total) == (1, 1)  # once per sample
    assert not any(f.startswith("process ") for f in rows)
    md = profiling.top_tables(stacks, n=2)
    assert "| 1 | `decode (b.py:5)` | 6 | 60.0 | 6 | 60.0 |" in md
    assert "| 1 | `main (a.py:1)` | 10 | 100.0 | 0 | 0.0 |" in md
    assert "| 2 | `serve (a.py:10)` | 9 | 90.0 | 0 | 0.0 |" in md
    assert "infer" not in md.split("by total samples")[1]  # only the top 2
    assert profiling.parse_collapsed(profiling.format_collapsed(stacks)) == stacks


def test_flame_graph_is_svg_with_one_box_per_frame(tmp_path):
    import xml.etree.ElementTree as ET

    stacks = profiling.parse_collapsed(COLLAPSED)
    svg = ET.fromstring(profiling.flamegraph_svg(stacks, "t <&>"))
    titles = [t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    # process, main, serve, decode, infer, walk, walk (recursion: one box per depth)
    assert len(titles) == 7
    assert any(t.startswith("decode (b.py:5) (6 samples, 60.0%)") for t in titles)
    out = profiling.write(stacks, tmp_path, "p", "title", ["about"])
    assert out["samples"] == 10 and out["top_own"][0]["function"] == "decode (b.py:5)"
    assert (tmp_path / "p.svg").exists() and "about" in (tmp_path / "p.md").read_text()


@pytest.mark.slow
def test_py_spy_records_a_running_python_process():
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        stacks = asyncio.run(profiling.record([proc.pid], 1.0))
    finally:
        _finish(proc)
    rows = profiling.function_samples(stacks)
    spin = [r for r in rows if r.function.startswith("spin (<string>")]
    assert spin and spin[0].total >= 0.8 * sum(stacks.values()), rows[:5]
