"""Learned knowledge: examples and taxa added online by Learn, and the journal that keeps them.

A journal is an append-only JSON-lines file, one example per line, fsynced before the append
returns, so an acknowledged Learn survives a crash or kill -9 of the process. A line cut short by
a crash mid-write was never acknowledged; replay skips it. One journal belongs to one model set
(one embedding space): vectors from another space are never mixed in.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

    def to_json(self) -> dict[str, object]:
        vec = np.ascontiguousarray(self.vector, dtype="<f4")
        return {
            "id": self.id,
            "taxon_id": self.taxon_id,
            "vector": base64.b64encode(vec.tobytes()).decode(),
            "new_taxon": None if self.new_taxon is None else vars(self.new_taxon),
            "source": self.source,
        }

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> LearnedExample:
        nt = raw.get("new_taxon")
        return cls(
            id=str(raw["id"]),
            taxon_id=str(raw["taxon_id"]),
            vector=np.frombuffer(base64.b64decode(str(raw["vector"])), dtype="<f4").copy(),
            new_taxon=NewTaxonSpec(**nt) if isinstance(nt, dict) else None,
            source=str(raw.get("source", "")),
        )


class KnowledgeJournal:
    """Append-only, fsynced journal of learned examples for one model set."""

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

    def append(self, examples: Iterable[LearnedExample]) -> None:
        """Returns once the examples are on disk (flushed and fsynced)."""
        lines = [e.to_json() for e in examples]
        if lines:
            self._write_lines(lines)

    def replay(self) -> Iterator[LearnedExample]:
        """Every record in append order."""
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
