"""Pieces of Learn that need no server: taxonomy extension, blob store, write credential."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from fieldlens.backends.blob_store import FolderBlobStore, open_blob_store
from fieldlens.common.credentials import bearer, ensure_token
from fieldlens.common.errors import FailedPrecondition, NotFound, Unauthenticated
from fieldlens.common.taxonomy import Taxonomy, learned_taxon_id
from fieldlens.router.servicer import check_write_token


def _taxonomy() -> Taxonomy:
    classes = [
        SimpleNamespace(
            wnid=f"n{i}",
            name=f"class {i}",
            broad="cat" if i < 3 else "dog",
            domain="animal",
            wordnet_path=(
                "animal",
                "cat" if i < 3 else "dog",
                "small" if i % 2 else "big",
                f"c{i}",
            ),
        )
        for i in range(6)
    ]
    return Taxonomy.from_classes(classes)


def test_learned_taxa_extend_the_tree_under_internal_nodes():
    tax = _taxonomy()
    tid = learned_taxon_id("Snow Leopard!")
    assert tid == "learned/snow_leopard"
    ext = tax.with_learned([(tid, "Snow Leopard", "broad/cat")])
    assert ext.path(tid)[:-1] == tax.path("broad/cat")
    assert ext.get(tid).rank == "class" and ext.broad_of(tid) == "broad/cat"
    assert tid in ext.class_ids and tid not in tax  # the original is unchanged
    assert ext.version != tax.version
    assert ext.with_learned([(tid, "Snow Leopard", "broad/cat")]) is ext  # already there


@pytest.mark.parametrize("parent", ["root", "domain/animal", "n1", "broad/nope"])
def test_learned_taxa_need_an_internal_parent_below_a_broad_group(parent):
    with pytest.raises(ValueError):
        _taxonomy().with_learned([("learned/x", "x", parent)])


def test_learned_taxon_id_needs_letters_or_digits():
    with pytest.raises(ValueError):
        learned_taxon_id(" !? ")


def test_blob_store_is_content_addressed_and_verifies(tmp_path: Path):
    store = FolderBlobStore(tmp_path / "blobs")
    key = store.put(b"jpeg bytes")
    assert key == hashlib.sha256(b"jpeg bytes").hexdigest()
    assert store.put(b"jpeg bytes") == key and key in store
    assert store.get(key) == b"jpeg bytes"
    (tmp_path / "blobs" / key[:2] / key).write_bytes(b"tampered")
    with pytest.raises(FailedPrecondition):
        store.get(key)
    with pytest.raises(NotFound):
        store.get("0" * 64)
    with pytest.raises(ValueError):
        store.get("../etc/passwd")


def test_blob_store_urls(tmp_path: Path):
    assert open_blob_store("", tmp_path / "d").root == tmp_path / "d"
    assert open_blob_store(f"file://{tmp_path}/x", tmp_path).root == tmp_path / "x"
    with pytest.raises(FailedPrecondition, match="file://"):
        open_blob_store("s3://bucket/exemplars", tmp_path)


def test_local_token_is_created_once_and_private(tmp_path: Path):
    path = tmp_path / "run" / "write-token"
    token = ensure_token(path)
    assert len(token) >= 32 and ensure_token(path) == token
    assert path.stat().st_mode & 0o077 == 0


class _Context:
    def __init__(self, metadata):
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata


def test_write_token_check():
    token = "t" * 32
    check_write_token(_Context(bearer(token)), token)
    check_write_token(_Context((("authorization", f"bearer {token}"),)), token)
    for metadata in ((), bearer("x" * 32), (("authorization", token),)):
        with pytest.raises(Unauthenticated):
            check_write_token(_Context(metadata), token)
    with pytest.raises(FailedPrecondition, match="no write token"):
        check_write_token(_Context(bearer(token)), None)
