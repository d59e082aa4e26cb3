"""Evaluation and curation reports: images a person would rather look at, plus Markdown and CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_png(path: Path, truth: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> None:
    n = len(names)
    cm = np.zeros((n, n), dtype=np.float64)
    np.add.at(cm, (truth, pred), 1)
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted broad group")
    ax.set_ylabel("true broad group")
    ax.set_title(f"Broad-group confusion (row-normalised), top-1 {np.mean(truth == pred):.1%}")
    for i in range(n):
        ax.text(
            i,
            i,
            f"{cm[i, i]:.2f}",
            ha="center",
            va="center",
            fontsize=5,
            color="white" if cm[i, i] > 0.5 else "black",
        )
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def image_grid_png(
    path: Path, images: np.ndarray, captions: Sequence[str], title: str, cols: int = 6
) -> None:
    rows = max(1, (len(images) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.2))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, img, cap in zip(np.atleast_1d(axes).ravel(), images, captions, strict=False):
        ax.imshow(img)
        ax.set_title(cap, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def precision_depth_png(path: Path, rows: Sequence[dict[str, float]]) -> None:
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    t = [r["threshold"] for r in rows]
    ax1.plot(t, [r["precision"] for r in rows], "o-", color="tab:blue", label="precision")
    ax1.set_xlabel("cumulative-probability threshold")
    ax1.set_ylabel("precision of the best-effort answer", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(t, [r["mean_depth"] for r in rows], "s--", color="tab:orange", label="depth")
    ax2.set_ylabel("mean depth of the answer", color="tab:orange")
    ax1.set_title("Best-effort (common-ancestor) answer: precision vs depth")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def reliability_png(
    path: Path, before: Sequence[dict[str, float]], after: Sequence[dict[str, float]], power: float
) -> None:
    """Reliability diagram of the top suggestion: stated probability against how often right."""
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for bins, style, label in (
        (before, "o--", "as the nets say"),
        (after, "s-", f"power {power:g}"),
    ):
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, label=label)
    ax.set_xlabel("stated probability of the top suggestion")
    ax.set_ylabel("share of those suggestions that are right")
    ax.set_title("Calibration (reported half of validation)")
    ax.legend(fontsize=8)
    _save(fig, path)


def imprint_bias_png(path: Path, sweep: Sequence[dict[str, float]], chosen: float) -> None:
    """Learned-back classes against the imprint bias: found, precise, and what they cost."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = [r["bias_offset"] for r in sweep]
    ax.plot(x, [r["recall"] for r in sweep], "o-", label="recall of learned classes")
    ax.plot(x, [r["precision"] for r in sweep], "s-", label="precision of learned classes")
    ax.plot(x, [r["worst_group_drop"] for r in sweep], "^--", label="worst group top-1 loss")
    ax.plot(x, [r["self_recall"] for r in sweep], "d:", label="learned photos themselves")
    ax.axvline(chosen, color="grey", ls=":", label=f"chosen {chosen:+g}")
    ax.set_xlabel("imprint bias offset (logit, vs trained rows' median)")
    ax.set_ylabel("share")
    ax.set_title("Learned classes: found vs photos taken from others")
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_csv(path: Path, rows: Sequence[dict[str, object]]) -> None:
    with path.open("w", newline="") as f:
        if not rows:
            f.write("kind\n")
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def markdown(metrics: dict[str, object]) -> str:
    """The human-readable report; every figure comes from the same dict as the manifest."""
    v = metrics["validation"]
    assert isinstance(v, dict)
    lines = [
        "# fieldlens model set: evaluation report",
        "",
        f"Model set `{metrics['model_set_version']}`, embedding space "
        f"`{metrics['embedding_version']}`; validation split: {v['images']} images "
        f"({v['per_class']} per class, seeded), never trained on.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| fine top-1 (backbone head) | {v['fine_top1']:.2%} |",
        f"| fine top-5 (backbone head) | {v['fine_top5']:.2%} |",
        f"| fine top-1 (backbone head, flip TTA) | {v['fine_top1_tta']:.2%} |",
        f"| fine top-1 (served path: broad x specialist/tiny) | {v['served_fine_top1']:.2%} |",
        f"| broad top-1 (served `broad` model) | {v['broad_top1']:.2%} |",
        "",
        "## Specialist vs tiny on the specialist groups (accuracy within the true group)",
        "",
        "| group | images | specialist | tiny | routed to |",
        "| --- | --- | --- | --- | --- |",
    ]
    for g, r in v["specialists"].items():
        lines.append(
            f"| {g} | {r['images']} | {r['specialist_acc']:.2%} | {r['tiny_acc']:.2%} |"
            f" {r['route']} |"
        )
    lines += [
        "",
        "## Best-effort answer: precision vs depth",
        "",
        "| threshold | precision | mean depth | leaf rate |",
        "| --- | --- | --- | --- |",
    ]
    for r in v["precision_vs_depth"]:
        lines.append(
            f"| {r['threshold']:.2f} | {r['precision']:.2%} | {r['mean_depth']:.2f} |"
            f" {r['leaf_rate']:.2%} |"
        )
    cur = metrics["curation"]
    assert isinstance(cur, dict)
    lines += [
        "",
        "![precision vs depth](precision_depth.png)",
        "",
        "## Broad groups",
        "",
        "![broad confusion](confusion_broad.png)",
        "",
        "## Top losses (validation)",
        "",
        "![top losses](top_losses.png)",
        "",
        "## Curation (training images)",
        "",
        f"- confidently wrong (p >= {cur['confident_p']}): {cur['confidently_wrong']}",
        f"- ambiguous (top-2 margin < {cur['ambiguous_margin']}): {cur['ambiguous']}",
        f"- byte-identical images with different labels: {cur['duplicate_conflicts']} groups",
        "",
        "Full list: `curation.csv`.",
        "",
        "![curation](curation.png)",
        "",
        f"Training time: {metrics['training_seconds'] / 60:.1f} min on {metrics['machine']}"
        + (f", in {p}." if (p := metrics.get("training_precision")) else "."),
        "",
    ]
    if isinstance(cal := metrics.get("calibration"), dict):
        lines += calibration_markdown(cal)
    return "\n".join(lines)


def calibration_markdown(cal: dict[str, object]) -> list[str]:
    """The calibration section (trainer/calibrate.py): what the router's stated
    probabilities, default threshold and learned-class bias rest on."""
    before, after, bias = cal["before"], cal["after"], cal["imprint_bias"]
    assert isinstance(before, dict) and isinstance(after, dict) and isinstance(bias, dict)
    lines = [
        "## Calibration",
        "",
        f"Fitted on {cal['fitted_on']}; reported on {cal['reported_on']}. The router states "
        f"P(leaf)^{cal['power']:g}, renormalised; rankings are unchanged.",
        "",
        "| | as the nets say | calibrated |",
        "| --- | --- | --- |",
        f"| NLL of the true class | {before['nll']:.3f} | {after['nll']:.3f} |",
        f"| ECE, top suggestion | {before['ece_top_suggestion']:.3f} |"
        f" {after['ece_top_suggestion']:.3f} |",
        f"| ECE, best-effort answer | {before['ece_answer']:.3f} | {after['ece_answer']:.3f} |",
        f"| top-1 | {before['top1']:.2%} | {after['top1']:.2%} |",
        f"| answer right (default threshold) | {before['answer_precision']:.2%} |"
        f" {after['answer_precision']:.2%} |",
        f"| answer mean depth | {before['answer_mean_depth']:.2f} |"
        f" {after['answer_mean_depth']:.2f} |",
        "",
        f"Default threshold {cal['default_threshold']:.2f}: the lowest from which the answer "
        f"was right at least {cal['default_min_precision']:.0%} of the time on the fitted half "
        "(a request's `min_precision` is read off the same curve, `GetInfo.precision_curve`).",
        "",
        "![reliability](reliability.png)",
        "",
        "### Learned classes: imprint bias",
        "",
        f"Each example's own row: {bias['example_rule']}; chosen offset "
        f"{bias['example_offset']:+g}. The taxon's mean row: {bias['rule']}; chosen offset "
        f"{bias['offset']:+g}.",
        "",
        "| offset | recall | precision | base top-1 | worst group loss | photos taken |"
        " learned photos answered as their taxon |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    sweep = bias["sweep"]
    assert isinstance(sweep, list)
    for r in sweep:
        lines.append(
            f"| {r['bias_offset']:+g} | {r['recall']:.1%} | {r['precision']:.1%} |"
            f" {r['base_top1']:.2%} | {r['worst_group_drop']:.1%} | {r['claimed']} |"
            f" {r['self_recall']:.0%} |"
        )
    lines += ["", "![imprint bias](imprint_bias.png)", ""]
    return lines
