"""Hierarchical ensemble of per-node linear classifiers over the frozen embedding.

Every internal taxon at or below the broad level owns a softmax classifier over its children.
All of them live in one weight matrix (a row per child edge, rows of one node contiguous), so the
whole tree is evaluated with one matrix product, a segmented softmax and one multiply per depth
level. A node with a single child is a segment of one row: its softmax is exactly 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fieldlens.common.taxonomy import Taxonomy

logger = logging.getLogger(__name__)


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
        self.taxonomy = taxonomy
        self.layout = TreeLayout.from_taxonomy(taxonomy)
        n_rows = len(self.layout.row_taxon)
        if weights.shape[0] != n_rows or bias.shape != (n_rows,):
            raise ValueError(
                f"tiny weights {weights.shape} do not match the taxonomy's {n_rows} edges"
            )
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.embedding_version = embedding_version
        self.lr = lr
        self._row_of = {t: r for r, t in enumerate(self.layout.row_taxon)}
        self._seg_len = np.diff(np.append(self.layout.seg_start, n_rows))

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

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

    def scores_for(self, emb: np.ndarray, broad: str) -> list[tuple[str, float, bool]]:
        """(taxon id, P(taxon | broad), is_leaf) for every taxon under one broad group."""
        if broad not in self.taxonomy or self.taxonomy.get(broad).rank != "broad":
            raise KeyError(f"unknown broad group {broad!r}")
        probs = self.predict(emb)[0]
        rows = np.flatnonzero(self.layout.row_broad == broad)
        return [
            (
                str(self.layout.row_taxon[r]),
                float(probs[r]),
                not self.taxonomy.children(str(self.layout.row_taxon[r])),
            )
            for r in rows
        ]

    # -- training -----------------------------------------------------------------------------
    def path_rows(self, leaf: str) -> list[int]:
        """Rows on the path from the broad group down to `leaf`."""
        return [self._row_of[t] for t in self.taxonomy.path(leaf) if t in self._row_of]

    def partial_fit(self, emb: np.ndarray, leaves: list[str], steps: int = 1) -> None:
        """Online SGD on each sample's path nodes: softmax cross-entropy per node segment."""
        emb = np.atleast_2d(emb).astype(np.float32)
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

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            weights=self.weights.astype(np.float16),
            bias=self.bias,
            row_taxon=self.layout.row_taxon,
            taxonomy_version=np.asarray(self.taxonomy.version),
            embedding_version=np.asarray(self.embedding_version),
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
        return ens


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
    return ens
