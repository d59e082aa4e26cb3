"""Vector-store semantics on qdrant-client's in-process mode (and, for provenance, Qdrant
Edge), ids, validation and the factory."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

from fieldlens.backends.vector_store import (
    EdgeVectorStore,
    Exemplar,
    QdrantClientVectorStore,
    VectorStore,
    open_vector_store,
    point_uuid,
)
from fieldlens.common.errors import FailedPrecondition, InvalidInput, Unavailable

DIM = 8


def _exemplar(i: int, broad: str) -> Exemplar:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[i % DIM] = 1.0
    vector[(i + 1) % DIM] = 0.1 * (i // DIM + 1)
    return Exemplar(
        id=hashlib.sha256(str(i).encode()).hexdigest(),
        vector=vector,
        label=f"n{i:08d}",
        broad=broad,
        path=["entity", broad, f"n{i:08d}"],
        source="unit",
        embedding_version="v0",
    )


@pytest.fixture
def store() -> VectorStore:
    opened = open_vector_store(":memory:", "exemplars_v0", DIM)
    assert isinstance(opened, QdrantClientVectorStore)
    return opened


def test_point_uuid_is_deterministic_and_validated() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    assert point_uuid(digest) == point_uuid(digest.upper()) == uuid.UUID(hex=digest[:32])
    for bad in ("", "abc", "z" * 64):
        with pytest.raises(InvalidInput, match="exemplar id must be a hex content hash"):
            point_uuid(bad)


def test_semantics(store: VectorStore) -> None:
    exemplars = [_exemplar(i, "broad/a" if i % 2 else "broad/b") for i in range(16)]
    with store:
        store.upsert(exemplars)
        store.upsert(exemplars[:4])
        assert store.count() == 16

        hit = store.search(exemplars[5].vector, k=1)[0]
        assert (hit.id, hit.label, hit.path) == (
            exemplars[5].id,
            exemplars[5].label,
            exemplars[5].path,
        )
        assert hit.similarity == pytest.approx(1.0, abs=1e-5)

        assert all(h.broad == "broad/b" for h in store.search(exemplars[5].vector, 5, ["broad/b"]))
        assert store.search(exemplars[5].vector, 5, []) == []
        (own,) = store.search_labels(exemplars[5].vector, [exemplars[5].label], 1)
        assert [h.id for h in own] == [exemplars[5].id]


def test_neighbours_carry_the_source_stored_with_them(tmp_path: Path) -> None:
    """Both stores return each neighbour's provenance (ClassifyResponse's Exemplar.source);
    Qdrant Edge also after a reopen, when it re-reads what it keeps in memory from disk."""
    exemplars = [
        dataclasses.replace(_exemplar(i, "broad/a"), source=f"gallery-{i % 2}") for i in range(6)
    ]
    reference = open_vector_store(":memory:", "exemplars_v0", DIM)
    edge_root = str(tmp_path / "qdrant")
    edge = open_vector_store(edge_root, "exemplars_v0", DIM)
    assert isinstance(edge, EdgeVectorStore)
    for opened in (reference, edge):
        with opened:
            opened.upsert(exemplars)
            for e in exemplars:
                assert opened.search(e.vector, k=1)[0].source == e.source
    with open_vector_store(edge_root, "exemplars_v0", DIM) as reopened:
        for e in exemplars:  # also through the evidence search
            (own,) = reopened.search_labels(e.vector, [e.label], 1)
            assert [n.source for n in own] == [e.source]


def test_validation(store: VectorStore) -> None:
    with store:
        with pytest.raises(InvalidInput, match=rf"vector must have shape \[{DIM}\], got"):
            store.search(np.zeros(DIM + 1, dtype=np.float32), 3)
        with pytest.raises(InvalidInput, match="vector contains NaN or infinity"):
            store.upsert(
                [Exemplar(id="ab" * 32, vector=np.full(DIM, np.nan), label="l", broad="b")]
            )
        with pytest.raises(InvalidInput, match=rf"vector must have shape \[{DIM}\], got"):
            store.search_labels(np.zeros(DIM + 1, dtype=np.float32), ["l"], 3)
        with pytest.raises(FailedPrecondition, match=f"has vector size {DIM}, wanted {DIM * 2}"):
            store.ensure_collection(DIM * 2)


def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Unavailable, match="qdrant ensure_collection on exemplars_v0 failed"):
        open_vector_store(f"http://127.0.0.1:{port}", "exemplars_v0", DIM)
