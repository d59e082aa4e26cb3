"""Sampling profiles of a running service with py-spy: record, top-N tables, a flame graph."""

from __future__ import annotations

import asyncio
import dataclasses
import html
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RATE = 100  # samples per second
TOP_N = 25
SUMMARY_N = 10  # entries kept in the results JSON and latest.md
_EXIT_GRACE_S = 30.0  # py-spy's own start-up, attaching and write-out
_PROCESS_FRAME = "process "  # --subprocesses roots each stack in `process <pid>:"<cmd>"`
_SVG_WIDTH = 1200
_ROW_PX = 16
_TOP_PX = 28
_CHAR_PX = 6.6  # rough width of one 11 px character, to trim labels to their box
_MIN_PX = 0.3  # narrower frames (and so their callees) are left out of the SVG


class ProfileError(RuntimeError):
    """py-spy is missing or could not record; the message says why."""


def py_spy() -> str:
    """The py-spy executable: beside this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise ProfileError(
            "py-spy not found beside the interpreter or on PATH; install the dev extra "
            "(pip install -e '.[dev]', which `make setup` does)"
        )
    return found


def py_spy_version() -> str:
    try:
        out = subprocess.run([py_spy(), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def record_argv(pid: int, seconds: float, output: Path, rate: int) -> list[str]:
    """py-spy's command line.

    Running threads only (no --idle): a thread parked in epoll or on a lock costs no CPU and
    would bury what does. --nonblocking, and so no native frames (--native needs the target
    paused at every sample): each pause interrupts the threads' blocking system calls, and a
    parked thread restarting its call reads as running, so under load a paused router showed
    3-4x the samples of an unpaused one, most of them in poll, epoll_wait and futex waits.
    --subprocesses follows any workers a router process forks; --function names a frame by
    its function's first line, so samples on different lines of one function add up.
    """
    return [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--function",
        "--subprocesses",
        "--nonblocking",
        "--output",
        str(output),
    ]


async def record(pids: Sequence[int], seconds: float, rate: int = DEFAULT_RATE) -> Counter[str]:
    """Samples every process in `pids` (one py-spy each, at once) for `seconds`: the collapsed
    stacks of all of them, merged.

    Raises:
        ProfileError: py-spy is missing, failed (no permission to attach) or hung.
    """
    if not pids:
        raise ProfileError("no process to profile")
    stacks: Counter[str] = Counter()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fieldlens-profile-") as tmp:
        runs = []
        for pid in pids:
            output = Path(tmp) / f"{pid}.folded"
            proc = await asyncio.create_subprocess_exec(
                *record_argv(pid, seconds, output, rate),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            runs.append((pid, proc, output))
        for pid, proc, output in runs:
            try:
                said, _ = await asyncio.wait_for(proc.communicate(), seconds + _EXIT_GRACE_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                problems.append(f"pid {pid}: py-spy still running {_EXIT_GRACE_S:g} s late")
                continue
            text = said.decode("utf-8", "replace").strip()
            if proc.returncode != 0 or not output.exists():
                problems.append(f"pid {pid}: py-spy exited {proc.returncode}: {text[-800:]}")
                continue
            stacks.update(parse_collapsed(output.read_text()))
    if problems:
        raise ProfileError("; ".join(problems))
    return stacks


def parse_collapsed(text: str) -> Counter[str]:
    """Collapsed stacks (`outer;...;inner <count>` per line, py-spy's raw format) by stack."""
    stacks: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def format_collapsed(stacks: Mapping[str, int]) -> str:
    return "".join(f"{s} {n}\n" for s, n in sorted(stacks.items(), key=lambda x: -x[1]))


@dataclass(frozen=True)
class FunctionSamples:
    """One function's share of the samples."""

    function: str
    own: int  # samples with it innermost: running its own code
    total: int  # samples with it anywhere on the stack: it or what it called running


def function_samples(stacks: Mapping[str, int]) -> list[FunctionSamples]:
    """Every function's own and total samples, most own samples first. A recursive function
    counts once per sample; the process frames of --subprocesses are not functions."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for stack, n in stacks.items():
        frames = [f for f in stack.split(";") if f and not f.startswith(_PROCESS_FRAME)]
        if not frames:
            continue
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    rows = [FunctionSamples(f, own[f], t) for f, t in total.items()]
    rows.sort(key=lambda r: (-r.own, -r.total, r.function))
    return rows


def _pct(n: int, of: int) -> str:
    return f"{100 * n / of:.1f}" if of else "-"


def top_tables(stacks: Mapping[str, int], n: int = TOP_N) -> str:
    """Markdown: the top `n` functions by own samples, then by total samples."""
    samples = sum(stacks.values())
    rows = function_samples(stacks)
    by_total = sorted(rows, key=lambda r: (-r.total, -r.own, r.function))

    def table(entries: list[FunctionSamples], first: str) -> list[str]:
        cols = ["#", "function", "own", "own %", "total", "total %"]
        if first == "total":
            cols[2:] = ["total", "total %", "own", "own %"]
        lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        for i, r in enumerate(entries[:n], 1):
            pairs = [(r.own, _pct(r.own, samples)), (r.total, _pct(r.total, samples))]
            if first == "total":
                pairs.reverse()
            cells = [str(i), f"`{r.function.replace('|', '/')}`"]
            cells += [str(x) for pair in pairs for x in pair]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    return "\n".join(
        [
            f"### Top {n} functions by own samples (running their own code)",
            "",
            *table(rows, "own"),
            "",
            f"### Top {n} functions by total samples (they or their callees running)",
            "",
            *table(by_total, "total"),
        ]
    )


@dataclass
class _Node:
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def _colour(frame: str) -> str:
    v = zlib.crc32(frame.encode())
    a, b = (v & 0xFF) / 255, ((v >> 8) & 0xFF) / 255
    if ".py:" in frame or frame.startswith(_PROCESS_FRAME):
        return f"rgb({205 + int(50 * a)},{int(230 * b)},{int(55 * a)})"  # Python: warm
    return f"rgb({int(50 * b)},{150 + int(80 * a)},{150 + int(80 * b)})"  # native: cool


def flamegraph_svg(stacks: Mapping[str, int], title: str) -> str:
    """A static flame graph (callers below callees, width = samples; hover for counts)."""
    root = _Node()
    for stack, n in stacks.items():
        node = root
        node.count += n
        for frame in stack.split(";"):
            node = node.children.setdefault(frame, _Node())
            node.count += n
    scale = _SVG_WIDTH / root.count if root.count else 0.0
    rects: list[tuple[int, float, float, str, int]] = []  # depth, x, width, frame, samples

    def place(node: _Node, depth: int, x: float) -> None:
        for frame, child in sorted(node.children.items()):
            width = child.count * scale
            if width >= _MIN_PX:
                rects.append((depth, x, width, frame, child.count))
                place(child, depth + 1, x)
            x += width

    place(root, 0, 0.0)
    depth = max((r[0] for r in rects), default=0) + 1
    height = _TOP_PX + depth * _ROW_PX
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_SVG_WIDTH}" height="{height}" '
        f'font-family="Verdana, sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="#f8f8f8"/>',
        f'<text x="{_SVG_WIDTH / 2}" y="18" text-anchor="middle" font-size="14">'
        f"{html.escape(title)} ({root.count} samples)</text>",
    ]
    for d, x, width, frame, n in rects:
        y = height - (d + 1) * _ROW_PX
        tip = html.escape(f"{frame} ({n} samples, {_pct(n, root.count)}%)")
        chars = int((width - 4) / _CHAR_PX)
        label = frame if len(frame) <= chars else (frame[: chars - 2] + "..")
        if chars <= 3:
            label = ""
        parts.append(
            f'<g><title>{tip}</title><rect x="{x:.2f}" y="{y}" width="{width:.2f}" '
            f'height="{_ROW_PX - 1}" fill="{_colour(frame)}" rx="2"/>'
            + (f'<text x="{x + 2:.2f}" y="{y + 11}">{html.escape(label)}</text>' if label else "")
            + "</g>"
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write(
    stacks: Mapping[str, int], out_dir: Path, name: str, title: str, about: Sequence[str]
) -> dict[str, Any]:
    """`<name>.folded` (collapsed stacks, for speedscope.app, flamegraph.pl or inferno),
    `<name>.svg` and `<name>.md` (the top tables under `about`, one line each) in `out_dir`;
    the figures for the results JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {ext: out_dir / f"{name}.{ext}" for ext in ("folded", "svg", "md")}
    files["folded"].write_text(format_collapsed(stacks))
    files["svg"].write_text(flamegraph_svg(stacks, title))
    files["md"].write_text(
        "\n".join(
            [
                f"# {title}",
                "",
                *about,
                "",
                f"Flame graph: [{files['svg'].name}]({files['svg'].name}); collapsed stacks: "
                f"`{files['folded'].name}`.",
                "",
                top_tables(stacks),
            ]
        )
        + "\n"
    )
    rows = function_samples(stacks)
    by_total = sorted(rows, key=lambda r: (-r.total, -r.own, r.function))
    return {
        "samples": sum(stacks.values()),
        "files": {ext: str(p) for ext, p in files.items()},
        "top_own": [dataclasses.asdict(r) for r in rows[:SUMMARY_N]],
        "top_total": [dataclasses.asdict(r) for r in by_total[:SUMMARY_N]],
    }
