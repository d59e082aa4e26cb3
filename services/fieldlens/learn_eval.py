"""`fieldlens learn-eval`: what Learn gains and what it costs, measured as users meet it.

On a throwaway local cluster (its own run dir and ports, so the user's cluster keeps its
knowledge), the whole validation split is classified; then every held-out novel class of the
model set is learned from `shots` photos as a new taxon under its parent, all of them together
as a user would teach them; then the validation split is classified again, with `held_out`
other photos of each novel class. Reported, as generalized few-shot learning is measured:

- per learned class: recall@1/@5 on its own held-out photos, and the precision of its top-1
  answers among the photos of its broad group and among all photos (validation split plus the
  novel photos): how often an answer naming it is right;
- the trained classes: their mean precision on the same photos, and their top-1 before and
  after, over the split and in each broad group a learned class joined;
- the harmonic mean of the novel classes' mean recall@1 and the trained classes' top-1 after;
- the best-effort answer on the split (how often right, how deep) before and after.

Learn latency is the wall time of single durable calls; Classify p50 is single calls at
concurrency 1 (cache skipped).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from fieldlens import cluster, gallery
from fieldlens.common.credentials import bearer
from fieldlens.common.model_set import load_model_set
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.v1 import router_pb2, router_pb2_grpc

CONCURRENCY = 16  # Classify calls in flight while a split is classified
CALL_TIMEOUT_S = 60.0
LATENCY_SAMPLE = 100  # single Classify calls timed at concurrency 1


@dataclass(frozen=True)
class Seen:
    """What the cluster answered for one photo."""

    top: tuple[str, ...]  # suggested leaf ids, best first (top 5)
    answer: str  # the best-effort answer's taxon id
    answer_depth: int


def evaluate(data_dir: Path, models_dir: Path, shots: int, held_out: int) -> dict[str, Any]:
    classes = gallery.novel_classes(models_dir)
    if not classes:
        raise cluster.ClusterError(f"{models_dir} names no held-out novel classes (novel.json)")
    images = gallery.class_samples(data_dir, [c["wnid"] for c in classes], shots + held_out)
    split = gallery.validation_split(data_dir, gallery.validation_keys(models_dir))
    if not split:
        raise cluster.ClusterError(f"{models_dir} has no validation split (split.json)")
    with tempfile.TemporaryDirectory(prefix="fieldlens-learn-eval-") as tmp:
        cfg = cluster.ClusterConfig(run_dir=Path(tmp), models_dir=models_dir).with_free_ports()
        try:
            cluster.start(cfg)
            addr = cfg.addr(cfg.router_port)
            before = _classify_all(addr, [data for _, data, _ in split], "split, before")
            learn_ms, taxon_of, parents = _learn(addr, cfg.write_token(), classes, images, shots)
            novel = [(img, c["wnid"]) for c in classes for img in images[c["wnid"]][shots:]]
            after = _classify_all(addr, [data for _, data, _ in split], "split, after")
            novel_seen = _classify_all(addr, [img for img, _ in novel], "held-out novel photos")
            classify_ms = _latencies(addr, [img for img, _ in novel][:LATENCY_SAMPLE])
        finally:
            cluster.stop(cfg)
    truth = [wnid for _, _, wnid in split]
    taxonomy = load_model_set(models_dir).taxonomy
    result = _metrics(
        taxonomy, truth, before, after, [w for _, w in novel], novel_seen, classes, taxon_of
    )
    result["learned_parents"] = parents
    result.update(
        {
            "shots": shots,
            "held_out_per_class": held_out,
            "learn_p50_ms": statistics.median(learn_ms),
            "classify_p50_ms": statistics.median(classify_ms),
            "learn_calls": len(learn_ms),
        }
    )
    return result


def _classify_all(addr: str, photos: Sequence[bytes], desc: str) -> list[Seen]:
    """Every photo classified (cache skipped), CONCURRENCY calls in flight, in order."""

    async def run() -> list[Seen]:
        out: list[Seen | None] = [None] * len(photos)
        queue = iter(range(len(photos)))
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            with tqdm(total=len(photos), desc=desc, unit="img") as bar:

                async def worker() -> None:
                    for n in queue:
                        r = await stub.Classify(
                            router_pb2.ClassifyRequest(image=photos[n], top_k=5, skip_cache=True),
                            timeout=CALL_TIMEOUT_S,
                        )
                        out[n] = Seen(
                            tuple(s.taxon.id for s in r.suggestions),
                            r.answer.taxon.id,
                            r.answer.taxon.depth,
                        )
                        bar.update()

                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return [s for s in out if s is not None]

    return asyncio.run(run())


def _learn(
    addr: str,
    token: str,
    classes: list[dict[str, str]],
    images: dict[str, list[bytes]],
    shots: int,
) -> tuple[list[float], dict[str, str], dict[str, str]]:
    """Learns every novel class from `shots` photos, one durable call at a time."""
    learn_ms: list[float] = []
    taxon_of: dict[str, str] = {}
    parents: dict[str, str] = {}
    metadata = bearer(token)
    with grpc.insecure_channel(addr) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        with tqdm(total=len(classes) * shots, desc="learn", unit="img") as bar:
            for c in classes:
                for img in images[c["wnid"]][:shots]:
                    label = router_pb2.NewTaxonLabel(name=c["name"], parent_id=c["parent"])
                    t0 = time.perf_counter()
                    reply = stub.Learn(
                        router_pb2.LearnRequest(image=img, new_taxon=label, source="learn-eval"),
                        timeout=CALL_TIMEOUT_S,
                        metadata=metadata,
                    )
                    learn_ms.append((time.perf_counter() - t0) * 1e3)
                    taxon_of[c["wnid"]] = reply.taxon.id
                    parents[reply.taxon.id] = c["parent"]
                    bar.update()
    return learn_ms, taxon_of, parents


def _latencies(addr: str, photos: Sequence[bytes]) -> list[float]:
    out = []
    with grpc.insecure_channel(addr) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for img in photos:
            t0 = time.perf_counter()
            stub.Classify(
                router_pb2.ClassifyRequest(image=img, skip_cache=True), timeout=CALL_TIMEOUT_S
            )
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _metrics(
    taxonomy: Taxonomy,
    truth: list[str],
    before: list[Seen],
    after: list[Seen],
    novel_truth: list[str],
    novel_seen: list[Seen],
    classes: list[dict[str, str]],
    taxon_of: dict[str, str],
) -> dict[str, Any]:
    """The figures of `evaluate` from what the cluster answered (pure: unit-tested).

    Args:
        taxonomy: The model set's (trained) taxonomy.
        truth: The class of each photo of the validation split.
        before: What the cluster answered for each of them before learning.
        after: And after.
        novel_truth: The novel class (wnid) of each held-out novel photo.
        novel_seen: What the cluster answered for each of them (after learning).
        classes: The novel classes (novel.json: wnid, name, broad, parent).
        taxon_of: The learned taxon id of each novel class.
    """
    label_of = {c["wnid"]: taxon_of[c["wnid"]] for c in classes}  # novel wnid -> learned id
    # Every photo after learning, labelled with the id a right answer names.
    population = [(t, s) for t, s in zip(truth, after, strict=True)] + [
        (label_of[w], s) for w, s in zip(novel_truth, novel_seen, strict=True)
    ]
    named: Counter[str] = Counter(s.top[0] for _, s in population if s.top)
    right: Counter[str] = Counter(t for t, s in population if s.top and s.top[0] == t)
    group_of_truth = {t: taxonomy.broad_of(t) or "" for t in set(truth)}
    rows = []
    for c in classes:
        tid = label_of[c["wnid"]]
        mine = [s for w, s in zip(novel_truth, novel_seen, strict=True) if w == c["wnid"]]
        hits1 = sum(bool(s.top) and s.top[0] == tid for s in mine)
        hits5 = sum(tid in s.top[:5] for s in mine)
        in_group = [
            s for t, s in zip(truth, after, strict=True) if group_of_truth.get(t) == c["broad"]
        ]
        claimed_in_group = sum(bool(s.top) and s.top[0] == tid for s in in_group)
        rows.append(
            {
                "class": c["name"],
                "taxon": tid,
                "parent": c["parent"],
                "broad": c["broad"],
                "held_out": len(mine),
                "recall_at_1": hits1 / max(1, len(mine)),
                "recall_at_5": hits5 / max(1, len(mine)),
                "claimed_trained_photos": named[tid] - hits1,
                "claimed_in_group": claimed_in_group,
                "precision": right[tid] / named[tid] if named[tid] else None,
                "precision_in_group": hits1 / (hits1 + claimed_in_group)
                if hits1 + claimed_in_group
                else None,
            }
        )
    trained = sorted(set(truth))
    trained_precision = [right[t] / named[t] for t in trained if named[t]]
    learned_precision = [r["precision"] for r in rows if r["precision"] is not None]
    base_before = _top1(truth, before)
    base_after = _top1(truth, after)
    mean_recall = statistics.fmean(r["recall_at_1"] for r in rows)
    groups = sorted({c["broad"] for c in classes})
    per_group = []
    for g in groups:
        idx = [i for i, t in enumerate(truth) if group_of_truth.get(t) == g]
        per_group.append(
            {
                "broad": g,
                "learned": [r["class"] for r in rows if r["broad"] == g],
                "photos": len(idx),
                "top1_before": _top1([truth[i] for i in idx], [before[i] for i in idx]),
                "top1_after": _top1([truth[i] for i in idx], [after[i] for i in idx]),
            }
        )
    return {
        "classes": rows,
        "mean_recall_at_1": mean_recall,
        "mean_recall_at_5": statistics.fmean(r["recall_at_5"] for r in rows),
        "learned_mean_precision": statistics.fmean(learned_precision)
        if learned_precision
        else None,
        "trained_mean_precision": statistics.fmean(trained_precision),
        "trained_photos": len(truth),
        "trained_top1_before": base_before,
        "trained_top1_after": base_after,
        "harmonic_mean": 2 * mean_recall * base_after / (mean_recall + base_after)
        if mean_recall + base_after
        else 0.0,
        "affected_groups": per_group,
        "claimed_trained_photos": sum(r["claimed_trained_photos"] for r in rows),
        "answer_before": _answers(taxonomy, truth, before),
        "answer_after": _answers(taxonomy, truth, after),
    }


def _top1(truth: Sequence[str], seen: Sequence[Seen]) -> float:
    return sum(bool(s.top) and s.top[0] == t for t, s in zip(truth, seen, strict=True)) / max(
        1, len(truth)
    )


def _answers(taxonomy: Taxonomy, truth: Sequence[str], seen: Sequence[Seen]) -> dict[str, float]:
    """How often the best-effort answer is right (the photo's class is it or below it), and
    how deep it goes, over the split."""
    n = max(1, len(truth))
    right = sum(s.answer in taxonomy.path(t) for t, s in zip(truth, seen, strict=True))
    return {
        "precision": right / n,
        "mean_depth": sum(s.answer_depth for s in seen) / n,
    }


def save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: each learned class's recall@1 on its own photos and the precision of the answers
    naming it; right: the trained classes' top-1 in each group a class joined, before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["classes"]
    groups = result["affected_groups"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(rows))
    width = 0.4
    left.bar([i - width / 2 for i in x], [r["recall_at_1"] for r in rows], width, label="recall@1")
    left.bar(
        [i + width / 2 for i in x],
        [r["precision"] or 0.0 for r in rows],
        width,
        label="precision (all photos)",
    )
    left.axhline(result["trained_mean_precision"], color="grey", linestyle="--", linewidth=1)
    left.text(
        len(rows) - 0.5,
        result["trained_mean_precision"],
        "trained classes' mean precision",
        ha="right",
        va="bottom",
        fontsize=8,
        color="grey",
    )
    left.set_xticks(list(x), [r["class"] for r in rows], rotation=20, ha="right")
    left.set_ylim(0, 1)
    left.set_title(f"learned from {result['shots']} photos each")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8)
    gx = range(len(groups))
    right.bar(
        [i - width / 2 for i in gx], [g["top1_before"] for g in groups], width, label="before"
    )
    right.bar([i + width / 2 for i in gx], [g["top1_after"] for g in groups], width, label="after")
    right.set_xticks(list(gx), [g["broad"].split("/", 1)[-1] for g in groups], rotation=20)
    right.set_ylim(0, 1)
    right.set_title("trained classes' top-1 in the groups they joined")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8)
    fig.suptitle(
        f"novel recall@1 {result['mean_recall_at_1']:.0%}, trained top-1 "
        f"{result['trained_top1_before']:.1%} -> {result['trained_top1_after']:.1%}, "
        f"harmonic mean {result['harmonic_mean']:.2f}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
