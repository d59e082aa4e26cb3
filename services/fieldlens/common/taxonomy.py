"""The taxonomy tree (root > domain > broad group > WordNet nodes > class): one source of truth."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

ROOT = "root"
RANKS = ("root", "domain", "broad", "node", "class")


class _ClassLike(Protocol):
    wnid: str
    name: str
    broad: str
    domain: str
    wordnet_path: tuple[str, ...]


@dataclass(frozen=True)
class Taxon:
    """One node. Class ids are WordNet ids; others are `domain/x`, `broad/x`, `node/x/y`."""

    id: str
    name: str
    rank: str
    parent: str | None
    depth: int


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class Taxonomy:
    """Immutable tree with ordered broad groups (the broad net's outputs) and classes.

    Learned taxa that Forget removed are kept aside as retired: they are no longer in the tree
    (`in`, iteration, children, class ids), but `get`, `path` and `broad_of` still know them,
    so an answer computed just before the Forget can still be rendered.
    """

    def __init__(
        self,
        taxa: Iterable[Taxon],
        broad_order: Sequence[str],
        class_order: Sequence[str],
        retired: Iterable[Taxon] = (),
    ) -> None:
        self._taxa = {t.id: t for t in taxa}
        self._children: dict[str, list[str]] = {t: [] for t in self._taxa}
        for t in self._taxa.values():
            if t.parent is not None:
                if t.parent not in self._taxa:
                    raise ValueError(f"taxon {t.id} has unknown parent {t.parent}")
                self._children[t.parent].append(t.id)
        self.broad_ids: tuple[str, ...] = tuple(broad_order)
        self.class_ids: tuple[str, ...] = tuple(class_order)
        for b in self.broad_ids:
            if self._taxa[b].rank != "broad":
                raise ValueError(f"{b} is not a broad group")
        self._retired = {t.id: t for t in retired if t.id not in self._taxa}
        for t in self._retired.values():
            if t.parent not in self._taxa:
                raise ValueError(f"retired taxon {t.id} has unknown parent {t.parent}")
        # Look-ups by id (get, path) also find retired taxa.
        self._all = {**self._taxa, **self._retired} if self._retired else self._taxa
        # Root-to-taxon paths, computed once: every answer walks several of them.
        self._paths: dict[str, tuple[str, ...]] = {}
        for tid in self._all:
            self._paths[tid] = self._walk(tid)
        self._broad_of = {tid: self._find_broad(tid) for tid in self._all}
        self._leaf_counts: dict[str, int] = {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_classes(cls, classes: Sequence[_ClassLike]) -> Taxonomy:
        """Builds the tree from WordNet chains, collapsing single-child intermediate nodes."""
        parent: dict[str, str] = {}
        info: dict[str, tuple[str, str]] = {ROOT: ("life and things", "root")}
        by_group: dict[str, list[_ClassLike]] = {}
        for c in classes:
            by_group.setdefault(c.broad, []).append(c)
        for group, members in sorted(by_group.items()):
            domain = f"domain/{members[0].domain}"
            info.setdefault(domain, (members[0].domain, "domain"))
            parent[domain] = ROOT
            broad = f"broad/{group}"
            info[broad] = (group.replace("_", " "), "broad")
            parent[broad] = domain
            # Nodes below the group's lowest common WordNet ancestor, keyed by their full prefix
            # so that equal names on different branches stay distinct.
            common = _common_prefix_len([m.wordnet_path for m in members])
            node_ids: dict[tuple[str, ...], str] = {}
            for m in members:
                up = broad
                for j in range(common, len(m.wordnet_path) - 1):
                    key = m.wordnet_path[: j + 1]
                    if key not in node_ids:
                        base = f"node/{group}/{_slug(key[-1])}"
                        nid, k = base, 2
                        while nid in info:
                            nid, k = f"{base}_{k}", k + 1
                        node_ids[key] = nid
                        info[nid] = (key[-1], "node")
                        parent[nid] = up
                    up = node_ids[key]
                info[m.wnid] = (m.name, "class")
                parent[m.wnid] = up
        _collapse_single_children(parent, info)
        depth: dict[str, int] = {ROOT: 0}

        def depth_of(t: str) -> int:
            if t not in depth:
                depth[t] = depth_of(parent[t]) + 1
            return depth[t]

        taxa = [Taxon(t, info[t][0], info[t][1], parent.get(t), depth_of(t)) for t in info]
        broad_order = sorted(t for t in info if info[t][1] == "broad")
        class_order = [c.wnid for c in classes]
        return cls(taxa, broad_order, class_order)

    def with_learned(self, taxa: Iterable[tuple[str, str, str]]) -> Taxonomy:
        """A copy with new leaf taxa (id, name, parent id) added; existing ids are skipped.

        A parent must be an internal taxon at or below a broad group, so every new leaf has a
        broad group (its dispatch category) and no existing class stops being a leaf.
        """
        existing = list(self._taxa.values())
        added: dict[str, Taxon] = {}
        for tid, name, parent in taxa:
            if tid in self._taxa or tid in added:
                continue
            check_learn_parent(self, parent)
            depth = self._taxa[parent].depth + 1
            added[tid] = Taxon(tid, name, "class", parent, depth)
        if not added:
            return self
        retired = [t for t in self._retired.values() if t.id not in added]
        return Taxonomy(
            [*existing, *added.values()], self.broad_ids, [*self.class_ids, *added], retired
        )

    def without_learned(self, taxon_ids: Iterable[str]) -> Taxonomy:
        """A copy without these learned taxa (Forget left them no example); they are retired
        (see the class docstring). Ids not in the tree are skipped."""
        gone = {t for t in taxon_ids if t in self._taxa}
        for t in gone:
            if not t.startswith(LEARNED_PREFIX):
                raise ValueError(f"only learned taxa can be removed, not {t!r}")
        if not gone:
            return self
        return Taxonomy(
            [t for t in self._taxa.values() if t.id not in gone],
            self.broad_ids,
            [c for c in self.class_ids if c not in gone],
            [*self._retired.values(), *(self._taxa[t] for t in gone)],
        )

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "broad": list(self.broad_ids),
            "classes": list(self.class_ids),
            "taxa": [asdict(t) for t in self._taxa.values()],
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Taxonomy:
        raw = json.loads(path.read_text())
        return cls([Taxon(**t) for t in raw["taxa"]], raw["broad"], raw["classes"])

    @property
    def version(self) -> str:
        blob = json.dumps(
            [asdict(t) for t in self._taxa.values()] + [list(self.broad_ids)], sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    # -- queries ------------------------------------------------------------------------------
    def __contains__(self, taxon_id: object) -> bool:
        return taxon_id in self._taxa

    def __len__(self) -> int:
        return len(self._taxa)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._taxa.values())

    def get(self, taxon_id: str) -> Taxon:
        try:
            return self._all[taxon_id]
        except KeyError:
            raise KeyError(f"unknown taxon {taxon_id!r}") from None

    def children(self, taxon_id: str) -> list[str]:
        kids = self._children.get(taxon_id)
        if kids is None:
            if taxon_id in self._retired:
                return []
            raise KeyError(f"unknown taxon {taxon_id!r}")
        return list(kids)

    def path(self, taxon_id: str) -> list[str]:
        """Ids from the root down to `taxon_id`, inclusive."""
        try:
            return list(self._paths[taxon_id])
        except KeyError:
            raise KeyError(f"unknown taxon {taxon_id!r}") from None

    def leaf_count(self, taxon_id: str) -> int:
        """How many leaves `taxon_id` has below it (itself, for a leaf)."""
        n = self._leaf_counts.get(taxon_id)
        if n is None:
            n = self._leaf_counts[taxon_id] = len(self.leaves_under(taxon_id))
        return n

    def is_leaf(self, taxon_id: str) -> bool:
        """True for a taxon without children (a retired one included)."""
        if taxon_id in self._retired:
            return True
        try:
            return not self._children[taxon_id]
        except KeyError:
            raise KeyError(f"unknown taxon {taxon_id!r}") from None

    def _walk(self, taxon_id: str) -> tuple[str, ...]:
        out = []
        t: str | None = taxon_id
        while t is not None:
            out.append(t)
            t = self._all[t].parent
        return tuple(reversed(out))

    def broad_of(self, taxon_id: str) -> str | None:
        return self._broad_of[taxon_id]

    def leaves_under(self, taxon_id: str) -> list[str]:
        kids = self._children[taxon_id]
        if not kids:
            return [taxon_id]
        return [leaf for k in kids for leaf in self.leaves_under(k)]

    def under(self, taxon_id: str) -> list[str]:
        """Every taxon strictly below `taxon_id`, parents before children."""
        out: list[str] = []
        frontier = list(self._children[taxon_id])
        while frontier:
            t = frontier.pop(0)
            out.append(t)
            frontier.extend(self._children[t])
        return out

    def is_ancestor_or_self(self, ancestor: str, taxon_id: str) -> bool:
        return ancestor in self.path(taxon_id)

    def _find_broad(self, taxon_id: str) -> str | None:
        for t in self.path(taxon_id):
            if self._all[t].rank == "broad":
                return t
        return None


LEARNED_PREFIX = "learned/"
MAX_TAXON_NAME_CHARS = 100


def check_taxon_name(name: str) -> str:
    """The name of a new taxon, stripped; ValueError unless it is 1 to MAX_TAXON_NAME_CHARS
    printable characters (after stripping spaces) with no control character anywhere."""
    bad = next((c for c in name if not c.isprintable()), None)
    if bad is not None:
        at = name.index(bad)
        raise ValueError(
            f"taxon name has a non-printable character {bad!r} at position {at}; names are "
            "printable text (no control characters such as NUL, newline or tab)"
        )
    stripped = name.strip()
    if not stripped:
        raise ValueError("taxon name is empty")
    if len(stripped) > MAX_TAXON_NAME_CHARS:
        raise ValueError(
            f"taxon name has {len(stripped)} characters; at most {MAX_TAXON_NAME_CHARS}"
        )
    return stripped


def learned_taxon_id(name: str) -> str:
    """The id Learn gives a new taxon: stable for a name, distinct from trained ids."""
    slug = _slug(name)
    if not slug:
        raise ValueError(f"taxon name {name!r} has no letters or digits")
    return LEARNED_PREFIX + slug


def check_learn_parent(taxonomy: Taxonomy, parent: str) -> None:
    """Raises ValueError unless `parent` can take a learned leaf (see Taxonomy.with_learned)."""
    if parent not in taxonomy:
        raise ValueError(f"unknown parent taxon {parent!r}")
    if taxonomy.broad_of(parent) is None:
        raise ValueError(
            f"parent {parent!r} is above the broad groups; pick a broad group or a node below one"
        )
    if not taxonomy.children(parent):
        raise ValueError(f"parent {parent!r} is a leaf class; pick an internal taxon")


def _common_prefix_len(paths: Sequence[Sequence[str]]) -> int:
    n = min(len(p) for p in paths)
    for i in range(n):
        if len({p[i] for p in paths}) > 1:
            return i
    return n


def _collapse_single_children(parent: dict[str, str], info: dict[str, tuple[str, str]]) -> None:
    """Removes intermediate WordNet nodes that have exactly one child (a chain adds no choice)."""
    changed = True
    while changed:
        changed = False
        kids: dict[str, list[str]] = {}
        for c, p in parent.items():
            kids.setdefault(p, []).append(c)
        for node, (_, rank) in list(info.items()):
            if rank == "node" and len(kids.get(node, [])) == 1:
                (only,) = kids[node]
                parent[only] = parent.pop(node)
                del info[node]
                changed = True
                break
