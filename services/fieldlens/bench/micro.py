"""Micro-benchmarks: the tiny ensemble over the whole tree and neighbour search in Qdrant Edge at
two store sizes."""

from __future__ import annotations

import functools
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fieldlens.backends.vector_store import EdgeVectorStore, Exemplar
from fieldlens.common.model_set import load_model_set
from fieldlens.common.taxonomy import Taxon, Taxonomy
from fieldlens.tiny.ensemble import TinyEnsemble

TINY_BATCHES = (1, 64)
TAXONOMY_SCALE = 10
STORE_GROUPS = tuple(f"broad/group{i:02d}" for i in range(20))  # synthetic `broad` values
FILTER_GROUPS = 3
NEIGHBOURS_K = 5
UPSERT_BATCH = 2_000
_MAX_CALLS = 200_000


def time_calls(
    fn: Callable[[], object], budget_s: float, max_calls: int = _MAX_CALLS
) -> dict[str, float]:
    """Calls `fn` repeatedly for about `budget_s` (at least 5 times, at most `max_calls`):
    median, mean and p99 of one call in ms."""
    fn()  # warm caches and lazy allocations
    times: list[float] = []
    stop_at = time.perf_counter() + budget_s
    while len(times) < max_calls and (len(times) < 5 or time.perf_counter() < stop_at):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "calls": float(len(times)),
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "p99_ms": float(np.percentile(times, 99)),
    }


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


class SyntheticVectors:
    """Exemplar vectors for the neighbour benchmark, with labels and `broad` groups.

    "embedding" draws them the way our embeddings lie: CLASSES class centres around one shared
    direction (post-ReLU features share a cone), each vector its class centre plus noise,
    scaled so that a vector's cosine to its class centre is about 0.8 and two random vectors'
    cosine about 0.37, as measured on the shipped backbone's training embeddings. "uniform"
    draws independent uniform unit vectors: no neighbourhood structure, the worst case for
    any graph index. A class belongs to one group, as a taxon belongs to one broad group.
    """

    CLASSES = 200
    SHARED = 1.2  # weight of the shared direction in a class centre
    NOISE = 0.75  # noise norm relative to the class centre

    def __init__(self, kind: str, dim: int, groups: Sequence[str], rng: np.random.Generator):
        if kind not in ("embedding", "uniform"):
            raise ValueError(f"unknown vector distribution {kind!r}")
        self.kind, self.dim, self.groups, self.rng = kind, dim, list(groups), rng
        shared = _unit_rows(rng, 1, dim)
        self.centres = _unit_rows(rng, self.CLASSES, dim) + self.SHARED * shared
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit vectors [n, dim], class index of each)."""
        classes = self.rng.integers(0, self.CLASSES, n)
        if self.kind == "uniform":
            return _unit_rows(self.rng, n, self.dim), classes
        v = self.centres[classes] + self.NOISE * _unit_rows(self.rng, n, self.dim)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), classes

    def group(self, cls: int) -> str:
        return self.groups[int(cls) % len(self.groups)]


def scaled_taxonomy(base: Taxonomy, factor: int) -> Taxonomy:
    """A synthetic taxonomy with `factor` times the edges below the broad groups.

    Each broad group's subtree is copied `factor` times under the same group (ids suffixed
    `#k`), so depth, branching below the top and the broad groups (the broad net's outputs)
    stay as they are while the tiny ensemble's weight matrix grows `factor`-fold.
    """
    if factor < 1:
        raise ValueError("factor must be at least 1")
    top = {"root", "domain", "broad"}
    taxa: list[Taxon] = []
    for t in base:
        if t.rank in top:
            taxa.append(t)
            continue
        assert t.parent is not None
        parent_is_broad = base.get(t.parent).rank == "broad"
        for k in range(factor):
            parent = t.parent if parent_is_broad else f"{t.parent}#{k}"
            taxa.append(Taxon(f"{t.id}#{k}", t.name, t.rank, parent, t.depth))
    classes = [f"{c}#{k}" for k in range(factor) for c in base.class_ids]
    return Taxonomy(taxa, base.broad_ids, classes)


def _bench_ensemble(ens: TinyEnsemble, budget_s: float, rng: np.random.Generator) -> dict[str, Any]:
    emb = _unit_rows(rng, max(TINY_BATCHES), ens.dim)
    out: dict[str, Any] = {
        "taxa": len(ens.taxonomy),
        "rows": int(ens.weights.shape[0]),
        "nodes": len(ens.layout.nodes),
        "dim": ens.dim,
    }
    for b in TINY_BATCHES:
        t = time_calls(functools.partial(ens.predict, emb[:b]), budget_s)
        out[f"batch{b}"] = {**t, "per_image_ms": t["median_ms"] / b}
    # What the service computes per request: the dispatched groups only (here the largest).
    sizes = {b: int((ens.layout.row_broad == b).sum()) for b in ens.taxonomy.broad_ids}
    largest = max(sizes, key=lambda b: sizes[b])
    t = time_calls(functools.partial(ens.group_scores, emb[:1], largest), budget_s)
    out["largest_group"] = {**t, "group": largest, "rows": sizes[largest]}
    return out


def tiny_ensemble(models_dir: Path, budget_s: float, seed: int = 0) -> dict[str, Any]:
    """`TinyEnsemble.predict` (every taxon below every broad group) at batch 1 and 64, for the
    shipped ensemble and for a synthetic one over a TAXONOMY_SCALE-times larger taxonomy."""
    rng = np.random.default_rng(seed)
    model_set = load_model_set(models_dir)
    real = TinyEnsemble.load(model_set.tiny_path, model_set.taxonomy)
    t0 = time.perf_counter()
    big_tax = scaled_taxonomy(model_set.taxonomy, TAXONOMY_SCALE)
    n_rows = len(real.layout.row_taxon) * TAXONOMY_SCALE
    big = TinyEnsemble(
        big_tax,
        rng.normal(0.0, 0.1, (n_rows, real.dim)).astype(np.float32),
        rng.normal(0.0, 0.1, n_rows).astype(np.float32),
        "synthetic",
    )
    layout_s = time.perf_counter() - t0
    return {
        "real": _bench_ensemble(real, budget_s, rng),
        f"x{TAXONOMY_SCALE}": {**_bench_ensemble(big, budget_s, rng), "build_s": layout_s},
        "scale": TAXONOMY_SCALE,
    }


def _store_info(store: EdgeVectorStore) -> dict[str, int]:
    # Not part of the VectorStore interface: whether optimize() built an HNSW index (and over
    # how many vectors) is what explains the search times, so it is read off the shard itself.
    shard = getattr(store, "_shard", None)
    if shard is None:
        return {}
    info = shard.info()
    return {
        "segments": int(info.segments_count),
        "indexed_vectors": int(info.indexed_vectors_count),
    }


def _recall(
    hits: Sequence[Any],
    q: np.ndarray,
    allowed: Sequence[str],
    vectors: np.ndarray,
    groups: np.ndarray,
    ids: Sequence[str],
) -> float:
    rows = np.flatnonzero(np.isin(groups, allowed))
    best = rows[np.argsort(-(vectors[rows] @ q))[:NEIGHBOURS_K]]
    exact = {ids[i] for i in best}
    return len(exact & {h.id.replace("-", "") for h in hits}) / max(1, len(exact))


def neighbour_search(
    size: int,
    dim: int,
    queries: int,
    budget_s: float,
    groups: Sequence[str] = STORE_GROUPS,
    seed: int = 0,
    distribution: str = "embedding",
) -> dict[str, Any]:
    """Filtered top-5 search in an Edge store of `size` vectors (see SyntheticVectors).

    Each exemplar's `broad` payload is one of `groups` (20); each query allows FILTER_GROUPS of
    them, its own class's group among them, as the router's neighbour stage does with the
    dispatched categories. The store is built in a temporary directory: bulk upsert, then
    `optimize()` (the HNSW build).
    """
    rng = np.random.default_rng(seed)
    synth = SyntheticVectors(distribution, dim, groups, rng)
    root = Path(tempfile.mkdtemp(prefix="fieldlens-bench-store-"))
    try:
        store = EdgeVectorStore(root, "bench")
        store.ensure_collection(dim)
        kept_vectors: list[np.ndarray] = []
        kept_groups: list[str] = []
        t0 = time.perf_counter()
        for start in range(0, size, UPSERT_BATCH):
            n = min(UPSERT_BATCH, size - start)
            vectors, classes = synth.draw(n)
            kept_vectors.append(vectors)
            kept_groups.extend(synth.group(c) for c in classes)
            store.upsert(
                [
                    Exemplar(
                        id=f"{start + i:032x}",
                        vector=vectors[i],
                        label=f"synthetic{classes[i]}",
                        broad=synth.group(classes[i]),
                        source="bench",
                    )
                    for i in range(n)
                ]
            )
        store.flush()
        upsert_s = time.perf_counter() - t0
        vectors_all = np.concatenate(kept_vectors)
        groups_all = np.asarray(kept_groups)
        ids_all = [f"{i:032x}" for i in range(size)]
        t0 = time.perf_counter()
        store.optimize()
        optimize_s = time.perf_counter() - t0

        def draw_queries(n: int) -> tuple[np.ndarray, list[list[str]]]:
            qs, q_classes = synth.draw(n)
            others = [
                [str(g) for g in rng.choice(groups, FILTER_GROUPS, replace=False)] for _ in range(n)
            ]
            filters = [
                [synth.group(c), *[g for g in o if g != synth.group(c)][: FILTER_GROUPS - 1]]
                for c, o in zip(q_classes, others, strict=True)
            ]
            return qs, filters

        # Steady state, as in a serving router: a first pass of other queries pages the index
        # and vectors in (right after a bulk build they are cold, and a 100k store's first
        # queries measure page faults rather than search).
        for q, f in zip(*draw_queries(queries), strict=True):
            store.search(q, NEIGHBOURS_K, f)
        qs, filters = draw_queries(queries)
        times: list[float] = []
        found = 0
        answers = []
        stop_at = time.perf_counter() + budget_s
        for q, f in zip(qs, filters, strict=True):
            if len(times) >= 5 and time.perf_counter() > stop_at:
                break
            t1 = time.perf_counter()
            hits = store.search(q, NEIGHBOURS_K, f)
            times.append((time.perf_counter() - t1) * 1e3)
            found += len(hits)
            answers.append(hits)
        # After the timed loop: exact search touches every vector and would evict the index.
        recalls = [
            _recall(hits, q, f, vectors_all, groups_all, ids_all)
            for hits, q, f in zip(answers, qs, filters, strict=False)
        ]
        info = _store_info(store)
        count = store.count()
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "size": size,
        "distribution": distribution,
        "count": count,
        "dim": dim,
        "filter_groups": FILTER_GROUPS,
        "groups": len(groups),
        "k": NEIGHBOURS_K,
        "upsert_s": upsert_s,
        "optimize_s": optimize_s,
        "queries": len(times),
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "p99_ms": float(np.percentile(times, 99)),
        "hits_per_query": found / len(times),
        # Share of the exact top-k (brute force over the same filtered points) that came back.
        "recall_at_k": float(np.mean(recalls)),
        **info,
    }
