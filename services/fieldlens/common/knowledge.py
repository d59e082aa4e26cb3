"""Learned knowledge: examples and taxa added online by Learn, and the journal that keeps them.

A journal is an append-only JSON-lines file, one record per line, fsynced before the append
returns, so an acknowledged Learn or Forget survives a crash or kill -9 of the process. A line
cut short by a crash mid-write was never acknowledged; replay skips it. One journal belongs to
one model set (one embedding space): vectors from another space are never mixed in.

A record is a learned example, or a forget record naming example ids: a forget record cancels
every earlier record of its ids (a later Learn of the same photo counts again). What is still
learned is therefore the journal's examples, in order, minus the cancelled ones (`still_learned`);
replaying exactly those onto the trained model gives the state as if the forgotten examples had
never been learned.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fieldlens.common.taxonomy import LEARNED_PREFIX
from fieldlens.v1 import classifier_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewTaxonSpec:
    """A taxon created by Learn: a leaf under an existing internal taxon."""

    id: str
    name: str
    parent: str


@dataclass(frozen=True)
class LearnedExample:
    """One labelled embedding learned online."""

    id: str  # content hash of the image
    taxon_id: str  # leaf label
    vector: np.ndarray  # float32, L2-normalised embedding
    new_taxon: NewTaxonSpec | None = None
    source: str = ""
    # Who taught it: the name of the write token it came with (common/credentials.py); empty in
    # records written before names were kept, and in the tiny service's journals.
    client: str = ""

    def to_json(self) -> dict[str, object]:
        vec = np.ascontiguousarray(self.vector, dtype="<f4")
        out: dict[str, object] = {
            "id": self.id,
            "taxon_id": self.taxon_id,
            "vector": base64.b64encode(vec.tobytes()).decode(),
            "new_taxon": None if self.new_taxon is None else vars(self.new_taxon),
            "source": self.source,
        }
        if self.client:
            out["client"] = self.client
        return out

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> LearnedExample:
        nt = raw.get("new_taxon")
        return cls(
            id=str(raw["id"]),
            taxon_id=str(raw["taxon_id"]),
            vector=np.frombuffer(base64.b64decode(str(raw["vector"])), dtype="<f4").copy(),
            new_taxon=NewTaxonSpec(**nt) if isinstance(nt, dict) else None,
            source=str(raw.get("source", "")),
            client=str(raw.get("client", "")),
        )


@dataclass(frozen=True)
class ForgetRecord:
    """Examples forgotten: every earlier record of these example ids stops counting."""

    ids: tuple[str, ...]
    taxon_id: str = ""  # the learned taxon the Forget named, if it named one (for the record)
    client: str = ""  # who asked (a write token's name), as LearnedExample.client

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"forget": list(self.ids), "taxon_id": self.taxon_id}
        if self.client:
            out["client"] = self.client
        return out

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> ForgetRecord:
        ids = raw["forget"]
        assert isinstance(ids, list)
        return cls(
            tuple(str(i) for i in ids), str(raw.get("taxon_id", "")), str(raw.get("client", ""))
        )


Record = LearnedExample | ForgetRecord


def still_learned(records: Iterable[Record]) -> list[LearnedExample]:
    """The examples that count, in journal order: each forget record drops every earlier
    example record of its ids.

    An example of a learned taxon that lacks the taxon's creating spec gets it from any earlier
    record, so forgetting the example that created a taxon leaves the others replayable.
    """
    kept: list[LearnedExample | None] = []
    positions: dict[str, list[int]] = {}
    specs: dict[str, NewTaxonSpec] = {}
    for r in records:
        if isinstance(r, ForgetRecord):
            for example_id in r.ids:
                for i in positions.pop(example_id, ()):
                    kept[i] = None
            continue
        if r.new_taxon is not None:
            specs.setdefault(r.new_taxon.id, r.new_taxon)
        elif r.taxon_id.startswith(LEARNED_PREFIX) and r.taxon_id in specs:
            r = replace(r, new_taxon=specs[r.taxon_id])
        positions.setdefault(r.id, []).append(len(kept))
        kept.append(r)
    return [e for e in kept if e is not None]


def still_learned_across(journals: Sequence[KnowledgeJournal]) -> dict[str, LearnedExample]:
    """Example id -> its last record, over several journals taken in order (oldest first),
    forget records included: a photo forgotten under a later model set stays forgotten."""
    latest: dict[str, LearnedExample] = {}
    for journal in journals:
        for r in journal.records():
            if isinstance(r, ForgetRecord):
                for example_id in r.ids:
                    latest.pop(example_id, None)
            else:
                latest[r.id] = r
    return latest


def forgotten_ids(records: Sequence[Record]) -> list[str]:
    """Ids named by forget records and not learned again after: forgotten for good."""
    alive = {e.id for e in still_learned(records)}
    out: dict[str, None] = {}
    for r in records:
        if isinstance(r, ForgetRecord):
            out.update((i, None) for i in r.ids if i not in alive)
    return list(out)


class KnowledgeJournal:
    """Append-only, fsynced journal of learned examples (and forget records) for one model set."""

    def __init__(self, path: Path, model_set_version: str, embedding_version: str) -> None:
        self.path = path
        self.model_set_version = model_set_version
        self.embedding_version = embedding_version
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._header = {
            "journal": "fieldlens-knowledge/1",
            "model_set_version": model_set_version,
            "embedding_version": embedding_version,
        }
        if not path.exists() or path.stat().st_size == 0:
            self._write_lines([self._header])
        else:
            self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """Cuts a last line that a crash left without its newline: it was never acknowledged,
        and the next append must start on a line of its own."""
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            logger.warning(
                "%s: dropping a torn last record (%d bytes)", self.path, len(data) - keep
            )
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def for_model_set(
        cls, state_dir: Path, service: str, model_set_version: str, embedding_version: str
    ) -> KnowledgeJournal:
        path = state_dir / "knowledge" / f"{service}-{model_set_version}.jsonl"
        return cls(path, model_set_version, embedding_version)

    @classmethod
    def older(cls, state_dir: Path, service: str, model_set_version: str) -> list[KnowledgeJournal]:
        """Journals of `service` for other model sets, oldest first (for re-learning)."""
        paths = sorted(
            (state_dir / "knowledge").glob(f"{service}-*.jsonl"), key=lambda p: p.stat().st_mtime
        )
        out = []
        for path in paths:
            header = json.loads(path.open("rb").readline() or b"{}")
            msv = header.get("model_set_version")
            if msv and msv != model_set_version:
                out.append(cls(path, msv, str(header.get("embedding_version", ""))))
        return out

    def others(self) -> list[KnowledgeJournal]:
        """The same service's journals for other model sets, oldest first (none unless this
        one sits where `for_model_set` puts it)."""
        suffix = f"-{self.model_set_version}.jsonl"
        if self.path.parent.name != "knowledge" or not self.path.name.endswith(suffix):
            return []
        service = self.path.name[: -len(suffix)]
        return KnowledgeJournal.older(self.path.parent.parent, service, self.model_set_version)

    def append(self, records: Iterable[Record]) -> None:
        """Returns once the records are on disk (flushed and fsynced)."""
        lines = [r.to_json() for r in records]
        if lines:
            self._write_lines(lines)

    def replay(self) -> list[LearnedExample]:
        """The examples still learned, in append order (see `still_learned`)."""
        return still_learned(self.records())

    def records(self) -> Iterator[Record]:
        """Every record (examples and forget records) in append order."""
        with self.path.open("rb") as f:
            raw_lines = f.read().split(b"\n")
        for n, raw in enumerate(raw_lines):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                raise ValueError(f"{self.path}: line {n + 1} is corrupt") from None
            if "journal" in rec:
                if rec.get("embedding_version") != self.embedding_version:
                    raise ValueError(
                        f"{self.path} holds vectors of {rec.get('embedding_version')}, "
                        f"not {self.embedding_version}"
                    )
                continue
            if "forget" in rec:
                yield ForgetRecord.from_json(rec)
            else:
                yield LearnedExample.from_json(rec)

    def _write_lines(self, records: list[dict[str, object]]) -> None:
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)


def example_from_proto(example: classifier_pb2.LearnedExample) -> LearnedExample:
    """The domain form of one LearnedExample message (checked later, by the ensemble)."""
    nt = example.new_taxon
    return LearnedExample(
        id=example.id,
        taxon_id=example.taxon_id,
        vector=np.asarray(example.embedding, dtype=np.float32),
        new_taxon=(
            NewTaxonSpec(nt.id, nt.name, nt.parent_id) if example.HasField("new_taxon") else None
        ),
    )


def example_to_proto(example: LearnedExample) -> classifier_pb2.LearnedExample:
    """The LearnedExample message of one example (the router's Learn, a peer's export)."""
    nt = example.new_taxon
    return classifier_pb2.LearnedExample(
        id=example.id,
        taxon_id=example.taxon_id,
        embedding=np.asarray(example.vector, dtype=np.float32).tolist(),
        new_taxon=None
        if nt is None
        else classifier_pb2.NewTaxon(id=nt.id, name=nt.name, parent_id=nt.parent),
    )
