"""Pieces of Learn and Forget that need no server: taxonomy extension and retirement, blob
store, write credential, Learn's input rules."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fieldlens.backends.blob_store import FolderBlobStore, open_blob_store
from fieldlens.common.credentials import Credentials, bearer, ensure_token
from fieldlens.common.errors import (
    FailedPrecondition,
    FieldlensError,
    InvalidInput,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from fieldlens.common.taxonomy import Taxonomy, check_taxon_name, learned_taxon_id
from fieldlens.router.imaging import ImageLimits
from fieldlens.router.learning import Learner, LearnItem, check_source, exemplar_ids


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


@pytest.mark.parametrize(
    ("parent", "match"),
    [
        ("root", "'root' is above the broad groups"),
        ("domain/animal", "'domain/animal' is above the broad groups"),
        ("n1", "'n1' is a leaf class"),
        ("broad/nope", "unknown parent taxon 'broad/nope'"),
    ],
)
def test_learned_taxa_need_an_internal_parent_below_a_broad_group(parent, match):
    with pytest.raises(ValueError, match=match):
        _taxonomy().with_learned([("learned/x", "x", parent)])


def test_learned_taxon_id_needs_letters_or_digits():
    with pytest.raises(ValueError, match="has no letters or digits"):
        learned_taxon_id(" !? ")


def test_blob_store_is_content_addressed_and_verifies(tmp_path: Path):
    store = FolderBlobStore(tmp_path / "blobs")
    key = store.put(b"jpeg bytes")
    assert key == hashlib.sha256(b"jpeg bytes").hexdigest()
    assert store.put(b"jpeg bytes") == key and key in store
    assert store.get(key) == b"jpeg bytes"
    (tmp_path / "blobs" / key[:2] / key).write_bytes(b"tampered")
    with pytest.raises(FailedPrecondition, match=f"blob {key} in .* is corrupt"):
        store.get(key)
    with pytest.raises(NotFound, match=f"no blob {'0' * 64} in"):
        store.get("0" * 64)
    with pytest.raises(ValueError, match="must be a lowercase SHA-256 hex digest"):
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


def test_write_token_check():
    token = "t" * 32
    shared = Credentials(None, token)
    assert shared.authorize(bearer(token), "admin") == "write-token"
    assert shared.authorize((("authorization", f"bearer {token}"),), "learn") == "write-token"
    for metadata, match in (
        ((), "need an 'authorization: Bearer <token>' header"),
        (bearer("x" * 32), "invalid write credential"),
        ((("authorization", token),), "invalid write credential"),  # no Bearer scheme
    ):
        with pytest.raises(Unauthenticated, match=match):
            shared.authorize(metadata, "learn")
    with pytest.raises(FailedPrecondition, match="no write token"):
        Credentials(None, None).authorize(bearer(token), "learn")


# -- Learn's input rules ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 101, "101 characters; at most 100"),
        ("x" * 100_000, "100000 characters"),
        (" " + "x" * 101 + " ", "101 characters"),
        ("snow\x00leopard", r"'\\x00' at position 4"),
        ("snow\nleopard", r"'\\n'"),
        ("snow leopard\n", r"'\\n'"),  # stripped or not, a control character is refused
        ("\tsnow leopard", r"'\\t'"),
        ("snow\x7fleopard", "non-printable"),
        ("snow\u2028leopard", "non-printable"),  # a line separator
    ],
)
def test_bad_taxon_names_are_refused(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_taxon_name(name)


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("x" * 100, "x" * 100),
        ("  snow leopard  ", "snow leopard"),
        ("Schneeleopard (Großkatze)", "Schneeleopard (Großkatze)"),
        ("雪豹 🐆", "雪豹 🐆"),
        ("é" * 100, "é" * 100),  # characters, not bytes
    ],
)
def test_good_taxon_names_are_kept_stripped(name: str, kept: str) -> None:
    assert check_taxon_name(name) == kept


@pytest.mark.parametrize(
    ("source", "ok"),
    [
        ("", True),
        ("field-app/user-123", True),
        ("s" * 256, True),
        ("s" * 257, False),
        ("é" * 128, True),  # 256 bytes of UTF-8
        ("é" * 129, False),  # 129 characters, 258 bytes
        ("s" * (1 << 20), False),
    ],
)
def test_source_is_at_most_256_bytes_of_utf8(source: str, ok: bool) -> None:
    if ok:
        check_source(source)
    else:
        with pytest.raises(InvalidInput, match=r"bytes of UTF-8; at most 256"):
            check_source(source)


def _learner(tax: Taxonomy) -> Learner:
    plane = SimpleNamespace(
        model_set=SimpleNamespace(taxonomy=tax),
        limits=ImageLimits(1 << 20, 1 << 20, 8),
        reindexing=None,
        store=object(),
    )

    class NoWrites:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"a refused item must not reach the {name} of a store")

    return Learner(plane, NoWrites(), NoWrites())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("item", "match"),
    [
        (LearnItem(b"", new_name="x" * 100_000, new_parent="broad/cat"), "100000 characters"),
        (LearnItem(b"", new_name="snow\x00leopard", new_parent="broad/cat"), "non-printable"),
        (LearnItem(b"", new_name="snow\nleopard", new_parent="broad/cat"), "non-printable"),
        (LearnItem(b"", taxon_id="n1", source="s" * (1 << 20)), "1048576 bytes"),
        (LearnItem(b"", taxon_id="n" * 100_000), r"unknown taxon 'nnn.*\(100000 characters\)"),
        (LearnItem(b"", new_name="x", new_parent="p" * 100_000), "100000 characters"),
    ],
)
def test_the_learner_checks_the_rules_and_keeps_messages_short(item: LearnItem, match: str):
    with pytest.raises(InvalidInput, match=match) as err:
        _learner(_taxonomy())._resolve_label(item, {})
    assert len(err.value.message) < 300


def _png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def test_a_photo_learned_under_another_label_is_refused_naming_it():
    tax = _taxonomy().with_learned([("learned/tabby", "tabby", "broad/cat")])
    learner = _learner(tax)
    photo, other = _png(1), _png(2)
    learner._learned[hashlib.sha256(photo).hexdigest()] = "learned/tabby"
    outcomes = asyncio.run(
        learner.learn(
            [
                LearnItem(photo, taxon_id="n1"),  # learned as tabby already
                # Within one call, the first label a photo gets is the one it keeps.
                LearnItem(other, new_name="lynx", new_parent="broad/cat", source="s" * 300),
                LearnItem(photo, new_name="lynx", new_parent="broad/cat"),
            ]
        )
    )
    assert all(isinstance(o, FieldlensError) for o in outcomes)
    relabel, too_long, again = outcomes
    assert isinstance(relabel, FailedPrecondition) and isinstance(again, FailedPrecondition)
    assert "already learned as 'tabby' (learned/tabby)" in relabel.message
    assert "Forget it" in relabel.message and "then Learn it again" in relabel.message
    assert isinstance(too_long, InvalidInput)


def test_a_duplicate_in_one_call_with_another_label_is_refused():
    learner = _learner(_taxonomy())
    photo = _png(3)

    async def first_batch_fails(*_args: object) -> list[object]:
        raise Unavailable("stop here: nothing is learned in this test")

    learner._learn_batch = first_batch_fails  # type: ignore[method-assign]
    outcomes = asyncio.run(
        learner.learn([LearnItem(photo, taxon_id="n1"), LearnItem(photo, taxon_id="n2")])
    )
    assert isinstance(outcomes[0], Unavailable)
    assert isinstance(outcomes[1], FailedPrecondition)
    assert "labelled 'class 1' (n1) by an earlier item of this call" in outcomes[1].message


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (["abc"], "not an image's SHA-256"),
        (["z" * 64], "not an image's SHA-256"),
        (["a" * 100_000], r"\(100000 characters\)"),
        (["a" * 64] * 10_001, "at most 10000"),
    ],
)
def test_forget_checks_exemplar_ids(ids: list[str], match: str):
    with pytest.raises(InvalidInput, match=match):
        exemplar_ids(ids)


def test_forget_ids_are_normalised():
    digest = hashlib.sha256(b"x").hexdigest()
    assert exemplar_ids([digest.upper(), f" {digest} ", digest]) == [digest]


@pytest.mark.parametrize(
    ("ids", "taxon", "match"),
    [
        ([], "", "not both"),
        (["a" * 64], "learned/x", "not both"),
        ([], "n1", "not a learned taxon"),
        ([], "broad/cat", "not a learned taxon"),
    ],
)
def test_forget_needs_ids_or_a_learned_taxon(ids: list[str], taxon: str, match: str):
    with pytest.raises(InvalidInput, match=match):
        asyncio.run(_learner(_taxonomy()).forget(ids, taxon))


# -- what Forget changes in the taxonomy and the blob store -------------------------------------
def test_a_removed_learned_taxon_is_retired_not_forgotten_by_lookups():
    tax = _taxonomy()
    ext = tax.with_learned(
        [("learned/tabby", "tabby", "broad/cat"), ("learned/x", "x", "broad/dog")]
    )
    less = ext.without_learned(["learned/tabby", "learned/never"])
    assert "learned/tabby" not in less and "learned/x" in less
    assert "learned/tabby" not in {t.id for t in less} and len(less) == len(tax) + 1
    assert "learned/tabby" not in less.class_ids
    assert "learned/tabby" not in less.children("broad/cat")
    # An answer computed just before the Forget can still be rendered.
    assert less.get("learned/tabby").name == "tabby"
    assert less.path("learned/tabby") == ext.path("learned/tabby")
    assert less.broad_of("learned/tabby") == "broad/cat" and less.children("learned/tabby") == []
    assert less.version == tax.with_learned([("learned/x", "x", "broad/dog")]).version
    # Learning it again brings it back into the tree; other learned taxa keep it retired.
    back = less.with_learned([("learned/tabby", "tabby", "broad/cat")])
    assert "learned/tabby" in back and "learned/tabby" in back.children("broad/cat")
    later = less.with_learned([("learned/y", "y", "broad/dog")])
    assert "learned/tabby" not in later and later.get("learned/tabby").parent == "broad/cat"
    with pytest.raises(ValueError, match="only learned taxa"):
        ext.without_learned(["n1"])
    with pytest.raises(KeyError, match="unknown taxon 'learned/never'"):
        less.children("learned/never")


def test_blob_store_delete(tmp_path: Path):
    store = FolderBlobStore(tmp_path / "blobs")
    key = store.put(b"jpeg bytes")
    assert store.delete(key) and key not in store
    assert not store.delete(key)
    assert store.put(b"jpeg bytes") == key and key in store  # learned again after a Forget
