"""Hierarchical ensemble of per-node linear classifiers over the frozen embedding.

Every internal taxon at or below the broad level owns a softmax classifier over its children.
All of them live in one weight matrix (a row per child edge, rows of one node contiguous), so the
whole tree is evaluated with one matrix product, a segmented softmax and one multiply per depth
level. A node with a single child is a segment of one row: its softmax is exactly 1.

Learn adds labelled examples online, new leaf taxa included: a new taxon's row is imprinted from
the mean of its examples (Qi et al. 2018, "Low-Shot Learning with Imprinted Weights") and SGD on
each example's path teaches its ancestors to route to it. Unlike the cosine classifier of that
paper, the trained rows here are discriminative: a softmax ignores what all children of a node
share, so a sibling row points from the node's centroid towards its class, not at the class mean.
The imprint is therefore taken from the parent's training centroid (kept by `fit`) to the new
taxon's mean; a raw mean would share the whole group's common direction and outscore every
sibling on the siblings' own images. Examples are applied one at a time, so the same examples in
the same order give the same weights however they were batched: replaying the knowledge journal
rebuilds exactly the state that was served.

SGD cannot be undone by subtraction, so Forget rebuilds instead: the trained ensemble plus the
examples still learned, in journal order (`replayed`), which is exactly the ensemble that never
learned the forgotten ones.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldlens.common.errors import InvalidInput
from fieldlens.common.knowledge import LearnedExample, NewTaxonSpec
from fieldlens.common.taxonomy import LEARNED_PREFIX, Taxonomy

logger = logging.getLogger(__name__)

# SGD steps per learned example on its path (each at the ensemble's `lr`).
LEARN_STEPS = 5
# Imprint scale when a new taxon's siblings carry no usable norm (e.g. the only child of a node,
# whose softmax was always 1 and so never trained) and no other row has one either.
DEFAULT_IMPRINT_SCALE = 1.0
# Without the parent's centroid (an ensemble saved before centroids were kept), a learned row's
# bias is set so that it beats the best sibling on its own examples by this many logits on
# average: enough to win there, little enough to leave the siblings their own images.
UNCENTRED_MARGIN = 1.0
_TINY_NORM = 1e-6


@dataclass(frozen=True)
class GroupSlice:
    """One broad group's rows (contiguous in the layout), with indices relative to `start`."""

    start: int
    stop: int
    seg_start: np.ndarray
    seg_len: np.ndarray
    parent_row: np.ndarray  # -1 for rows directly under the broad group
    levels: tuple[np.ndarray, ...]
    taxa: tuple[str, ...]
    leaf: tuple[bool, ...]
    leaf_rows: np.ndarray  # indices (relative to `start`) of the leaves, in row order
    node_rows: np.ndarray  # and of the internal nodes
    # (rows, rows) 0/1: [l, x] = 1 when row l is a leaf at or below row x (sums over leaves).
    leaves_below: np.ndarray


@dataclass(frozen=True)
class TreeLayout:
    """Index arrays describing the rows of the weight matrix."""

    row_taxon: np.ndarray  # taxon id of the child each row scores
    row_node: np.ndarray  # index into `nodes` of the row's parent
    nodes: np.ndarray  # internal taxon ids in row-segment order
    seg_start: np.ndarray  # first row of each node's segment
    row_parent_row: np.ndarray  # row whose taxon is this row's parent, -1 under a broad group
    levels: tuple[np.ndarray, ...]  # rows grouped by depth below the broad group, top first
    row_broad: np.ndarray  # broad group id of each row

    @classmethod
    def from_taxonomy(cls, taxonomy: Taxonomy) -> TreeLayout:
        nodes: list[str] = []
        for broad in taxonomy.broad_ids:
            for t in [broad, *taxonomy.under(broad)]:
                if taxonomy.children(t):
                    nodes.append(t)
        row_taxon, row_node, seg_start = [], [], []
        for i, n in enumerate(nodes):
            seg_start.append(len(row_taxon))
            for child in taxonomy.children(n):
                row_taxon.append(child)
                row_node.append(i)
        row_of = {t: r for r, t in enumerate(row_taxon)}
        parent_row = [row_of.get(nodes[n], -1) for n in row_node]
        depth = np.zeros(len(row_taxon), dtype=np.int64)
        for r, p in enumerate(parent_row):
            d, q = 0, p
            while q != -1:
                d, q = d + 1, parent_row[q]
            depth[r] = d
        levels = tuple(np.flatnonzero(depth == d) for d in range(int(depth.max()) + 1))
        return cls(
            row_taxon=np.asarray(row_taxon),
            row_node=np.asarray(row_node, dtype=np.int64),
            nodes=np.asarray(nodes),
            seg_start=np.asarray(seg_start, dtype=np.int64),
            row_parent_row=np.asarray(parent_row, dtype=np.int64),
            levels=levels,
            row_broad=np.asarray([taxonomy.broad_of(t) for t in row_taxon]),
        )


class TinyEnsemble:
    """Scores every taxon below a broad group: P(taxon | broad group), for a batch of embeddings."""

    def __init__(
        self,
        taxonomy: Taxonomy,
        weights: np.ndarray,
        bias: np.ndarray,
        embedding_version: str,
        lr: float = 0.05,
    ) -> None:
        layout = TreeLayout.from_taxonomy(taxonomy)
        n_rows = len(layout.row_taxon)
        if weights.shape[0] != n_rows or bias.shape != (n_rows,):
            raise ValueError(
                f"tiny weights {weights.shape} do not match the taxonomy's {n_rows} edges"
            )
        self._set_layout(
            taxonomy,
            layout,
            np.ascontiguousarray(weights, dtype=np.float32),
            np.ascontiguousarray(bias, dtype=np.float32),
        )
        self.embedding_version = embedding_version
        self.lr = lr
        # Taxa created by Learn, in creation order.
        self.learned_taxa: dict[str, NewTaxonSpec] = {}
        # Latest label of every learned example id (a relabel replaces it).
        self._labels: dict[str, str] = {}
        # Every (example id, taxon id) ever applied: re-sending history is a no-op.
        self._applied: set[tuple[str, str]] = set()
        self._imprints: dict[str, _Imprint] = {}
        # Mean training embedding under each internal taxon (see `fit`); empty when unknown.
        self.centroids: dict[str, np.ndarray] = {}
        # Nodes trained with a single child: a softmax of one is constant, so that child's row
        # never learnt anything and its norm says nothing about a scale.
        self._untrained_nodes = frozenset(
            str(n) for n, k in zip(layout.nodes, self._seg_len, strict=True) if k == 1
        )
        # True when a learned taxon's probability comes from elsewhere (the router puts it in
        # the broad net's fine softmax, see the manifest's "imprint"): its row then takes no
        # probability from its trained siblings here, it is not scored, and its examples do
        # not nudge trained rows by SGD. The trained classes answer as if it did not exist.
        self.learned_scored_upstream = False

    def _set_layout(
        self, taxonomy: Taxonomy, layout: TreeLayout, weights: np.ndarray, bias: np.ndarray
    ) -> None:
        self.taxonomy = taxonomy
        self.layout = layout
        self.weights = weights
        self.bias = bias
        self._row_of = {str(t): r for r, t in enumerate(layout.row_taxon)}
        self._seg_len = np.diff(np.append(layout.seg_start, len(layout.row_taxon)))
        self._groups = _group_slices(taxonomy, layout, self._seg_len)

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    @property
    def learned_examples(self) -> int:
        """Distinct example ids learned online (a relabelled example counts once)."""
        return len(self._labels)

    def label_of(self, example_id: str) -> str | None:
        """The taxon a learned example is labelled with now; None if it was never learned."""
        return self._labels.get(example_id)

    def examples_of(self, taxon_id: str) -> list[str]:
        """Ids of the learned examples labelled `taxon_id` now, in learning order."""
        return [i for i, t in self._labels.items() if t == taxon_id]

    def copy(self) -> TinyEnsemble:
        """An independent copy: learning on it leaves this one (and readers of it) untouched."""
        out = copy.copy(self)  # the layout and taxonomy are immutable and shared
        out.weights = self.weights.copy()
        out.bias = self.bias.copy()
        out.learned_taxa = dict(self.learned_taxa)
        out._labels = dict(self._labels)
        out._applied = set(self._applied)
        out._imprints = {t: i.copy() for t, i in self._imprints.items()}
        return out

    def with_taxonomy(self, taxonomy: Taxonomy) -> TinyEnsemble:
        """A copy laid out for `taxonomy` (e.g. one extended by `Taxonomy.with_learned`).

        Rows are matched by taxon id: a taxon in both keeps its weights and bias, a new one starts
        at zero, and a row whose taxon is gone is dropped.
        """
        out = self.copy()
        out._relayout(taxonomy)
        return out

    def _relayout(self, taxonomy: Taxonomy) -> None:
        layout = TreeLayout.from_taxonomy(taxonomy)
        n_rows = len(layout.row_taxon)
        weights = np.zeros((n_rows, self.dim), np.float32)
        bias = np.zeros(n_rows, np.float32)
        new_rows, old_rows = [], []
        for r, t in enumerate(layout.row_taxon):
            old = self._row_of.get(str(t))
            if old is not None:
                new_rows.append(r)
                old_rows.append(old)
        weights[new_rows] = self.weights[old_rows]
        bias[new_rows] = self.bias[old_rows]
        self._set_layout(taxonomy, layout, weights, bias)

    # -- inference ----------------------------------------------------------------------------
    def conditional(self, emb: np.ndarray) -> np.ndarray:
        """P(child | parent) for every row: a segmented softmax over one matrix product."""
        logits = emb.astype(np.float32, copy=False) @ self.weights.T + self.bias
        seg = self.layout.seg_start
        mx = np.maximum.reduceat(logits, seg, axis=1)
        e = np.exp(logits - np.repeat(mx, self._seg_len, axis=1))
        return e / np.repeat(np.add.reduceat(e, seg, axis=1), self._seg_len, axis=1)

    def predict(self, emb: np.ndarray) -> np.ndarray:
        """P(taxon | its broad group) for every row's taxon, shape (batch, rows)."""
        cond = self.conditional(np.atleast_2d(emb))
        out = np.empty_like(cond)
        top = self.layout.levels[0]
        out[:, top] = cond[:, top]
        for rows in self.layout.levels[1:]:
            out[:, rows] = cond[:, rows] * out[:, self.layout.row_parent_row[rows]]
        return out

    def predict_group(self, emb: np.ndarray, broad: str) -> np.ndarray:
        """P(taxon | broad) for the rows of one group only, shape (batch, group rows): the cost
        follows the group's size, not the whole tree's."""
        g = self._groups[broad]
        x = np.atleast_2d(emb).astype(np.float32, copy=False)
        logits = x @ self.weights[g.start : g.stop].T + self.bias[g.start : g.stop]
        if self.learned_scored_upstream and self._imprints:
            learned = self._learned_rows(g)
            if len(learned):
                logits[:, learned] = -np.inf
        mx = np.maximum.reduceat(logits, g.seg_start, axis=1)
        e = np.exp(logits - np.repeat(mx, g.seg_len, axis=1))
        cond = e / np.repeat(np.add.reduceat(e, g.seg_start, axis=1), g.seg_len, axis=1)
        out = np.empty_like(cond)
        out[:, g.levels[0]] = cond[:, g.levels[0]]
        for rows in g.levels[1:]:
            out[:, rows] = cond[:, rows] * out[:, g.parent_row[rows]]
        return out

    def _learned_rows(self, g: GroupSlice) -> np.ndarray:
        """Rows of a group (relative to its start) that score learned taxa."""
        return np.asarray(
            sorted(
                r - g.start for t in self._imprints if g.start <= (r := self._row_of[t]) < g.stop
            ),
            dtype=np.int64,
        )

    def group_scores(self, emb: np.ndarray, broad: str) -> list[tuple[str, float, bool]]:
        """`scores_for` of one image, evaluating only that group's classifiers."""
        if broad not in self._groups:
            raise KeyError(f"unknown broad group {broad!r}")
        g = self._groups[broad]
        probs = self.predict_group(emb, broad)[0]
        return [(t, float(p), leaf) for t, p, leaf in zip(g.taxa, probs, g.leaf, strict=True)]

    def scores_for(self, emb: np.ndarray, broad: str) -> list[tuple[str, float, bool]]:
        """(taxon id, P(taxon | broad), is_leaf) for every taxon under one broad group."""
        if broad not in self.taxonomy or self.taxonomy.get(broad).rank != "broad":
            raise KeyError(f"unknown broad group {broad!r}")
        return self.group_scores(emb, broad)

    def group_top(
        self,
        emb: np.ndarray,
        broad: str,
        top_k: int,
        floors: Sequence[float],
        power: float = 1.0,
    ) -> list[tuple[list[tuple[str, float, bool, float]], float]]:
        """For each row of `emb` (several images, one matrix product): the `top_k` most
        probable leaves under `broad` (0: all) and the internal nodes that reach the row's
        floor, as (taxon id, probability, is_leaf, tempered), best first (ties keep the
        layout's order, internal nodes before leaves), with the group's tempered total.

        Tempered (calibration, router/merge.py): the sum of P(leaf | broad)^power over the
        leaves at or below a taxon; the total over all the group's leaves. With power 1 they
        are not computed (0.0) and the floor applies to P(node | broad); otherwise it applies
        to a node's share of the tempered total.
        """
        if broad not in self._groups:
            raise KeyError(f"unknown broad group {broad!r}")
        g = self._groups[broad]
        probs = self.predict_group(emb, broad)
        leaf_rows = g.leaf_rows
        if self.learned_scored_upstream and self._imprints:
            leaf_rows = np.setdiff1d(leaf_rows, self._learned_rows(g), assume_unique=True)
        tempered = totals = None
        if power != 1.0:
            powered = np.zeros(probs.shape, dtype=np.float64)
            powered[:, leaf_rows] = probs[:, leaf_rows].astype(np.float64) ** power
            tempered = powered @ g.leaves_below
            totals = powered.sum(axis=1)
        out = []
        for i, (p, floor) in enumerate(zip(probs, floors, strict=True)):
            leaves = leaf_rows
            if 0 < top_k < len(leaves):
                leaves = np.sort(leaves[np.argsort(-p[leaves], kind="stable")[:top_k]])
            if tempered is None:
                nodes = g.node_rows[p[g.node_rows] >= floor]
                q, total = np.zeros(len(p)), 0.0
            else:
                q, total = tempered[i], float(totals[i])  # type: ignore[index]
                nodes = g.node_rows[q[g.node_rows] >= floor * total]
            rows = np.concatenate([nodes, leaves])
            rows = rows[np.argsort(-p[rows], kind="stable")]
            out.append(
                ([(g.taxa[r], float(p[r]), g.leaf[r], float(q[r])) for r in rows.tolist()], total)
            )
        return out

    # -- training -----------------------------------------------------------------------------
    def path_rows(self, leaf: str) -> list[int]:
        """Rows on the path from the broad group down to `leaf`."""
        return [self._row_of[t] for t in self.taxonomy.path(leaf) if t in self._row_of]

    def partial_fit(self, emb: np.ndarray, leaves: list[str], steps: int = 1) -> None:
        """Online SGD on each sample's path nodes: softmax cross-entropy per node segment."""
        emb = np.atleast_2d(emb).astype(np.float32)
        groups = {self.taxonomy.broad_of(leaf) for leaf in leaves}
        if len(groups) == 1 and (group := self._groups.get(groups.pop() or "")) is not None:
            self._partial_fit_group(emb, leaves, steps, group)
            return
        for _ in range(steps):
            cond = self.conditional(emb)
            grad_logits = np.zeros_like(cond)
            for i, leaf in enumerate(leaves):
                for r in self.path_rows(leaf):
                    node = self.layout.row_node[r]
                    s = self.layout.seg_start[node]
                    seg = slice(s, s + self._seg_len[node])
                    grad_logits[i, seg] += cond[i, seg]
                    grad_logits[i, r] -= 1.0
            self.weights -= self.lr * grad_logits.T @ emb / len(leaves)
            self.bias -= self.lr * grad_logits.sum(0) / len(leaves)

    def _partial_fit_group(
        self, emb: np.ndarray, leaves: list[str], steps: int, g: GroupSlice
    ) -> None:
        """`partial_fit` of samples of one broad group: only segments on their paths have a
        gradient, and they all lie in the group's rows, so only those are evaluated and
        updated (Learn, and the rebuild after a Forget, cost a group's rows, not the tree's)."""
        weights, bias = self.weights[g.start : g.stop], self.bias[g.start : g.stop]
        node_of = np.repeat(np.arange(len(g.seg_start)), g.seg_len)
        paths = [[r - g.start for r in self.path_rows(leaf)] for leaf in leaves]
        for _ in range(steps):
            logits = emb @ weights.T + bias
            mx = np.maximum.reduceat(logits, g.seg_start, axis=1)
            e = np.exp(logits - np.repeat(mx, g.seg_len, axis=1))
            cond = e / np.repeat(np.add.reduceat(e, g.seg_start, axis=1), g.seg_len, axis=1)
            grad_logits = np.zeros_like(cond)
            for i, rows in enumerate(paths):
                for r in rows:
                    s = g.seg_start[node_of[r]]
                    seg = slice(s, s + g.seg_len[node_of[r]])
                    grad_logits[i, seg] += cond[i, seg]
                    grad_logits[i, r] -= 1.0
            weights -= self.lr * grad_logits.T @ emb / len(leaves)  # views: updates in place
            bias -= self.lr * grad_logits.sum(0) / len(leaves)

    # -- online learning ----------------------------------------------------------------------
    def triage(self, examples: Sequence[LearnedExample]) -> tuple[list[LearnedExample], int]:
        """Checks a batch against the current state without changing it.

        Returns the examples to apply (in order) and how many are duplicates: an example id
        already applied, or earlier in the batch, with the same taxon. The same id with a taxon
        it never had is a relabel and is applied. Going back to a label the id had before is a
        duplicate too, so that a client re-sending its whole history (relabels included)
        changes nothing. Raises InvalidInput naming the first bad example.
        """
        taxonomy = self.taxonomy
        seen: set[tuple[str, str]] = set()
        fresh: list[LearnedExample] = []
        duplicates = 0
        for ex in examples:
            taxonomy = _check_example(ex, taxonomy, self.dim)
            key = (ex.id, ex.taxon_id)
            if key in self._applied or key in seen:
                duplicates += 1
                continue
            seen.add(key)
            fresh.append(ex)
        return fresh, duplicates

    def learn(self, examples: Iterable[LearnedExample], steps: int = LEARN_STEPS) -> None:
        """Applies examples in order, one at a time, in place; see the module docstring.

        Every example is applied, duplicates included: `triage` decides what to apply, and the
        journal holds exactly what was applied, so replaying it reproduces the same weights.
        """
        for ex in examples:
            self._learn_one(ex, steps)

    def _learn_one(self, ex: LearnedExample, steps: int) -> None:
        taxonomy = _check_example(ex, self.taxonomy, self.dim)
        if taxonomy is not self.taxonomy:
            assert ex.new_taxon is not None
            self._relayout(taxonomy)
            self.learned_taxa[ex.new_taxon.id] = ex.new_taxon
            self._imprints[ex.new_taxon.id] = _Imprint(np.zeros(self.dim))
        vec = np.asarray(ex.vector, dtype=np.float32)
        touched: set[str] = set()
        previous = self._imprints.get(self._labels.get(ex.id, ""))
        if previous is not None and previous.remove(ex.id):
            touched.add(self._labels[ex.id])
        self._labels[ex.id] = ex.taxon_id
        self._applied.add((ex.id, ex.taxon_id))
        imprint = self._imprints.get(ex.taxon_id)
        if imprint is not None:
            imprint.add(ex.id, vec)
            self._imprint(ex.taxon_id)
            if self.learned_scored_upstream:
                return  # its row scores nothing here; SGD would only move trained rows
        self.partial_fit(vec[None], [ex.taxon_id], steps=steps)
        # SGD moved every row in the path's segments, learned rows among them: put their
        # imprints back so a few SGD steps cannot erode what the examples' mean says.
        for r in self.path_rows(ex.taxon_id):
            node = self.layout.row_node[r]
            start = self.layout.seg_start[node]
            for q in range(start, start + self._seg_len[node]):
                touched.add(str(self.layout.row_taxon[q]))
        for t in sorted(touched & self._imprints.keys(), key=self._row_of.__getitem__):
            self._imprint(t)

    def _imprint(self, taxon: str) -> None:
        """Row = s * unit(mean of the taxon's examples - parent centroid), s = median sibling norm.

        The bias is the median sibling bias; without a centroid, see UNCENTRED_MARGIN.
        """
        imprint = self._imprints[taxon]
        if not imprint.vectors:
            return  # every example was relabelled away: keep the row as it last was
        r = self._row_of[taxon]
        node = self.layout.row_node[r]
        centre = self.centroids.get(str(self.layout.nodes[node]))
        direction = imprint.total / len(imprint.vectors)
        if centre is not None:
            direction = direction - centre
        norm = float(np.linalg.norm(direction))
        if norm < _TINY_NORM:
            return
        start = self.layout.seg_start[node]
        others = [q for q in range(start, start + self._seg_len[node]) if q != r]
        # Other learned rows are imprints themselves: trained siblings set the scale if any.
        siblings = [q for q in others if str(self.layout.row_taxon[q]) not in self._imprints]
        siblings = siblings or others
        scale = float(np.median(np.linalg.norm(self.weights[siblings], axis=1))) if siblings else 0
        if scale < _TINY_NORM or str(self.layout.nodes[node]) in self._untrained_nodes:
            scale = self._default_scale()
        row = (direction * (scale / norm)).astype(np.float32)
        if centre is not None or not others:
            bias = float(np.median(self.bias[siblings])) if siblings else 0.0
        else:
            x = np.stack(list(imprint.vectors.values()))
            best_other = (x @ self.weights[others].T + self.bias[others]).max(axis=1)
            bias = float(np.mean(best_other) - np.mean(x @ row) + UNCENTRED_MARGIN)
        self.weights[r] = row
        self.bias[r] = bias

    def _default_scale(self) -> float:
        """Median norm of the rows that were trained."""
        norms = np.linalg.norm(self.weights, axis=1)
        # Vectorised: it runs for every imprint under an untrained node, and a Python loop over
        # every row took most of a journal replay's time. The same rows, the same median.
        usable = norms >= _TINY_NORM
        usable[[self._row_of[t] for t in self._imprints]] = False
        usable &= ~np.isin(self.layout.nodes[self.layout.row_node], list(self._untrained_nodes))
        values = norms[usable].astype(np.float64)
        return float(np.median(values)) if len(values) else DEFAULT_IMPRINT_SCALE

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Writes the trained model; what Learn added lives in the knowledge journal instead."""
        np.savez_compressed(
            path,
            weights=self.weights.astype(np.float16),
            bias=self.bias,
            row_taxon=self.layout.row_taxon,
            taxonomy_version=np.asarray(self.taxonomy.version),
            embedding_version=np.asarray(self.embedding_version),
            centroid_nodes=np.asarray(list(self.centroids), dtype=str),
            centroids=np.asarray(list(self.centroids.values()), dtype=np.float32).reshape(
                len(self.centroids), self.dim
            ),
        )

    @classmethod
    def load(cls, path: Path, taxonomy: Taxonomy) -> TinyEnsemble:
        z = np.load(path, allow_pickle=False)
        if str(z["taxonomy_version"]) != taxonomy.version:
            raise ValueError(
                f"{path} was trained for taxonomy {z['taxonomy_version']}, not {taxonomy.version}"
            )
        ens = cls(taxonomy, z["weights"].astype(np.float32), z["bias"], str(z["embedding_version"]))
        if list(ens.layout.row_taxon) != list(z["row_taxon"]):
            raise ValueError(f"{path}: row order differs from the taxonomy's layout")
        if "centroids" in z.files:
            ens.centroids = {
                str(n): c for n, c in zip(z["centroid_nodes"], z["centroids"], strict=True)
            }
        if not ens.centroids:
            logger.warning(
                "%s has no node centroids (saved before Learn existed): new taxa will be "
                "imprinted uncentred, which serves their siblings worse; retrain to fix",
                path,
            )
        return ens


def replayed(base: TinyEnsemble, examples: Iterable[LearnedExample]) -> TinyEnsemble:
    """A copy of `base` (the trained ensemble) that learned `examples` in order: at start the
    journal's examples, after a Forget the ones still learned."""
    out = base.copy()
    out.learn(examples)
    return out


@dataclass
class _Imprint:
    """Running sum of one learned taxon's example embeddings.

    The vectors are kept by example id so that a relabel can take one back out of the sum.
    """

    total: np.ndarray  # float64
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    def copy(self) -> _Imprint:
        return _Imprint(self.total.copy(), dict(self.vectors))

    def add(self, example_id: str, vec: np.ndarray) -> None:
        self.remove(example_id)
        self.vectors[example_id] = vec
        self.total = self.total + vec

    def remove(self, example_id: str) -> bool:
        vec = self.vectors.pop(example_id, None)
        if vec is None:
            return False
        self.total = self.total - vec
        return True


def _check_example(ex: LearnedExample, taxonomy: Taxonomy, dim: int) -> Taxonomy:
    """Raises InvalidInput unless `ex` can be learned; returns `taxonomy` with its new taxon."""
    if not ex.id:
        raise InvalidInput("a learned example has no id")
    if ex.vector.shape != (dim,):
        raise InvalidInput(
            f"example {ex.id}: embedding has {ex.vector.size} values; expected {dim}"
        )
    if not np.all(np.isfinite(ex.vector)):
        raise InvalidInput(f"example {ex.id}: embedding contains NaN or infinity")
    nt = ex.new_taxon
    if nt is not None:
        if nt.id != ex.taxon_id:
            raise InvalidInput(
                f"example {ex.id}: new_taxon.id {nt.id!r} is not its taxon_id {ex.taxon_id!r}"
            )
        if nt.id in taxonomy:
            parent = taxonomy.get(nt.id).parent
            if parent != nt.parent:
                raise InvalidInput(
                    f"example {ex.id}: taxon {nt.id!r} already exists under {parent!r}, "
                    f"not under {nt.parent!r}"
                )
        else:
            if not nt.id.startswith(LEARNED_PREFIX) or nt.id == LEARNED_PREFIX:
                raise InvalidInput(
                    f"example {ex.id}: a new taxon's id must start with {LEARNED_PREFIX!r} "
                    f"(got {nt.id!r})"
                )
            if not nt.name.strip():
                raise InvalidInput(f"example {ex.id}: new taxon {nt.id!r} has no name")
            try:
                taxonomy = taxonomy.with_learned([(nt.id, nt.name, nt.parent)])
            except ValueError as e:
                raise InvalidInput(f"example {ex.id}: cannot create {nt.id!r}: {e}") from None
    if ex.taxon_id not in taxonomy:
        raise InvalidInput(
            f"example {ex.id}: unknown taxon {ex.taxon_id!r} (set new_taxon to create one)"
        )
    if taxonomy.children(ex.taxon_id) or taxonomy.broad_of(ex.taxon_id) is None:
        raise InvalidInput(
            f"example {ex.id}: {ex.taxon_id!r} is not a leaf below a broad group; "
            "label examples with a class"
        )
    return taxonomy


def _group_slices(
    taxonomy: Taxonomy, layout: TreeLayout, seg_len: np.ndarray
) -> dict[str, GroupSlice]:
    out: dict[str, GroupSlice] = {}
    row_broad = layout.row_broad
    for broad in taxonomy.broad_ids:
        rows = np.flatnonzero(row_broad == broad)
        if not len(rows):
            continue
        start, stop = int(rows[0]), int(rows[-1]) + 1
        if stop - start != len(rows):
            raise ValueError(f"rows of {broad} are not contiguous in the layout")
        nodes = np.flatnonzero((layout.seg_start >= start) & (layout.seg_start < stop))
        parent = layout.row_parent_row[start:stop]
        rel_parent = np.where(parent >= 0, parent - start, -1)
        depth = np.zeros(stop - start, dtype=np.int64)
        for r in range(stop - start):  # parents come before children within a group
            depth[r] = 0 if rel_parent[r] < 0 else depth[rel_parent[r]] + 1
        taxa = tuple(str(t) for t in layout.row_taxon[start:stop])
        leaf = tuple(not taxonomy.children(t) for t in taxa)
        out[broad] = GroupSlice(
            start=start,
            stop=stop,
            seg_start=layout.seg_start[nodes] - start,
            seg_len=seg_len[nodes],
            parent_row=rel_parent,
            levels=tuple(np.flatnonzero(depth == d) for d in range(int(depth.max()) + 1)),
            taxa=taxa,
            leaf=leaf,
            leaf_rows=np.flatnonzero(np.asarray(leaf, dtype=bool)),
            node_rows=np.flatnonzero(~np.asarray(leaf, dtype=bool)),
            leaves_below=_leaves_below(rel_parent, leaf),
        )
    return out


def _leaves_below(parent_row: np.ndarray, leaf: Sequence[bool]) -> np.ndarray:
    """[l, x] = 1 when row l is a leaf and x is l or one of its ancestors (rows of one group)."""
    n = len(leaf)
    out = np.zeros((n, n), dtype=np.float64)
    for r in range(n):
        if leaf[r]:
            q = r
            while q >= 0:
                out[r, q] = 1.0
                q = int(parent_row[q])
    return out


def fit(
    taxonomy: Taxonomy,
    emb: np.ndarray,
    leaves: np.ndarray,
    embedding_version: str,
    epochs: int = 60,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> TinyEnsemble:
    """Fits every node's classifier jointly: full-batch Adam on the summed path cross-entropy."""
    import torch

    layout = TreeLayout.from_taxonomy(taxonomy)
    ens = TinyEnsemble(
        taxonomy,
        np.zeros((len(layout.row_taxon), emb.shape[1]), np.float32),
        np.zeros(len(layout.row_taxon), np.float32),
        embedding_version,
    )
    # Each sample contributes one target per node on its path: (sample, node, target row).
    samples, nodes, targets = [], [], []
    path_cache: dict[str, list[int]] = {}
    for i, leaf in enumerate(leaves):
        rows = path_cache.setdefault(str(leaf), ens.path_rows(str(leaf)))
        for r in rows:
            samples.append(i)
            nodes.append(int(layout.row_node[r]))
            targets.append(r)
    torch.manual_seed(seed)
    x = torch.from_numpy(emb.astype(np.float32))
    s_idx = torch.tensor(samples)
    t_idx = torch.tensor(targets)
    node_of_row = torch.from_numpy(layout.row_node)
    n_idx = torch.tensor(nodes)
    w = torch.zeros(len(layout.row_taxon), emb.shape[1], requires_grad=True)
    b = torch.zeros(len(layout.row_taxon), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05, weight_decay=weight_decay)
    n_nodes = len(layout.nodes)
    for _ in range(epochs):
        logits = x @ w.T + b  # (N, rows)
        # log-sum-exp per (sample, node) segment via scatter into a (N, nodes) table
        mx = torch.full((len(x), n_nodes), -1e9).scatter_reduce(
            1, node_of_row.expand(len(x), -1), logits.detach(), reduce="amax"
        )
        z = torch.exp(logits - mx[:, node_of_row])
        denom = torch.zeros(len(x), n_nodes).scatter_add(1, node_of_row.expand(len(x), -1), z)
        log_norm = torch.log(denom) + mx
        loss = (log_norm[s_idx, n_idx] - logits[s_idx, t_idx]).sum() / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ens.weights = w.detach().numpy().astype(np.float32)
    ens.bias = b.detach().numpy().astype(np.float32)
    ens.centroids = _node_centroids(taxonomy, layout, emb, leaves)
    return ens


def _node_centroids(
    taxonomy: Taxonomy, layout: TreeLayout, emb: np.ndarray, leaves: np.ndarray
) -> dict[str, np.ndarray]:
    """Mean training embedding under every internal taxon (imprinting centres on it)."""
    leaf_ids, inverse = np.unique(np.asarray(leaves).astype(str), return_inverse=True)
    sums = np.zeros((len(leaf_ids), emb.shape[1]), np.float64)
    np.add.at(sums, inverse, emb.astype(np.float64))
    counts = np.bincount(inverse, minlength=len(leaf_ids))
    index = {str(leaf): i for i, leaf in enumerate(leaf_ids)}
    out: dict[str, np.ndarray] = {}
    for node in map(str, layout.nodes):
        rows = [index[leaf] for leaf in taxonomy.leaves_under(node) if leaf in index]
        n = int(counts[rows].sum())
        if n:
            out[node] = (sums[rows].sum(axis=0) / n).astype(np.float32)
    return out
