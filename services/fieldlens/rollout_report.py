"""A rollout's shadow comparison read from the routers' /metrics: agreement by taxonomy level
and the confusion between the two sets' answers by broad group (`fieldlens model-set compare`).

The routers count every comparison they make (router/rollout.py, `fieldlens_rollout_shadow_*`);
the counters of several replicas add up, so the report of a scaled-out deployment is the sum of
each router's exposition. They restart from zero with a router, like any counter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ANSWERS = ("top1", "best_effort", "broad")
DEPTH_ANSWERS = ("top1", "best_effort")
_PREFIX = "fieldlens_rollout_"


@dataclass
class ShadowReport:
    """What the routers counted for one candidate set."""

    candidate: str
    comparisons: float = 0.0
    dropped: float = 0.0
    # answer (top1, best_effort, broad) -> comparisons in which both sets gave the same one.
    agreements: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # answer (top1, best_effort) -> depth of the deepest shared taxon -> comparisons.
    depths: dict[str, dict[int, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    # (current set's broad group, candidate's broad group) -> comparisons.
    broad_pairs: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    # (arm, status code) -> Classify answers.
    requests: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))

    def agreement(self, answer: str) -> float | None:
        """Share of comparisons in which both sets gave the same `answer`; None without any."""
        return self.agreements[answer] / self.comparisons if self.comparisons else None

    def depth_shares(self, answer: str) -> dict[int, float]:
        """Share of comparisons by the deepest level both `answer`s share, shallowest first."""
        counts = self.depths.get(answer, {})
        total = sum(counts.values())
        return {d: counts[d] / total for d in sorted(counts)} if total else {}

    def broad_groups(self) -> tuple[list[str], list[str]]:
        """The broad groups seen as the current set's answer and as the candidate's, sorted."""
        return (
            sorted({a for a, _ in self.broad_pairs}),
            sorted({b for _, b in self.broad_pairs}),
        )

    def broad_confusion(self) -> list[tuple[str, float, float, str]]:
        """Per broad group of the current set: comparisons, share the candidate put in the same
        group, and the other group it most often chose instead ("" when none)."""
        rows = []
        for group in self.broad_groups()[0]:
            cells = {b: n for (a, b), n in self.broad_pairs.items() if a == group}
            total = sum(cells.values())
            others = {b: n for b, n in cells.items() if b != group and n > 0}
            instead = max(others, key=lambda b: others[b]) if others else ""
            rows.append((group, total, cells.get(group, 0.0) / total if total else 0.0, instead))
        return rows


def read_reports(expositions: Iterable[str]) -> dict[str, ShadowReport]:
    """The reports of every candidate in these /metrics texts (one per router), summed."""
    reports: dict[str, ShadowReport] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(_PREFIX):
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue  # _created timestamps
                labels = sample.labels
                candidate = labels.get("candidate")
                if candidate is None:
                    continue
                report = reports.get(candidate)
                if report is None:
                    report = reports[candidate] = ShadowReport(candidate)
                _add(report, sample.name, labels, sample.value)
    return reports


def _add(report: ShadowReport, name: str, labels: dict[str, str], value: float) -> None:
    if name == "fieldlens_rollout_shadow_comparisons_total":
        report.comparisons += value
    elif name == "fieldlens_rollout_shadow_dropped_total":
        report.dropped += value
    elif name == "fieldlens_rollout_shadow_agreements_total":
        report.agreements[labels["answer"]] += value
    elif name == "fieldlens_rollout_shadow_agreement_depth_total":
        report.depths[labels["answer"]][int(labels["depth"])] += value
    elif name == "fieldlens_rollout_shadow_broad_pairs_total":
        report.broad_pairs[(labels["current_broad"], labels["candidate_broad"])] += value
    elif name == "fieldlens_rollout_requests_total":
        report.requests[(labels["arm"], labels["code"])] += value


def plot(report: ShadowReport, path: Path) -> None:
    """Two panels into a PNG: comparisons by agreement depth (top-1 and best-effort answers),
    and the confusion between the two sets by broad group (each row: the current set's group,
    the share the candidate put in each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = report.broad_groups()
    fig, (levels, confusion) = plt.subplots(
        1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.4]}
    )
    depths = sorted({d for a in DEPTH_ANSWERS for d in report.depths.get(a, {})})
    width = 0.4
    for i, answer in enumerate(DEPTH_ANSWERS):
        shares = report.depth_shares(answer)
        levels.bar(
            [d + (i - 0.5) * width for d in depths],
            [shares.get(d, 0.0) for d in depths],
            width,
            label=answer.replace("_", "-"),
        )
    levels.set_xticks(depths)
    levels.set_xlabel("deepest taxonomy level both answers share (0 root, 2 broad group)")
    levels.set_ylabel("share of shadowed requests")
    levels.set_ylim(0, 1)
    levels.legend()
    levels.set_title(f"{report.candidate}: agreement by level ({report.comparisons:.0f} compared)")
    if rows and cols:
        counts = [[report.broad_pairs.get((a, b), 0.0) for b in cols] for a in rows]
        matrix = [[n / max(1.0, sum(row)) for n in row] for row in counts]
        image = confusion.imshow(matrix, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        confusion.set_xticks(range(len(cols)), [_short(c) for c in cols], rotation=60, ha="right")
        confusion.set_yticks(range(len(rows)), [_short(r) for r in rows])
        fig.colorbar(image, ax=confusion, label="share of the row")
    confusion.set_xlabel("candidate's broad group")
    confusion.set_ylabel("current set's broad group")
    confusion.set_title("confusion by broad group")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(taxon_id: str) -> str:
    return taxon_id.rsplit("/", 1)[-1]
