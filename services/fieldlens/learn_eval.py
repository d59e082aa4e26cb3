"""`fieldlens learn-eval`: how well Learn teaches classes the models never saw, and its cost.

On a throwaway local cluster (its own run dir and ports, so the user's cluster keeps its
knowledge), every held-out novel class of the model set is learned from `shots` photos as a new
taxon under its parent; then `held_out` other photos of each are classified. Recall@1 counts a
photo whose top suggestion is the learned taxon; recall@5 one that has it among the first five.
Photos of the trained classes (validation split, one per class) are classified before and
after, to show what the new classes cost the old ones. Latencies are wall times of single calls
at concurrency 1 (Learn is durable when it returns).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from tqdm import tqdm

from fieldlens import cluster, gallery
from fieldlens.common.credentials import bearer
from fieldlens.v1 import router_pb2, router_pb2_grpc


def evaluate(data_dir: Path, models_dir: Path, shots: int, held_out: int) -> dict[str, object]:
    classes = gallery.novel_classes(models_dir)
    if not classes:
        raise cluster.ClusterError(f"{models_dir} names no held-out novel classes (novel.json)")
    images = gallery.class_samples(data_dir, [c["wnid"] for c in classes], shots + held_out)
    # Photos of trained classes: how much learning the new ones costs the old ones.
    known = gallery.validation_samples(data_dir, gallery.validation_keys(models_dir), KNOWN_PHOTOS)
    with tempfile.TemporaryDirectory(prefix="fieldlens-learn-eval-") as tmp:
        cfg = cluster.ClusterConfig(run_dir=Path(tmp), models_dir=models_dir).with_free_ports()
        try:
            cluster.start(cfg)
            with grpc.insecure_channel(cfg.addr(cfg.router_port)) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                before = _top1(stub, known, "trained classes, before")
                result = _run(stub, bearer(cfg.write_token()), classes, images, shots)
                result["trained_top1_before"] = before
                result["trained_top1_after"] = _top1(stub, known, "trained classes, after")
                result["trained_photos"] = len(known)
                return result
        finally:
            cluster.stop(cfg)


KNOWN_PHOTOS = 195


def _top1(
    stub: router_pb2_grpc.RouterStub, photos: list[tuple[str, bytes, str]], desc: str
) -> float:
    hits = 0
    for _, data, wnid in tqdm(photos, desc=desc, unit="img"):
        r = stub.Classify(router_pb2.ClassifyRequest(image=data, skip_cache=True), timeout=60)
        hits += bool(r.suggestions) and r.suggestions[0].taxon.id == wnid
    return hits / max(1, len(photos))


def _run(
    stub: router_pb2_grpc.RouterStub,
    token: tuple[tuple[str, str], ...],
    classes: list[dict[str, str]],
    images: dict[str, list[bytes]],
    shots: int,
) -> dict[str, object]:
    learn_ms: list[float] = []
    classify_ms: list[float] = []
    taxon_of: dict[str, str] = {}
    with tqdm(total=len(classes) * shots, desc="learn", unit="img") as bar:
        for c in classes:
            for img in images[c["wnid"]][:shots]:
                label = router_pb2.NewTaxonLabel(name=c["name"], parent_id=c["parent"])
                t0 = time.perf_counter()
                reply = stub.Learn(
                    router_pb2.LearnRequest(image=img, new_taxon=label, source="learn-eval"),
                    timeout=60,
                    metadata=token,
                )
                learn_ms.append((time.perf_counter() - t0) * 1e3)
                taxon_of[c["wnid"]] = reply.taxon.id
                bar.update()
    rows = []
    total = sum(len(images[c["wnid"]][shots:]) for c in classes)
    with tqdm(total=total, desc="classify held-out", unit="img") as bar:
        for c in classes:
            tid, top1, top5, n = taxon_of[c["wnid"]], 0, 0, 0
            for img in images[c["wnid"]][shots:]:
                t0 = time.perf_counter()
                r = stub.Classify(
                    router_pb2.ClassifyRequest(image=img, top_k=5, skip_cache=True), timeout=60
                )
                classify_ms.append((time.perf_counter() - t0) * 1e3)
                ids = [s.taxon.id for s in r.suggestions]
                top1 += bool(ids) and ids[0] == tid
                top5 += tid in ids[:5]
                n += 1
                bar.update()
            rows.append(
                {
                    "class": c["name"],
                    "parent": c["parent"],
                    "taxon": tid,
                    "held_out": n,
                    "recall_at_1": top1 / max(1, n),
                    "recall_at_5": top5 / max(1, n),
                }
            )
    return {
        "shots": shots,
        "classes": rows,
        "mean_recall_at_1": statistics.fmean(r["recall_at_1"] for r in rows),
        "mean_recall_at_5": statistics.fmean(r["recall_at_5"] for r in rows),
        "learn_p50_ms": statistics.median(learn_ms),
        "classify_p50_ms": statistics.median(classify_ms),
        "learn_calls": len(learn_ms),
        "classify_calls": len(classify_ms),
    }


def save(result: dict[str, object], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
