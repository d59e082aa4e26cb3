"""Calibration of a model set from what its exported nets answer on the validation split.

Three figures go into the manifest's `calibration`, each fitted on one half of the validation
split (seeded, per class) and reported on the other half:

- `power` (1/temperature) on the served leaf distribution: P*(leaf) = P(leaf)^power / Z, with
  the router's own arithmetic (`router/merge.calibrated`: dispatched categories exact, the others
  as if their leaves shared their probability evenly). A power keeps every ranking, so the
  suggestions stay as they were; the stated probabilities mean what they say (negative
  log-likelihood of the true class, fitted; expected calibration error, reported).
- `precision_curve`: how often the best-effort answer is right, and how deep it goes, for each
  threshold. A request's `min_precision` becomes the lowest threshold that reaches it here, and
  the router's default answer targets `default_min_precision` (90%).
- the imprint bias of learned taxa (`broad.imprint.bias`), chosen on simulated novel classes:
  trained classes are hidden from the fine softmax and the tiny ensemble, learned back from 5
  training photos each as Learn would, and the served answers are replayed offline with the
  router's own code; the bias kept is the one that finds the most of them while no broad group
  they joined loses more than 2 points of top-1 (see `choose_bias`).

`make calibrate` runs it on a model set (the shipped one included); `make train` runs it last.
A calibrated set gets its own version: the answers it gives are not the uncalibrated set's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fieldlens import gallery
from fieldlens.backends.triton_python_model import load_torchscript
from fieldlens.common.knowledge import LearnedExample, NewTaxonSpec
from fieldlens.common.model_set import MANIFEST, ModelSet, load_model_set, threshold_for
from fieldlens.common.settings import (
    DEFAULT_DISPATCH_TOP,
    DEFAULT_SPECIALIST_MIN_P,
    data_dir_from_env,
)
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.router import merge as served
from fieldlens.router.imaging import ImageLimits, decode
from fieldlens.router.merge import CategoryResult
from fieldlens.specialist.servicer import Rollup
from fieldlens.tiny.ensemble import TinyEnsemble
from fieldlens.trainer import metrics, report

logger = logging.getLogger(__name__)

SEED = 20261129
DEFAULT_MIN_PRECISION = 0.9
POWERS = tuple(float(p) for p in np.round(np.arange(0.5, 3.001, 0.05), 2))
THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.30, 0.995, 0.01), 2))
BIAS_OFFSETS = tuple(float(b) for b in np.arange(-5.0, 1.01, 0.5))
EXAMPLE_OFFSETS = tuple(float(b) for b in np.arange(-8.0, -2.99, 0.5))
SELF_RECALL = 0.9  # share of the learned photos themselves their own rows must win back
PSEUDO_NOVEL = 20  # trained classes hidden and learned back to choose the imprint bias
DRAWS = 3  # independent draws of them: one group's loss is a few photos, so average
SHOTS = 5  # photos each is learned from, as `make learn-eval` teaches the novel classes
MAX_GROUP_DROP = 0.02  # most top-1 a broad group's trained classes may lose to learned ones
BATCH = 256
ECE_BINS = 15
MIN_DISPATCH_PROBABILITY = 0.02  # the router's (router/dataplane.py)


@dataclass
class Outputs:
    """The exported nets' outputs on a set of photos, as Triton serves them."""

    logp: np.ndarray  # broad log-probabilities (N, groups)
    emb: np.ndarray  # L2-normalised embeddings (N, dim)
    fine: np.ndarray  # fine logits (N, classes)
    norm: np.ndarray  # feature norms (N,)
    specialist: dict[str, np.ndarray]  # category -> leaf probabilities (N, its classes)


class Nets:
    """The model set's exported TorchScript nets, run in-process (the arithmetic Triton runs)."""

    def __init__(self, model_set: ModelSet, model_repository: Path) -> None:
        self.model_set = model_set
        self.broad = load_torchscript(model_repository / "broad" / "1" / "model.pt")
        self.specialists = {
            c: load_torchscript(model_repository / s.model / "1" / "model.pt")
            for c, s in model_set.specialists.items()
        }

    def outputs(self, images: np.ndarray, desc: str) -> Outputs:
        import torch

        parts: list[list[np.ndarray]] = [[], [], [], []]
        spec: dict[str, list[np.ndarray]] = {c: [] for c in self.specialists}
        with torch.no_grad():
            for i in tqdm(range(0, len(images), BATCH), desc=desc, unit="batch", leave=False):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + BATCH]))
                for k, out in enumerate(self.broad(x)):
                    parts[k].append(out.numpy())
                flipped = torch.from_numpy(np.ascontiguousarray(images[i : i + BATCH, :, ::-1]))
                for c, net in self.specialists.items():
                    # As the specialist service computes it: mean of the photo's and its
                    # mirror image's softmax.
                    (a,) = net(x)
                    (b,) = net(flipped)
                    spec[c].append(((torch.softmax(a, 1) + torch.softmax(b, 1)) / 2).numpy())
        logp, emb, fine, norm = (np.concatenate(p) for p in parts)
        return Outputs(logp, emb, fine, norm[:, 0], {c: np.concatenate(v) for c, v in spec.items()})

    def learn_vectors(self, images: np.ndarray) -> np.ndarray:
        """What Learn stores for each photo: the unit mean of its and its mirror's embedding."""
        import torch

        with torch.no_grad():
            a = self.broad(torch.from_numpy(np.ascontiguousarray(images)))[1].numpy()
            b = self.broad(torch.from_numpy(np.ascontiguousarray(images[:, :, ::-1])))[1].numpy()
        return served.unit_rows(a + b)


@dataclass
class Photos:
    images: np.ndarray  # (N, size, size, 3) uint8, decoded as the router decodes
    labels: np.ndarray  # class ids


def load_photos(
    data_dir: Path, models_dir: Path, classes: Sequence[str], shots: int, size: int
) -> tuple[Photos, dict[str, np.ndarray]]:
    """The validation split, and `shots` training photos of every class (for learning back)."""
    keys = gallery.validation_keys(models_dir)
    if not keys:
        raise ValueError(f"{models_dir} has no validation split (split.json)")
    limits = ImageLimits(1 << 24, 1 << 26, size)
    wanted = set(classes)
    val_images, val_labels = [], []
    train: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    for key, data, wnid in tqdm(gallery._samples(data_dir), desc="read photos", unit="img"):
        if key in keys:
            val_images.append(decode(data, limits).rgb)
            val_labels.append(wnid)
        elif wnid in wanted and len(train[wnid]) < shots:
            train[wnid].append(decode(data, limits).rgb)
    examples = {c: np.stack(v) for c, v in train.items() if len(v) == shots}
    return Photos(np.stack(val_images), np.asarray(val_labels)), examples


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, report) index arrays: each class's photos split in two, seeded."""
    rng = np.random.default_rng(seed)
    fit, report = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fit.extend(idx[: len(idx) // 2])
        report.extend(idx[len(idx) // 2 :])
    return np.sort(np.asarray(fit)), np.sort(np.asarray(report))


# -- the served probabilities, vectorised ---------------------------------------------------
class Tree:
    """Index matrices over every taxon, for the router's arithmetic on many photos at once."""

    def __init__(self, taxonomy: Taxonomy) -> None:
        self.taxonomy = taxonomy
        self.ids = [t.id for t in taxonomy]
        col = {t: j for j, t in enumerate(self.ids)}
        self.depth = np.asarray([taxonomy.get(t).depth for t in self.ids], dtype=np.float64)
        classes, groups = taxonomy.class_ids, taxonomy.broad_ids
        self.group_of = np.asarray([groups.index(str(taxonomy.broad_of(c))) for c in classes])
        self.leaf_count = np.asarray([taxonomy.leaf_count(g) for g in groups], dtype=np.float64)
        # A leaf's mass counts for itself and the nodes between it and its group; a group's
        # for itself and everything above it.
        self.leaf_to_taxa = np.zeros((len(classes), len(self.ids)))
        self.on_path = np.zeros((len(classes), len(self.ids)), dtype=bool)
        for i, c in enumerate(classes):
            path = taxonomy.path(c)
            for t in path[path.index(str(taxonomy.broad_of(c))) + 1 :]:
                self.leaf_to_taxa[i, col[t]] = 1.0
            for t in path:
                self.on_path[i, col[t]] = True
        self.group_to_taxa = np.zeros((len(groups), len(self.ids)))
        for g, b in enumerate(groups):
            for t in taxonomy.path(b):
                self.group_to_taxa[g, col[t]] = 1.0
        self.is_leaf = np.asarray([taxonomy.is_leaf(t) for t in self.ids])


@dataclass
class Served:
    """What the router combines for each photo: P(group), which groups it dispatched, and
    P(leaf | its group) from the classifier serving that group."""

    groups: np.ndarray  # (N, groups)
    dispatched: np.ndarray  # (N, groups) bool
    within: np.ndarray  # (N, classes)


def served_parts(
    model_set: ModelSet,
    ens: TinyEnsemble,
    out: Outputs,
    dispatch_top: int = DEFAULT_DISPATCH_TOP,
    specialist_min_p: float = DEFAULT_SPECIALIST_MIN_P,
) -> Served:
    taxonomy = model_set.taxonomy
    p = np.exp(out.logp - out.logp.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dispatched = np.zeros(p.shape, dtype=bool)
    for i, row in enumerate(p):
        picked = served.pick_categories(
            dict(zip(taxonomy.broad_ids, row.tolist(), strict=True)),
            dispatch_top,
            MIN_DISPATCH_PROBABILITY,
        )
        dispatched[i, [taxonomy.broad_ids.index(b) for b in picked]] = True
    within = _tiny_leaf_probs(taxonomy, ens, out.emb)
    for category, probs in out.specialist.items():
        if model_set.routing.get(category) != "specialist":
            continue
        cols = [taxonomy.class_ids.index(c) for c in model_set.specialists[category].labels]
        likely = p[:, taxonomy.broad_ids.index(category)] >= specialist_min_p
        within[np.ix_(likely, cols)] = probs[likely]
    return Served(p, dispatched, within)


def _tiny_leaf_probs(taxonomy: Taxonomy, ens: TinyEnsemble, emb: np.ndarray) -> np.ndarray:
    rows = [ens.path_rows(c)[-1] for c in taxonomy.class_ids]
    return ens.predict(emb)[:, rows].astype(np.float64)


def _group_mass(tree: Tree, s: Served, power: float) -> np.ndarray:
    """(N, groups): each group's share of the tempered mass before normalising: exact for a
    dispatched group, as if its leaves shared its probability evenly for the others."""
    within_total = np.zeros(s.groups.shape)
    np.add.at(within_total.T, tree.group_of, (s.within**power).T)
    return np.where(
        s.dispatched,
        s.groups**power * within_total,
        s.groups**power * tree.leaf_count ** (1 - power),
    )


def calibrated(tree: Tree, s: Served, power: float) -> tuple[np.ndarray, np.ndarray]:
    """(P* of every taxon, (N, taxa); P* of every leaf, (N, classes)) as router/merge.py
    states them: leaves and nodes known in dispatched groups only."""
    g = tree.group_of
    leaf = (s.groups[:, g] * s.within) ** power * s.dispatched[:, g]
    mass = _group_mass(tree, s, power)
    z = mass.sum(axis=1, keepdims=True)
    cum = (leaf / z) @ tree.leaf_to_taxa + (mass / z) @ tree.group_to_taxa
    return cum, leaf / z


def answers(tree: Tree, cum: np.ndarray, threshold: float) -> np.ndarray:
    """Column of the best-effort answer: the deepest taxon clearing `threshold`, the more
    probable among equally deep ones."""
    key = np.where(cum >= threshold, tree.depth[None, :] * 10.0 + cum, -1.0)
    return key.argmax(axis=1)


def nll(tree: Tree, s: Served, power: float, y: np.ndarray) -> float:
    """Mean negative log of P*(true class); a class in a group not dispatched gets its share
    of that group's mass as the router would count it (evenly)."""
    _, leaf = calibrated(tree, s, power)
    g = tree.group_of[y]
    p = leaf[np.arange(len(y)), y]
    undispatched = ~s.dispatched[np.arange(len(y)), g]
    if undispatched.any():
        mass = s.groups[undispatched, g[undispatched]] ** power * tree.leaf_count[
            g[undispatched]
        ] ** (-power)
        total = _group_mass(tree, s, power).sum(axis=1)[undispatched]
        p[undispatched] = mass / total
    return float(-np.mean(np.log(np.clip(p, 1e-12, None))))


def precision_curve(tree: Tree, s: Served, power: float, y: np.ndarray) -> list[dict[str, float]]:
    cum, _ = calibrated(tree, s, power)
    rows = []
    for t in THRESHOLDS:
        a = answers(tree, cum, t)
        rows.append(
            {
                "threshold": t,
                "precision": float(tree.on_path[y, a].mean()),
                "mean_depth": float(tree.depth[a].mean()),
                "leaf_rate": float(tree.is_leaf[a].mean()),
            }
        )
    return rows


def reliability(conf: np.ndarray, correct: np.ndarray) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and the reliability diagram's bins."""
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    bins, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= hi))
        if not sel.any():
            continue
        gap = abs(float(conf[sel].mean()) - float(correct[sel].mean()))
        ece += sel.mean() * gap
        bins.append(
            {
                "lo": float(lo),
                "hi": float(hi),
                "confidence": float(conf[sel].mean()),
                "accuracy": float(correct[sel].mean()),
                "photos": int(sel.sum()),
            }
        )
    return float(ece), bins


def calibration_figures(
    tree: Tree, s: Served, power: float, y: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Top suggestion and best-effort answer: how sure (stated) against how often right."""
    cum, leaf = calibrated(tree, s, power)
    top = leaf.argmax(axis=1)
    ece_top, bins_top = reliability(leaf.max(axis=1), top == y)
    a = answers(tree, cum, threshold)
    stated = cum[np.arange(len(y)), a]
    right = tree.on_path[y, a]
    ece_answer, bins_answer = reliability(stated, right)
    return {
        "top1": float((top == y).mean()),
        "nll": nll(tree, s, power, y),
        "ece_top_suggestion": ece_top,
        "ece_answer": ece_answer,
        "reliability_top_suggestion": bins_top,
        "reliability_answer": bins_answer,
        "answer_precision": float(right.mean()),
        "answer_mean_depth": float(tree.depth[a].mean()),
    }


def fit_power(tree: Tree, s: Served, y: np.ndarray) -> float:
    """The power minimising the negative log-likelihood of the true class."""
    losses = {p: nll(tree, s, p, y) for p in POWERS}
    return min(losses, key=losses.__getitem__)


def _subset(s: Served, idx: np.ndarray) -> Served:
    return Served(s.groups[idx], s.dispatched[idx], s.within[idx])


# -- the imprint bias of learned taxa --------------------------------------------------------
@dataclass(frozen=True)
class LearnOutcome:
    """Learned-back classes on the validation split, for one imprint bias."""

    bias_offset: float
    recall: float  # mean over the learned classes: their photos answered as them (top-1)
    precision: float  # mean over them: answers naming them that are right
    base_top1: float  # the other classes' top-1
    base_top1_before: float
    worst_group_drop: float  # largest loss of top-1 in a broad group a class joined
    claimed: int  # photos of other classes answered as a learned class
    self_recall: float = 0.0  # the learned photos themselves answered as their taxon


def _hidden_world(
    model_set: ModelSet, ens: TinyEnsemble, out: Outputs, hidden: Sequence[str]
) -> tuple[ModelSet, TinyEnsemble, Outputs]:
    """The model set as if `hidden` had never been trained: gone from the taxonomy, the tiny
    ensemble and the fine softmax (the broad probabilities, its per-group rollup, recomputed;
    with a broad head mixed in, the head's share is kept as it was)."""
    taxonomy = model_set.taxonomy
    # Gone too: a node whose every leaf is hidden (it would turn into a leaf of its own).
    gone = {
        t.id
        for t in taxonomy
        if t.id not in taxonomy.broad_ids
        and taxonomy.broad_of(t.id)
        and set(taxonomy.leaves_under(t.id)) <= set(hidden)
    }
    kept = Taxonomy(
        [t for t in taxonomy if t.id not in gone],
        taxonomy.broad_ids,
        [c for c in taxonomy.class_ids if c not in hidden],
    )
    tiny = ens.with_taxonomy(kept)
    tiny.centroids = ens.centroids
    mask = np.isin(np.asarray(taxonomy.class_ids), list(hidden))
    fine = out.fine.copy()
    fine[:, mask] = -np.inf
    logp = out.logp
    if float(model_set.manifest["broad"].get("rollup_mix", 1.0)) == 1.0:
        # The broad net's probabilities are the fine softmax rolled up per group: redo it.
        rolled = metrics.softmax(fine) @ metrics.group_matrix(taxonomy)
        logp = np.log(np.clip(rolled, 1e-12, None))
    # (With a broad head mixed in, its share of a hidden class's mass cannot be taken back
    # from the exported outputs: the broad probabilities are kept as they are.)
    return (
        dataclasses.replace(model_set, taxonomy=kept),
        tiny,
        Outputs(logp, out.emb, fine, out.norm, out.specialist),
    )


def _serve_one(
    model_set: ModelSet,
    taxonomy: Taxonomy,
    tiny: TinyEnsemble,
    rollups: dict[str, Rollup],
    rows: served.ImprintRows | None,
    learned_groups: set[str],
    out: Outputs,
    i: int,
) -> str:
    """The router's top suggestion for photo `i` (router/dataplane.py, offline)."""
    p = np.exp(out.logp[i] - out.logp[i].max())
    p /= p.sum()
    bp = dict(zip(taxonomy.broad_ids, p.tolist(), strict=True))
    learned: dict[str, float] = {}
    if rows is not None:
        bp, learned = served.with_learned_classes(
            bp, out.fine[i], float(out.norm[i]), out.emb[i], rows
        )
    results = []
    for c in served.pick_categories(bp, DEFAULT_DISPATCH_TOP, MIN_DISPATCH_PROBABILITY):
        spec = model_set.specialists.get(c)
        if (
            spec is not None
            and model_set.routing.get(c) == "specialist"
            and c not in learned_groups
            and bp[c] >= DEFAULT_SPECIALIST_MIN_P
        ):
            (scored,) = rollups[c].scores(out.specialist[c][i : i + 1])
            scores = {t: q for t, q, _ in scored if t in taxonomy}
        else:
            scores = {t: q for t, q, _ in tiny.scores_for(out.emb[i : i + 1], c)}
        results.append(CategoryResult(c, bp[c], scores, "x"))
    if learned:
        results = [served.with_learned_leaves(taxonomy, r, learned) for r in results]
    merged = served.merge(taxonomy, bp, results, 0.5, 1)
    return merged.suggestions[0].taxon_id if merged.suggestions else ""


class LearnBack:
    """One draw of hidden classes: the model set without them, and them learned back from
    `vectors` (what Learn stores for their training photos), served offline."""

    def __init__(
        self,
        model_set: ModelSet,
        ens: TinyEnsemble,
        out: Outputs,
        labels: np.ndarray,
        own: Outputs,
        vectors: dict[str, np.ndarray],
        hidden: Sequence[str],
        label: str = "",
    ) -> None:
        self.label = label
        self.ms, tiny_h, self.out = _hidden_world(model_set, ens, out, hidden)
        _, _, self.own = _hidden_world(model_set, ens, own, hidden)
        base_taxonomy = self.ms.taxonomy
        learned_ids = {h: "learned/" + h for h in hidden}
        self.learned = list(learned_ids.values())
        # Each learned back under its deepest ancestor left in the taxonomy, as a user would.
        parent = {
            h: next(t for t in reversed(model_set.taxonomy.path(h)[:-1]) if t in base_taxonomy)
            for h in hidden
        }
        self.taxonomy = base_taxonomy.with_learned([(learned_ids[h], h, parent[h]) for h in hidden])
        self.tiny = tiny_h.copy()
        self.tiny.learned_scored_upstream = True  # as the tiny service runs with an imprinting set
        self.tiny.learn(
            [
                LearnedExample(
                    hashlib.sha256(f"{h}/{j}".encode()).hexdigest(),
                    learned_ids[h],
                    v.astype(np.float32),
                    NewTaxonSpec(learned_ids[h], h, parent[h]),
                )
                for h in hidden
                for j, v in enumerate(vectors[h])
            ]
        )
        self.rollups = {
            c: Rollup(model_set.taxonomy, c, s.labels) for c, s in model_set.specialists.items()
        }
        self.truth = np.asarray([learned_ids.get(t, t) for t in labels])
        self.own_truth = np.asarray([learned_ids[h] for h in hidden for _ in vectors[h]])
        self.novel = np.isin(labels, list(hidden))
        self.groups = np.asarray([model_set.taxonomy.broad_of(t) for t in labels])
        self.joined = {str(model_set.taxonomy.broad_of(h)) for h in hidden}
        self.before = np.asarray(
            [
                _serve_one(self.ms, base_taxonomy, tiny_h, self.rollups, None, set(), self.out, i)
                for i in tqdm(range(len(labels)), desc=f"learn-back{label}: before", leave=False)
            ]
        )
        self.imprint = model_set.manifest["broad"]["imprint"]
        self.sums = {learned_ids[h]: (vectors[h].sum(axis=0), len(vectors[h])) for h in hidden}
        self.examples = {learned_ids[h]: list(vectors[h]) for h in hidden}

    def _rows(self, offset: float, example_offset: float) -> served.ImprintRows:
        trained = _trained_bias(self.imprint)
        imprint = {
            **self.imprint,
            "bias": trained + offset,
            "example_bias": trained + example_offset,
        }
        return served.imprint_rows(self.sums, imprint, self.taxonomy, self.examples)

    def _top(self, rows: served.ImprintRows, out: Outputs) -> np.ndarray:
        return np.asarray(
            [
                _serve_one(
                    self.ms, self.taxonomy, self.tiny, self.rollups, rows, self.joined, out, i
                )
                for i in range(len(out.norm))
            ]
        )

    def self_recall(self, example_offset: float, offset: float = -1e3) -> float:
        """Share of the learned photos themselves answered as their taxon (by default with
        the example rows alone: the taxa's mean rows out of reach)."""
        top = self._top(self._rows(offset, example_offset), self.own)
        return float(np.mean(top == self.own_truth))

    def sweep(self, example_offset: float, offsets: Sequence[float]) -> list[LearnOutcome]:
        """For each mean-row bias offset, with the example rows at `example_offset`: the
        served top-1 on the validation photos, and on the learned photos themselves."""
        outcomes = []
        truth, novel, before = self.truth, self.novel, self.before
        for offset in tqdm(offsets, desc=f"learn-back{self.label}: imprint bias", unit="bias"):
            rows = self._rows(offset, example_offset)
            top = self._top(rows, self.out)
            named = Counter(top.tolist())
            recall = [float(np.mean(top[truth == t] == t)) for t in self.learned]
            precision = [
                float(np.mean(truth[top == t] == t)) if named[t] else 0.0 for t in self.learned
            ]
            drops = [
                float(np.mean(before[sel] == truth[sel]) - np.mean(top[sel] == truth[sel]))
                for g in self.joined
                if (sel := (self.groups == g) & ~novel).any()
            ]
            outcomes.append(
                LearnOutcome(
                    bias_offset=float(offset),
                    recall=float(np.mean(recall)),
                    precision=float(np.mean(precision)),
                    base_top1=float(np.mean(top[~novel] == truth[~novel])),
                    base_top1_before=float(np.mean(before[~novel] == truth[~novel])),
                    worst_group_drop=max(drops, default=0.0),
                    claimed=int(
                        sum(named[t] for t in self.learned)
                        - sum(np.sum(top[truth == t] == t) for t in self.learned)
                    ),
                    self_recall=float(np.mean(self._top(rows, self.own) == self.own_truth)),
                )
            )
        return outcomes


def choose_example_offset(self_recall: Mapping[float, float]) -> float:
    """The most careful example-row offset at which at least SELF_RECALL of the learned photos
    themselves are answered as their taxon; the least careful one when none reaches it."""
    enough = [o for o, r in self_recall.items() if r >= SELF_RECALL]
    return min(enough) if enough else max(self_recall)


def _trained_bias(imprint: dict[str, Any]) -> float:
    """The trained rows' median bias (kept in the manifest once a calibrated bias replaces it)."""
    return float(imprint.get("trained_median_bias", imprint["bias"]))


def mean_outcomes(draws: Sequence[Sequence[LearnOutcome]]) -> list[LearnOutcome]:
    """Per bias offset, the draws' outcomes averaged (photos taken: summed)."""
    out = []
    for per_offset in zip(*draws, strict=True):
        assert len({o.bias_offset for o in per_offset}) == 1
        out.append(
            LearnOutcome(
                bias_offset=per_offset[0].bias_offset,
                recall=float(np.mean([o.recall for o in per_offset])),
                precision=float(np.mean([o.precision for o in per_offset])),
                base_top1=float(np.mean([o.base_top1 for o in per_offset])),
                base_top1_before=float(np.mean([o.base_top1_before for o in per_offset])),
                worst_group_drop=float(np.mean([o.worst_group_drop for o in per_offset])),
                claimed=sum(o.claimed for o in per_offset),
                self_recall=float(np.mean([o.self_recall for o in per_offset])),
            )
        )
    return out


def choose_bias(outcomes: Sequence[LearnOutcome]) -> LearnOutcome:
    """The most recall among the offsets whose worst broad-group loss is within
    MAX_GROUP_DROP; the most careful offset when none is."""
    within = [o for o in outcomes if o.worst_group_drop <= MAX_GROUP_DROP + 1e-9]
    if within:
        return max(within, key=lambda o: (o.recall, o.bias_offset))
    return min(outcomes, key=lambda o: o.bias_offset)


def pseudo_novel(model_set: ModelSet, examples: dict[str, np.ndarray], seed: int) -> list[str]:
    """Trained classes to hide and learn back: outside the specialist groups (their nets know
    every class of the group), with training photos to learn from, drawn seeded; every group
    keeps at least one trained class."""
    taxonomy = model_set.taxonomy
    candidates = sorted(
        c
        for c in taxonomy.class_ids
        if c in examples and taxonomy.broad_of(c) not in model_set.specialists
    )
    rng = np.random.default_rng(seed)
    left = Counter(str(taxonomy.broad_of(c)) for c in taxonomy.class_ids)
    hidden: list[str] = []
    for c in rng.permutation(candidates):
        group = str(taxonomy.broad_of(c))
        if left[group] > 1 and len(hidden) < PSEUDO_NOVEL:  # every group keeps a class
            hidden.append(str(c))
            left[group] -= 1
    return sorted(hidden)


# -- the whole stage -------------------------------------------------------------------------
def calibrate(
    models_dir: Path, model_repository: Path, data_dir: Path, seed: int | None = None
) -> dict[str, Any]:
    """Calibrates the model set in `models_dir` (its manifest is rewritten); returns the
    manifest's new `calibration`. The halves and the hidden classes are drawn with `seed`
    (default: the seed the set's validation split was drawn with)."""
    if seed is None:
        seed = int(json.loads((models_dir / "split.json").read_text()).get("seed", SEED))
    model_set = load_model_set(models_dir)
    manifest = json.loads((models_dir / MANIFEST).read_text())
    if "calibration" in manifest:  # calibrate the set as exported, not a calibrated one
        manifest = _uncalibrated(manifest)
        model_set = _with_manifest(model_set, manifest, models_dir)
    taxonomy = model_set.taxonomy
    ens = TinyEnsemble.load(model_set.tiny_path, taxonomy)
    nets = Nets(model_set, model_repository)
    photos, train_photos = load_photos(
        data_dir, models_dir, taxonomy.class_ids, SHOTS, model_set.image_size
    )
    y = np.asarray([taxonomy.class_ids.index(c) for c in photos.labels])
    out = nets.outputs(photos.images, "served outputs, validation")
    tree = Tree(taxonomy)
    parts = served_parts(model_set, ens, out)
    fit_idx, report_idx = halves(photos.labels, seed)
    fit_parts, report_parts = _subset(parts, fit_idx), _subset(parts, report_idx)
    power = fit_power(tree, fit_parts, y[fit_idx])
    curve = precision_curve(tree, fit_parts, power, y[fit_idx])
    threshold = threshold_for(curve, DEFAULT_MIN_PRECISION)
    before = calibration_figures(
        tree,
        report_parts,
        1.0,
        y[report_idx],
        threshold_for(precision_curve(tree, fit_parts, 1.0, y[fit_idx]), DEFAULT_MIN_PRECISION),
    )
    after = calibration_figures(tree, report_parts, power, y[report_idx], threshold)
    logger.info(
        "power %.2f: NLL %.3f -> %.3f, ECE (top suggestion) %.3f -> %.3f; default threshold "
        "%.2f: answer right %.1f%% at mean depth %.2f (reported half)",
        power,
        before["nll"],
        after["nll"],
        before["ece_top_suggestion"],
        after["ece_top_suggestion"],
        threshold,
        100 * after["answer_precision"],
        after["answer_mean_depth"],
    )
    draws = [pseudo_novel(model_set, train_photos, seed + d) for d in range(DRAWS)]
    worlds = []
    for d, hidden in enumerate(draws):
        own = np.concatenate([train_photos[h] for h in hidden])
        worlds.append(
            LearnBack(
                model_set,
                ens,
                out,
                photos.labels,
                nets.outputs(own, f"served outputs, learning photos {d + 1}/{DRAWS}"),
                {h: nets.learn_vectors(train_photos[h]) for h in hidden},
                hidden,
                f" {d + 1}/{DRAWS}",
            )
        )
    example_sweep = {
        o: float(np.mean([w.self_recall(o) for w in worlds]))
        for o in tqdm(EXAMPLE_OFFSETS, desc="learn-back: example rows", unit="bias")
    }
    example_offset = choose_example_offset(example_sweep)
    outcomes = mean_outcomes([w.sweep(example_offset, BIAS_OFFSETS) for w in worlds])
    chosen = choose_bias(outcomes)
    imprint = manifest["broad"]["imprint"]
    trained_bias = _trained_bias(imprint)
    manifest["broad"]["imprint"] = {
        **imprint,
        "trained_median_bias": trained_bias,
        "bias": trained_bias + chosen.bias_offset,
        "example_bias": trained_bias + example_offset,
    }
    calibration = {
        "power": power,
        "default_min_precision": DEFAULT_MIN_PRECISION,
        "default_threshold": threshold,
        "precision_curve": curve,
        "fitted_on": f"half of the validation split ({len(fit_idx)} photos, seed {seed})",
        "reported_on": f"the other half ({len(report_idx)} photos)",
        "before": before,
        "after": after,
        "imprint_bias": {
            "rule": (
                f"the most recall among bias offsets whose worst broad-group top-1 loss is <= "
                f"{MAX_GROUP_DROP:.0%} (mean of {DRAWS} draws of {PSEUDO_NOVEL} trained classes "
                f"hidden and learned back from {SHOTS} training photos each)"
            ),
            "hidden_classes": draws,
            "offset": chosen.bias_offset,
            "example_rule": (
                f"the most careful example-row offset at which >= {SELF_RECALL:.0%} of the "
                "learned photos themselves are answered as their taxon by their own rows"
            ),
            "example_offset": example_offset,
            "example_sweep": [{"offset": o, "self_recall": r} for o, r in example_sweep.items()],
            "sweep": [vars(o) for o in outcomes],
        },
    }
    manifest["calibration"] = calibration
    manifest["export_version"] = manifest.get("export_version", manifest["model_set_version"])
    manifest["model_set_version"] = calibrated_version(manifest)
    (models_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    write_report(models_dir / "report", manifest)
    return calibration


def write_report(report_dir: Path, manifest: dict[str, Any]) -> None:
    """The calibration's plots, and the model set's report rewritten with its section."""
    cal = manifest["calibration"]
    report_dir.mkdir(parents=True, exist_ok=True)
    report.reliability_png(
        report_dir / "reliability.png",
        cal["before"]["reliability_top_suggestion"],
        cal["after"]["reliability_top_suggestion"],
        cal["power"],
    )
    report.imprint_bias_png(
        report_dir / "imprint_bias.png", cal["imprint_bias"]["sweep"], cal["imprint_bias"]["offset"]
    )
    validation = manifest.get("metrics", {}).get("validation")
    if validation is not None:
        (report_dir / "README.md").write_text(
            report.markdown({**manifest, "validation": validation})
        )


def calibrated_version(manifest: dict[str, Any]) -> str:
    """The set's version once calibrated: the exported set's, and the arithmetic it adds."""
    arithmetic = {
        "power": manifest["calibration"]["power"],
        "default_threshold": manifest["calibration"]["default_threshold"],
        "imprint_bias": manifest["broad"]["imprint"]["bias"],
        "example_bias": manifest["broad"]["imprint"].get("example_bias"),
    }
    digest = hashlib.sha256(manifest["export_version"].encode())
    digest.update(json.dumps(arithmetic, sort_keys=True).encode())
    return "ms-" + digest.hexdigest()[:12]


def _uncalibrated(manifest: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in manifest.items() if k != "calibration"}
    imprint = dict(out["broad"]["imprint"])
    if "trained_median_bias" in imprint:
        imprint["bias"] = imprint.pop("trained_median_bias")
    imprint.pop("example_bias", None)
    out["broad"] = {**out["broad"], "imprint": imprint}
    out["model_set_version"] = out.pop("export_version", out["model_set_version"])
    return out


def _with_manifest(model_set: ModelSet, manifest: dict[str, Any], models_dir: Path) -> ModelSet:
    return dataclasses.replace(model_set, manifest={**manifest, "_dir": str(models_dir)})


def main(argv: Sequence[str] | None = None) -> int:
    from fieldlens.common.settings import REPO_ROOT
    from fieldlens.common.telemetry import configure_logging

    parser = argparse.ArgumentParser(
        prog="python -m fieldlens.trainer.calibrate", description=__doc__
    )
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "deploy" / "models")
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=REPO_ROOT / "deploy" / "triton" / "model_repository",
    )
    parser.add_argument("--data", type=Path, default=data_dir_from_env())
    parser.add_argument(
        "--seed", type=int, default=None, help="default: the validation split's seed"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    configure_logging()
    import os

    import torch

    from fieldlens.common.threads import set_cpu_threads

    set_cpu_threads(args.threads or os.cpu_count() or 1, source="--threads")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    calibration = calibrate(args.models_dir, args.model_repository, args.data, args.seed)
    after = calibration["after"]
    print(
        f"calibrated: power {calibration['power']:.2f}, default threshold "
        f"{calibration['default_threshold']:.2f} (answer right {after['answer_precision']:.1%} "
        f"at mean depth {after['answer_mean_depth']:.2f}), imprint bias offset "
        f"{calibration['imprint_bias']['offset']:+.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
