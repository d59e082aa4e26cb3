"""Validation metrics of the served path and the curation report over the training images."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fieldlens.common.settings import DEFAULT_SPECIALIST_MIN_P
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.tiny.ensemble import TinyEnsemble
from fieldlens.trainer import metrics, report
from fieldlens.trainer.data import Dataset
from fieldlens.trainer.loops import predict
from fieldlens.trainer.nets import Classifier

logger = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CONFIDENT_P = 0.9
AMBIGUOUS_MARGIN = 0.02
MAX_ROWS_PER_KIND = 500  # the CSV lists the worst cases; the report counts all of them


def tiny_leaf_probs(taxonomy: Taxonomy, ens: TinyEnsemble, emb: np.ndarray) -> np.ndarray:
    """P(class | its broad group) from the tiny ensemble, columns in class order."""
    rows = np.asarray(
        [ens.path_rows(c)[-1] if ens.path_rows(c) else -1 for c in taxonomy.class_ids]
    )
    pred = ens.predict(emb)
    out = np.ones((len(emb), len(rows)), dtype=np.float32)
    has = rows >= 0
    out[:, has] = pred[:, rows[has]]
    return out


def evaluate(
    taxonomy: Taxonomy,
    val: Dataset,
    val_emb: np.ndarray,
    val_logits: np.ndarray,
    val_logits_tta: np.ndarray,
    broad_probs: np.ndarray,
    ens: TinyEnsemble,
    specialists: dict[str, Classifier],
    resolution: int,
    report_dir: Path,
    per_class: int,
    specialist_min_probability: float = DEFAULT_SPECIALIST_MIN_P,
) -> tuple[dict[str, object], dict[str, str]]:
    """Returns (validation metrics, routing table broad id -> 'specialist'|'tiny')."""
    g = metrics.group_matrix(taxonomy)
    y_broad = g[val.labels].argmax(1)
    cond = tiny_leaf_probs(taxonomy, ens, val_emb)
    cond_always = cond.copy()  # specialists for every image, whatever P(their group)
    routing = {b: "tiny" for b in taxonomy.broad_ids}
    spec_rows: dict[str, dict[str, object]] = {}
    for group, net in specialists.items():
        broad = f"broad/{group}"
        leaves: list[str] = net.labels  # type: ignore[assignment]
        cols = np.asarray([taxonomy.class_ids.index(c) for c in leaves])
        logits = predict(net, val.images, resolution, flip_tta=True, desc=f"val {group}")
        p_spec = metrics.softmax(logits)
        in_group = np.isin(val.labels, cols)
        truth = np.asarray([np.flatnonzero(cols == y)[0] for y in val.labels[in_group]])
        spec_acc = float((p_spec[in_group].argmax(1) == truth).mean())
        tiny_acc = float((cond[in_group][:, cols].argmax(1) == truth).mean())
        route = "specialist" if spec_acc > tiny_acc else "tiny"
        routing[broad] = route
        if route == "specialist":
            cond_always[:, cols] = p_spec
            # As served: the specialist pass only where the group is likely enough.
            likely = broad_probs[:, taxonomy.broad_ids.index(broad)] >= specialist_min_probability
            cond[np.ix_(likely, cols)] = p_spec[likely]
        spec_rows[group] = {
            "images": int(in_group.sum()),
            "specialist_acc": spec_acc,
            "tiny_acc": tiny_acc,
            "route": route,
        }
    served = broad_probs @ g.T * cond  # P(broad(c)) x P(c | broad(c))
    served_always = broad_probs @ g.T * cond_always
    pvd = metrics.precision_vs_depth(taxonomy, served, val.labels, THRESHOLDS)
    result: dict[str, object] = {
        "images": len(val),
        "per_class": per_class,
        "fine_top1": metrics.topk_accuracy(val_logits, val.labels, 1),
        "fine_top5": metrics.topk_accuracy(val_logits, val.labels, 5),
        "fine_top1_tta": metrics.topk_accuracy(val_logits_tta, val.labels, 1),
        "served_fine_top1": metrics.topk_accuracy(served, val.labels, 1),
        "served_fine_top1_specialist_always": metrics.topk_accuracy(served_always, val.labels, 1),
        "specialist_min_probability": specialist_min_probability,
        "served_fine_top5": metrics.topk_accuracy(served, val.labels, 5),
        "broad_top1": float((broad_probs.argmax(1) == y_broad).mean()),
        # The fine net's flip-TTA softmax rolled up per group: what a TTA broad export would give.
        "broad_top1_rollup_tta": float(
            (
                (metrics.softmax(val_logits_tta) @ metrics.group_matrix(taxonomy)).argmax(1)
                == y_broad
            ).mean()
        ),
        "specialists": spec_rows,
        "precision_vs_depth": pvd,
    }
    names = [b.split("/", 1)[1] for b in taxonomy.broad_ids]
    report.confusion_png(report_dir / "confusion_broad.png", y_broad, broad_probs.argmax(1), names)
    report.precision_depth_png(report_dir / "precision_depth.png", pvd)
    losses = -np.log(np.clip(metrics.softmax(val_logits)[np.arange(len(val)), val.labels], 1e-9, 1))
    worst = np.argsort(-losses)[:18]
    pred = val_logits.argmax(1)
    report.image_grid_png(
        report_dir / "top_losses.png",
        val.images[worst],
        [
            f"true {_name(taxonomy, val.labels[i])}\npred {_name(taxonomy, pred[i])}"
            f"\nloss {losses[i]:.1f}"
            for i in worst
        ],
        "Validation top losses (fine head)",
    )
    return result, routing


def curate(
    taxonomy: Taxonomy, images: Dataset, logits: np.ndarray, report_dir: Path
) -> dict[str, object]:
    """Flags confidently-wrong, ambiguous and byte-identical-but-differently-labelled images."""
    p = metrics.softmax(logits)
    top2 = np.sort(p, axis=1)[:, -2:]
    pred = p.argmax(1)
    wrong = np.flatnonzero((pred != images.labels) & (top2[:, 1] >= CONFIDENT_P))
    ambiguous = np.flatnonzero(top2[:, 1] - top2[:, 0] < AMBIGUOUS_MARGIN)
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(images.sha256):
        by_hash[h].append(i)
    conflicts = [ix for ix in by_hash.values() if len({int(images.labels[i]) for i in ix}) > 1]
    flagged = [
        (kind, int(i))
        for kind, idx in (("confidently_wrong", wrong), ("ambiguous", ambiguous))
        for i in idx[np.argsort(-top2[idx, 1])][:MAX_ROWS_PER_KIND]
    ] + [("duplicate_conflict", i) for ix in conflicts for i in ix]
    rows: list[dict[str, object]] = [
        {
            "kind": kind,
            "key": images.keys[i],
            "sha256": images.sha256[i],
            "label": taxonomy.class_ids[images.labels[i]],
            "label_name": _name(taxonomy, images.labels[i]),
            "predicted": taxonomy.class_ids[pred[i]],
            "predicted_name": _name(taxonomy, pred[i]),
            "p_predicted": round(float(top2[i, 1]), 4),
        }
        for kind, i in flagged
    ]
    report.write_csv(report_dir / "curation.csv", rows)
    shown = [("DUP", int(i)) for ix in conflicts[:6] for i in ix][:12]
    shown += [("WRONG", int(i)) for i in wrong[: 24 - len(shown)]]
    report.image_grid_png(
        report_dir / "curation.png",
        images.images[[i for _, i in shown]],
        [
            f"{tag} {_name(taxonomy, images.labels[i])}\n-> {_name(taxonomy, pred[i])}"
            for tag, i in shown
        ],
        "Curation: byte-identical with different labels (DUP), confidently wrong (WRONG)",
    )
    return {
        "confident_p": CONFIDENT_P,
        "ambiguous_margin": AMBIGUOUS_MARGIN,
        "confidently_wrong": len(wrong),
        "ambiguous": len(ambiguous),
        "duplicate_conflicts": len(conflicts),
    }


def broad_probabilities(
    head: torch.nn.Linear, mix: float, emb: np.ndarray, logits: np.ndarray, taxonomy: Taxonomy
) -> np.ndarray:
    """The exported `broad` model's arithmetic, on precomputed outputs."""
    with torch.no_grad():
        p_head = torch.softmax(head(torch.from_numpy(emb)), 1).numpy()
    return (1 - mix) * p_head + mix * (metrics.softmax(logits) @ metrics.group_matrix(taxonomy))


def _name(taxonomy: Taxonomy, label: int) -> str:
    return taxonomy.get(taxonomy.class_ids[int(label)]).name[:22]
