"""Learn and Forget on the tiny ensemble: imprinted new taxa, replay, the servicer's checks,
the journal."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from small_tree import CLASSES

from fieldlens.common.errors import FailedPrecondition, InvalidInput
from fieldlens.common.knowledge import (
    ForgetRecord,
    KnowledgeJournal,
    LearnedExample,
    NewTaxonSpec,
    example_from_proto,
    example_to_proto,
    forgotten_ids,
    still_learned,
    still_learned_across,
)
from fieldlens.common.model_set import ModelSet
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.tiny.ensemble import TinyEnsemble, fit
from fieldlens.tiny.servicer import TinyServicer
from fieldlens.v1 import classifier_pb2

DIM = 16
NOISE = 0.5
NEW = "learned/a6"
EMB_VERSION = "emb-v1"
MODEL_SET = "ms-test"


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    t = Taxonomy.from_classes(CLASSES)
    assert sorted(t.children("node/a/z")) == ["a4", "a5"]
    assert t.children("broad/c") == ["c1"]
    return t


class Space:
    """Synthetic embeddings with the tree's structure, as a real backbone's have: a class mean
    is a sum of one random direction per taxon on its path, so relatives share most of it."""

    def __init__(self, tax: Taxonomy) -> None:
        self.tax = tax

    @staticmethod
    def _dir(taxon: str) -> np.ndarray:
        # Seeded by the name, so a taxon's direction does not depend on which test asks first.
        return np.random.default_rng(zlib.crc32(taxon.encode())).normal(0, 1, DIM) / np.sqrt(DIM)

    def mean(self, leaf: str, parent: str | None = None) -> np.ndarray:
        """Mean of an existing leaf, or of a new leaf `leaf` under `parent`."""
        path = self.tax.path(parent if parent is not None else leaf)
        path = [t for t in path if self.tax.get(t).rank in ("broad", "node", "class")]
        if parent is not None:
            path.append(leaf)
        weights = [1.0, 0.8, 0.7, 0.6, 0.5]
        return sum(w * self._dir(t) for w, t in zip(weights, path, strict=False))

    def sample(self, mean: np.ndarray, n: int, seed: int) -> np.ndarray:
        x = mean + np.random.default_rng(seed).normal(0, NOISE / np.sqrt(DIM), (n, DIM))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def space(tax: Taxonomy) -> Space:
    return Space(tax)


@pytest.fixture(scope="module")
def base(tax: Taxonomy, space: Space) -> TinyEnsemble:
    emb = np.concatenate(
        [space.sample(space.mean(c.wnid), 30, seed=i) for i, c in enumerate(CLASSES)]
    )
    leaves = np.repeat(np.asarray(tax.class_ids), 30)
    return fit(tax, emb, leaves, EMB_VERSION, epochs=60)


def _examples(
    vectors: np.ndarray, taxon: str = NEW, parent: str | None = "node/a/z", prefix: str = "n"
) -> list[LearnedExample]:
    spec = None if parent is None else NewTaxonSpec(taxon, "a six", parent)
    return [LearnedExample(f"{prefix}{i}", taxon, v, spec) for i, v in enumerate(vectors)]


def _top_leaf_rate(ens: TinyEnsemble, x: np.ndarray, leaf: str) -> float:
    """How often `leaf` scores highest among the leaves of its broad group."""
    t = ens.taxonomy
    candidates = t.leaves_under(str(t.broad_of(leaf)))
    probs = ens.predict(x)[:, [ens.path_rows(c)[-1] for c in candidates]]
    return float(np.mean(np.asarray(candidates)[probs.argmax(axis=1)] == leaf))


def _old_accuracy(ens: TinyEnsemble, space: Space) -> float:
    return float(
        np.mean(
            [
                _top_leaf_rate(ens, space.sample(space.mean(c.wnid), 40, seed=100 + i), c.wnid)
                for i, c in enumerate(CLASSES)
            ]
        )
    )


# -- the ensemble -------------------------------------------------------------------------------
def test_with_taxonomy_keeps_rows_by_id_and_starts_new_ones_at_zero(
    tax: Taxonomy, base: TinyEnsemble
) -> None:
    extended = tax.with_learned([(NEW, "a six", "node/a/z"), ("learned/b3", "b3", "broad/b")])
    ens = base.with_taxonomy(extended)
    assert len(ens.layout.row_taxon) == len(base.layout.row_taxon) + 2
    for t in map(str, base.layout.row_taxon):
        np.testing.assert_array_equal(
            ens.weights[ens.path_rows(t)[-1]], base.weights[base.path_rows(t)[-1]]
        )
    for t in (NEW, "learned/b3"):
        r = ens.path_rows(t)[-1]
        assert not ens.weights[r].any() and ens.bias[r] == 0.0
    # The original is untouched, and the extended one still sums to 1 over each group's leaves.
    assert len(base.layout.row_taxon) == 11
    x = np.random.default_rng(1).normal(0, 1, (3, DIM)).astype(np.float32)
    probs = ens.predict(x)
    for broad in extended.broad_ids:
        rows = [ens.path_rows(leaf)[-1] for leaf in extended.leaves_under(broad)]
        np.testing.assert_allclose(probs[:, rows].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("parent", ["node/a/z", "node/a/y", "broad/a", "broad/c"])
def test_five_examples_of_a_new_taxon_win_its_cluster_and_keep_the_old_classes(
    base: TinyEnsemble, space: Space, parent: str
) -> None:
    mean = space.mean(NEW, parent)
    before = _old_accuracy(base, space)
    ens = base.copy()
    ens.learn(_examples(space.sample(mean, 5, seed=7), parent=parent))
    assert ens.taxonomy.get(NEW).parent == parent
    assert _top_leaf_rate(ens, space.sample(mean, 100, seed=8), NEW) >= 0.8
    assert _old_accuracy(ens, space) > before - 0.10
    assert NEW not in base.taxonomy  # learning happened on the copy


def test_sgd_on_the_path_teaches_the_ancestors_to_route_to_a_new_taxon(
    base: TinyEnsemble, space: Space
) -> None:
    # Filed under node/a/z but looking like an x: the imprint alone cannot help, as the broad
    # node sends these images to x, never to y; SGD on the path must teach it to.
    mean = space.mean(NEW, "node/a/x")
    examples = _examples(space.sample(mean, 5, seed=7))
    held_out = space.sample(mean, 100, seed=8)
    imprint_only = base.copy()
    imprint_only.learn(examples, steps=0)
    assert _top_leaf_rate(imprint_only, held_out, NEW) < 0.1
    ens = base.copy()
    ens.learn(examples)
    assert _top_leaf_rate(ens, held_out, NEW) >= 0.5
    assert _old_accuracy(ens, space) > _old_accuracy(base, space) - 0.10


def test_without_centroids_the_imprint_is_calibrated_not_raw(
    base: TinyEnsemble, space: Space
) -> None:
    # An ensemble saved before centroids were kept: the raw class mean shares the group's
    # common direction, so only the calibrated bias keeps a4/a5 from being swallowed.
    ens = base.copy()
    ens.centroids = {}
    before = _old_accuracy(ens, space)
    mean = space.mean(NEW, "node/a/z")
    ens.learn(_examples(space.sample(mean, 5, seed=7)))
    assert _top_leaf_rate(ens, space.sample(mean, 100, seed=8), NEW) >= 0.8
    assert _old_accuracy(ens, space) > before - 0.10


def test_the_imprint_is_reapplied_after_sgd(base: TinyEnsemble, space: Space) -> None:
    ens = base.copy()
    vectors = space.sample(space.mean(NEW, "node/a/z"), 5, seed=7)
    ens.learn(_examples(vectors))
    # Examples of a sibling move the whole segment by SGD; the learned row is put back.
    ens.learn(_examples(space.sample(space.mean("a4"), 3, seed=9), "a4", None, prefix="s"))
    r = ens.path_rows(NEW)[-1]
    siblings = [ens.path_rows(t)[-1] for t in ("a4", "a5")]
    direction = vectors.astype(np.float64).mean(axis=0) - ens.centroids["node/a/z"]
    scale = np.median(np.linalg.norm(ens.weights[siblings], axis=1))
    np.testing.assert_allclose(
        ens.weights[r], scale * direction / np.linalg.norm(direction), rtol=1e-5, atol=1e-6
    )
    assert ens.bias[r] == pytest.approx(float(np.median(ens.bias[siblings])))


def test_learning_is_batch_independent_and_deterministic(base: TinyEnsemble, space: Space) -> None:
    examples = [
        *_examples(space.sample(space.mean(NEW, "node/a/z"), 4, seed=7)),
        *_examples(space.sample(space.mean("b2"), 2, seed=9), "b2", None, prefix="s"),
        *_examples(
            space.sample(space.mean("learned/b3", "broad/b"), 2, seed=10),
            "learned/b3",
            "broad/b",
            prefix="t",
        ),
    ]
    whole, split = base.copy(), base.copy()
    whole.learn(examples)
    for i in range(0, len(examples), 3):
        split.learn(examples[i : i + 3])
    assert list(whole.layout.row_taxon) == list(split.layout.row_taxon)
    assert np.array_equal(whole.weights, split.weights)
    assert np.array_equal(whole.bias, split.bias)
    assert list(whole.learned_taxa) == [NEW, "learned/b3"]
    assert whole.learned_examples == 8


def test_journal_replay_reproduces_the_weights_exactly(
    base: TinyEnsemble, space: Space, tmp_path: Path
) -> None:
    live = base.copy()
    journal = KnowledgeJournal.for_model_set(tmp_path, "tiny", MODEL_SET, EMB_VERSION)
    batches = [
        _examples(space.sample(space.mean(NEW, "node/a/z"), 3, seed=7)),
        _examples(space.sample(space.mean(NEW, "node/a/z"), 2, seed=11), prefix="m"),
        _examples(space.sample(space.mean("a1"), 2, seed=12), "a1", None, prefix="s"),
    ]
    for batch in batches:
        journal.append(batch)
        live.learn(batch)
    fresh = base.copy()
    fresh.learn(KnowledgeJournal.for_model_set(tmp_path, "tiny", MODEL_SET, EMB_VERSION).replay())
    assert list(fresh.layout.row_taxon) == list(live.layout.row_taxon)
    assert np.array_equal(fresh.weights, live.weights)
    assert np.array_equal(fresh.bias, live.bias)
    assert fresh.learned_taxa == live.learned_taxa
    assert fresh.learned_examples == live.learned_examples == 7


def test_a_relabel_moves_the_example_out_of_the_old_taxons_imprint(
    base: TinyEnsemble, space: Space
) -> None:
    vectors = space.sample(space.mean(NEW, "node/a/z"), 3, seed=7)
    ens = base.copy()
    ens.learn(_examples(vectors))
    # Example n2 was really an a4: relabelled, NEW's row is imprinted from n0 and n1 alone.
    ens.learn([LearnedExample("n2", "a4", vectors[2])])
    assert ens.learned_examples == 3
    direction = vectors[:2].astype(np.float64).mean(axis=0) - ens.centroids["node/a/z"]
    row = ens.weights[ens.path_rows(NEW)[-1]]
    cos = row @ direction / (np.linalg.norm(row) * np.linalg.norm(direction))
    assert cos == pytest.approx(1.0, abs=1e-5)


def test_triage_counts_duplicates_and_applies_relabels(base: TinyEnsemble, space: Space) -> None:
    ens = base.copy()
    vectors = space.sample(space.mean(NEW, "node/a/z"), 3, seed=7)
    ens.learn(_examples(vectors[:2]))
    batch = [
        *_examples(vectors),  # n0, n1 already learned with NEW; n2 is new
        LearnedExample("n2", NEW, vectors[2]),  # repeated in the batch: a duplicate
        LearnedExample("n1", "a4", vectors[1]),  # relabel: applied
    ]
    fresh, duplicates = ens.triage(batch)
    assert [(e.id, e.taxon_id) for e in fresh] == [("n2", NEW), ("n1", "a4")]
    assert duplicates == 3
    # Re-sending the whole history, relabel included, changes nothing.
    ens.learn(fresh)
    history = [*_examples(vectors), LearnedExample("n1", "a4", vectors[1])]
    assert ens.triage(history) == ([], 4)
    # A taxon created earlier in the same batch may be used without new_taxon.
    other = base.copy()
    fresh, duplicates = other.triage(
        [*_examples(vectors[:1]), LearnedExample("x", NEW, vectors[1])]
    )
    assert len(fresh) == 2 and duplicates == 0
    assert NEW not in other.taxonomy  # triage changes nothing


@pytest.mark.parametrize(
    ("taxon", "spec", "vector", "match"),
    [
        ("zz", None, None, "unknown taxon 'zz'"),
        ("node/a/z", None, None, "not a leaf"),
        (NEW, None, None, "unknown taxon"),
        (NEW, NewTaxonSpec(NEW, "six", "nope"), None, "unknown parent"),
        (NEW, NewTaxonSpec(NEW, "six", "a4"), None, "leaf class"),
        (NEW, NewTaxonSpec(NEW, "six", "domain/thing"), None, "above the broad groups"),
        (NEW, NewTaxonSpec("learned/other", "six", "node/a/z"), None, "is not its taxon_id"),
        ("a6", NewTaxonSpec("a6", "six", "node/a/z"), None, "must start with 'learned/'"),
        ("a4", NewTaxonSpec("a4", "a4", "node/a/y"), None, "already exists under 'node/a/z'"),
        (NEW, NewTaxonSpec(NEW, " ", "node/a/z"), None, "has no name"),
        ("a4", None, np.zeros(DIM + 1, np.float32), "expected 16"),
        ("a4", None, np.full(DIM, np.nan, np.float32), "NaN"),
    ],
)
def test_triage_rejects_bad_examples(
    base: TinyEnsemble,
    taxon: str,
    spec: NewTaxonSpec | None,
    vector: np.ndarray | None,
    match: str,
) -> None:
    v = np.full(DIM, 0.25, np.float32) if vector is None else vector
    with pytest.raises(InvalidInput, match=match):
        base.triage([LearnedExample("bad", taxon, v, spec)])


def test_an_existing_learned_taxon_under_another_parent_is_refused(
    base: TinyEnsemble, space: Space
) -> None:
    ens = base.copy()
    vectors = space.sample(space.mean(NEW, "node/a/z"), 2, seed=7)
    ens.learn(_examples(vectors[:1]))
    with pytest.raises(InvalidInput, match="already exists under 'node/a/z'"):
        ens.triage(_examples(vectors[1:], parent="node/a/y", prefix="m"))
    fresh, _ = ens.triage(_examples(vectors[1:], prefix="m"))  # same parent: fine
    assert len(fresh) == 1


def test_save_load_keeps_the_centroids(base: TinyEnsemble, tax: Taxonomy, tmp_path: Path) -> None:
    assert set(base.centroids) == {str(n) for n in base.layout.nodes}
    base.save(tmp_path / "tiny.npz")
    back = TinyEnsemble.load(tmp_path / "tiny.npz", tax)
    assert back.centroids.keys() == base.centroids.keys()
    for node, c in base.centroids.items():
        np.testing.assert_array_equal(back.centroids[node], c)


# -- the servicer -------------------------------------------------------------------------------
def _model_set(tax: Taxonomy) -> ModelSet:
    return ModelSet(
        version=MODEL_SET,
        embedding_version=EMB_VERSION,
        taxonomy=tax,
        routing={b: "tiny" for b in tax.broad_ids},
        specialists={},
        image_size=64,
        embedding_dim=DIM,
        manifest={},
    )


def _request(
    vectors: np.ndarray,
    parent: str | None = "node/a/z",
    version: str = MODEL_SET,
    prefix: str = "n",
) -> classifier_pb2.LearnExamplesRequest:
    new_taxon = (
        None if parent is None else classifier_pb2.NewTaxon(id=NEW, name="a six", parent_id=parent)
    )
    return classifier_pb2.LearnExamplesRequest(
        examples=[
            classifier_pb2.LearnedExample(
                id=f"{prefix}{i}", taxon_id=NEW, embedding=v.tolist(), new_taxon=new_taxon
            )
            for i, v in enumerate(vectors)
        ],
        model_set_version=version,
    )


@pytest.fixture
def servicer(tax: Taxonomy, base: TinyEnsemble, tmp_path: Path) -> TinyServicer:
    journal = KnowledgeJournal.for_model_set(tmp_path, "tiny", MODEL_SET, EMB_VERSION)
    return TinyServicer(_model_set(tax), base.copy(), journal)


def test_learn_journals_applies_and_describes(servicer: TinyServicer, space: Space) -> None:
    mean = space.mean(NEW, "node/a/z")
    vectors = space.sample(mean, 5, seed=7)
    served_before = servicer.ensemble

    async def body() -> None:
        r = await servicer.Learn(_request(vectors), None)
        assert (r.applied, r.duplicates, r.learned_total) == (5, 0, 5)
        # Durable before the reply: a fresh reader of the journal sees every example.
        journal = KnowledgeJournal(servicer.journal.path, MODEL_SET, EMB_VERSION)
        assert [e.id for e in journal.replay()] == [f"n{i}" for i in range(5)]
        lines = servicer.journal.path.read_bytes().count(b"\n")

        again = await servicer.Learn(_request(vectors), None)
        assert (again.applied, again.duplicates, again.learned_total) == (0, 5, 5)
        assert servicer.journal.path.read_bytes().count(b"\n") == lines

        d = await servicer.Describe(classifier_pb2.DescribeRequest(), None)
        assert d.learned_examples == 5
        assert [(t.id, t.name, t.parent_id) for t in d.learned_taxa] == [(NEW, "a six", "node/a/z")]
        assert [c.category for c in d.categories] == ["broad/a", "broad/b", "broad/c"]

        c = await servicer.Classify(
            classifier_pb2.CategoryRequest(
                category="broad/a", embedding=space.sample(mean, 1, seed=8)[0].tolist()
            ),
            None,
        )
        best_leaf = next(s for s in c.scores if s.leaf)  # internal nodes sort above leaves
        assert best_leaf.taxon_id == NEW
        leaves = [s.probability for s in c.scores if s.leaf]
        assert sum(leaves) == pytest.approx(1.0, rel=1e-5)

    asyncio.run(body())
    # Learn swapped in a new ensemble; the one Classify calls may still hold is unchanged.
    assert servicer.ensemble is not served_before
    assert NEW not in served_before.taxonomy


def test_learn_refuses_bad_requests(servicer: TinyServicer, space: Space) -> None:
    vectors = space.sample(space.mean(NEW, "node/a/z"), 2, seed=7)

    async def body() -> None:
        with pytest.raises(InvalidInput, match="unknown parent"):
            await servicer.Learn(_request(vectors, parent="node/a/nope"), None)
        with pytest.raises(InvalidInput, match="leaf class"):
            await servicer.Learn(_request(vectors, parent="a4"), None)
        with pytest.raises(InvalidInput, match="unknown taxon"):
            await servicer.Learn(_request(vectors, parent=None), None)
        with pytest.raises(FailedPrecondition, match="ms-other"):
            await servicer.Learn(_request(vectors, version="ms-other"), None)
        with pytest.raises(InvalidInput, match="model_set_version"):
            await servicer.Learn(_request(vectors, version=""), None)
        bad = _request(vectors)
        bad.examples[1].embedding.append(0.0)
        with pytest.raises(InvalidInput, match="expected 16"):
            await servicer.Learn(bad, None)

    asyncio.run(body())
    # Nothing was journalled or applied: a refused batch is refused whole.
    assert list(servicer.journal.replay()) == []
    assert servicer.ensemble.learned_examples == 0


def test_concurrent_learns_serialise_while_classify_keeps_answering(
    servicer: TinyServicer, space: Space
) -> None:
    mean = space.mean(NEW, "node/a/z")
    x = space.sample(mean, 1, seed=8)[0].tolist()

    async def classify() -> int:
        r = await servicer.Classify(
            classifier_pb2.CategoryRequest(category="broad/a", embedding=x), None
        )
        return len(r.scores)

    async def body() -> None:
        results = await asyncio.gather(
            *(
                servicer.Learn(_request(space.sample(mean, 2, seed=20 + k), prefix=f"k{k}-"), None)
                for k in range(4)
            ),
            *(classify() for _ in range(20)),
        )
        learns, sizes = results[:4], results[4:]
        assert sorted(r.learned_total for r in learns) == [2, 4, 6, 8]
        assert set(sizes) <= {8, 9}  # before or after the new taxon, never a mix

    asyncio.run(body())
    assert len(list(servicer.journal.replay())) == 8


# -- the journal --------------------------------------------------------------------------------
def test_journal_drops_a_torn_last_line(tmp_path: Path, space: Space) -> None:
    journal = KnowledgeJournal.for_model_set(tmp_path, "tiny", MODEL_SET, EMB_VERSION)
    complete = _examples(space.sample(space.mean(NEW, "node/a/z"), 2, seed=7))
    journal.append(complete)
    with journal.path.open("ab") as f:  # a crash mid-append: half a record, no newline
        f.write(b'{"id":"torn","taxon_id":"a4","vec')
    reopened = KnowledgeJournal.for_model_set(tmp_path, "tiny", MODEL_SET, EMB_VERSION)
    assert [e.id for e in reopened.replay()] == ["n0", "n1"]
    more = _examples(space.sample(space.mean("a4"), 1, seed=9), "a4", None, prefix="s")
    reopened.append(more)
    got = list(reopened.replay())
    assert [e.id for e in got] == ["n0", "n1", "s0"]
    np.testing.assert_array_equal(got[2].vector, more[0].vector)
    assert got[0].new_taxon == NewTaxonSpec(NEW, "a six", "node/a/z")
    assert journal.path.read_bytes().endswith(b"\n")


# -- Forget -------------------------------------------------------------------------------------
def _history(space: Space) -> list[LearnedExample]:
    """A new taxon under node/a/z, examples of a trained class, and a new taxon under broad/b."""
    return [
        *_examples(space.sample(space.mean(NEW, "node/a/z"), 3, seed=7)),
        *_examples(space.sample(space.mean("a4"), 2, seed=9), "a4", None, prefix="s"),
        *_examples(
            space.sample(space.mean("learned/b3", "broad/b"), 2, seed=10),
            "learned/b3",
            "broad/b",
            prefix="t",
        ),
    ]


def _learn_request(examples: list[LearnedExample]) -> classifier_pb2.LearnExamplesRequest:
    return classifier_pb2.LearnExamplesRequest(
        examples=[example_to_proto(e) for e in examples], model_set_version=MODEL_SET
    )


def _forget(ids: Sequence[str] = (), taxon: str = "") -> classifier_pb2.ForgetExamplesRequest:
    return classifier_pb2.ForgetExamplesRequest(
        example_ids=list(ids), taxon_id=taxon, model_set_version=MODEL_SET
    )


def _assert_same(a: TinyEnsemble, b: TinyEnsemble) -> None:
    assert list(a.layout.row_taxon) == list(b.layout.row_taxon)
    assert np.array_equal(a.weights, b.weights)
    assert np.array_equal(a.bias, b.bias)
    assert a.learned_taxa == b.learned_taxa
    assert a.learned_examples == b.learned_examples


def test_forget_gives_the_weights_of_an_ensemble_that_never_learned_it(
    servicer: TinyServicer, base: TinyEnsemble, space: Space
) -> None:
    history = _history(space)

    async def body() -> None:
        await servicer.Learn(_learn_request(history[:4]), None)
        await servicer.Learn(_learn_request(history[4:]), None)
        r = await servicer.Forget(_forget(["n1", "s0", "never-learned"]), None)
        assert (r.forgotten, list(r.removed_taxa), r.learned_total) == (2, [], 5)

    asyncio.run(body())
    never = base.copy()
    never.learn([e for e in history if e.id not in ("n1", "s0")])
    _assert_same(servicer.ensemble, never)
    assert servicer.ensemble.label_of("n1") is None and servicer.ensemble.label_of("n0") == NEW


def test_forgetting_every_example_of_a_learned_taxon_removes_it(
    servicer: TinyServicer, base: TinyEnsemble, space: Space
) -> None:
    history = _history(space)

    async def body() -> None:
        await servicer.Learn(_learn_request(history), None)
        served_before = servicer.ensemble
        r = await servicer.Forget(_forget(taxon="learned/b3"), None)
        assert (r.forgotten, list(r.removed_taxa), r.learned_total) == (2, ["learned/b3"], 5)
        # Classify calls holding the old ensemble keep a consistent one.
        assert "learned/b3" in served_before.taxonomy
        d = await servicer.Describe(classifier_pb2.DescribeRequest(), None)
        assert [t.id for t in d.learned_taxa] == [NEW]
        c = await servicer.Classify(
            classifier_pb2.CategoryRequest(
                category="broad/b", embedding=space.sample(space.mean("b1"), 1, seed=3)[0].tolist()
            ),
            None,
        )
        assert {s.taxon_id for s in c.scores} == {"b1", "b2"}
        # The other learned taxon goes the same way when its last example goes by id.
        r = await servicer.Forget(_forget(["n0", "n1", "n2"]), None)
        assert (r.forgotten, list(r.removed_taxa)) == (3, [NEW])

    asyncio.run(body())
    ens = servicer.ensemble
    for taxon in ("learned/b3", NEW):
        assert taxon not in ens.taxonomy and taxon not in set(map(str, ens.layout.row_taxon))
    never = base.copy()
    never.learn([e for e in history if e.taxon_id == "a4"])
    _assert_same(ens, never)
    assert list(ens.layout.row_taxon) == list(base.layout.row_taxon)


def test_forget_is_idempotent_and_relearning_afterwards_works(
    servicer: TinyServicer, space: Space
) -> None:
    history = _history(space)

    async def body() -> None:
        await servicer.Learn(_learn_request(history), None)
        first = await servicer.Forget(_forget(["t0", "t1"]), None)
        assert (first.forgotten, list(first.removed_taxa)) == (2, ["learned/b3"])
        lines = servicer.journal.path.read_bytes().count(b"\n")
        served = servicer.ensemble
        for again in (_forget(["t0", "t1"]), _forget(taxon="learned/b3")):
            r = await servicer.Forget(again, None)
            assert (r.forgotten, list(r.removed_taxa), r.learned_total) == (0, [], 5)
        # Nothing was written or rebuilt for a Forget of what is not there.
        assert servicer.journal.path.read_bytes().count(b"\n") == lines
        assert servicer.ensemble is served
        relearned = await servicer.Learn(_learn_request(history[5:]), None)
        assert (relearned.applied, relearned.duplicates, relearned.learned_total) == (2, 0, 7)

    asyncio.run(body())
    assert "learned/b3" in servicer.ensemble.learned_taxa


def test_a_restart_replays_learns_and_forgets_to_the_same_weights(
    servicer: TinyServicer, tax: Taxonomy, base: TinyEnsemble, space: Space
) -> None:
    history = _history(space)

    async def body() -> None:
        await servicer.Learn(_learn_request(history), None)
        await servicer.Forget(_forget(["n0", "t1"]), None)
        await servicer.Learn(_learn_request(history[:1]), None)  # n0 again, learned last
        await servicer.Forget(_forget(taxon="learned/b3"), None)

    asyncio.run(body())
    journal = KnowledgeJournal(servicer.journal.path, MODEL_SET, EMB_VERSION)
    restarted = TinyServicer.restored(_model_set(tax), base, journal)
    _assert_same(restarted.ensemble, servicer.ensemble)
    assert [e.id for e in journal.replay()] == ["n1", "n2", "s0", "s1", "n0"]


def test_forget_refuses_bad_requests(servicer: TinyServicer) -> None:
    async def body() -> None:
        with pytest.raises(InvalidInput, match="model_set_version"):
            await servicer.Forget(classifier_pb2.ForgetExamplesRequest(example_ids=["x"]), None)
        with pytest.raises(FailedPrecondition, match="ms-o"):
            other = _forget(["x"])
            other.model_set_version = "ms-o"
            await servicer.Forget(other, None)
        with pytest.raises(InvalidInput, match="only learned taxa"):
            await servicer.Forget(_forget(taxon="a4"), None)
        with pytest.raises(InvalidInput, match="name the example ids"):
            await servicer.Forget(_forget(), None)

    asyncio.run(body())


def test_a_servicer_without_its_trained_base_refuses_a_learned_ensemble(
    tax: Taxonomy, base: TinyEnsemble, space: Space, tmp_path: Path
) -> None:
    learned = base.copy()
    learned.learn(_history(space))
    journal = KnowledgeJournal.for_model_set(tmp_path, "tiny", MODEL_SET, EMB_VERSION)
    with pytest.raises(ValueError, match="base"):
        TinyServicer(_model_set(tax), learned, journal)


def test_the_specialist_answers_unimplemented_to_learn_and_forget() -> None:
    from fieldlens.common.errors import Unimplemented
    from fieldlens.specialist.servicer import SpecialistServicer

    specialist = SpecialistServicer(None, None)  # type: ignore[arg-type]

    async def body() -> None:
        with pytest.raises(Unimplemented, match="a specialist does not learn online"):
            await specialist.Learn(classifier_pb2.LearnExamplesRequest(), None)
        with pytest.raises(Unimplemented, match="so it has nothing to forget"):
            await specialist.Forget(classifier_pb2.ForgetExamplesRequest(), None)

    asyncio.run(body())


# -- the journal's forget records ----------------------------------------------------------------
def test_journal_replay_applies_forget_records_and_drops_a_torn_last_line(
    tmp_path: Path, space: Space
) -> None:
    journal = KnowledgeJournal.for_model_set(tmp_path, "tiny", MODEL_SET, EMB_VERSION)
    examples = _examples(space.sample(space.mean(NEW, "node/a/z"), 3, seed=7))
    journal.append(examples)
    journal.append([ForgetRecord(("n0", "n2"), "")])
    journal.append(examples[2:])  # n2 learned again after its forget
    with journal.path.open("ab") as f:  # a crash mid-append of a forget record
        f.write(b'{"forget":["n1"],"tax')
    reopened = KnowledgeJournal.for_model_set(tmp_path, "tiny", MODEL_SET, EMB_VERSION)
    assert [e.id for e in reopened.replay()] == ["n1", "n2"]
    kinds = [type(r).__name__ for r in reopened.records()]
    assert kinds == ["LearnedExample"] * 3 + ["ForgetRecord", "LearnedExample"]
    reopened.append([ForgetRecord(("n1",), NEW)])
    assert [e.id for e in reopened.replay()] == ["n2"]
    assert list(reopened.records())[-1] == ForgetRecord(("n1",), NEW)
    assert forgotten_ids(list(reopened.records())) == ["n0", "n1"]


def test_still_learned_keeps_a_taxon_whose_creating_example_is_forgotten(space: Space) -> None:
    vectors = space.sample(space.mean(NEW, "node/a/z"), 2, seed=7)
    spec = NewTaxonSpec(NEW, "a six", "node/a/z")
    # An older journal: only the first example carried the new taxon.
    records = [
        LearnedExample("n0", NEW, vectors[0], spec),
        LearnedExample("n1", NEW, vectors[1]),
        ForgetRecord(("n0",)),
    ]
    (kept,) = still_learned(records)
    assert (kept.id, kept.new_taxon) == ("n1", spec)


def test_forgets_count_across_the_journals_of_older_model_sets(
    tmp_path: Path, space: Space
) -> None:
    vectors = space.sample(space.mean("a4"), 3, seed=9)
    a, b, c = (LearnedExample(f"{k}", "a4", v) for k, v in zip("abc", vectors, strict=True))
    one = KnowledgeJournal.for_model_set(tmp_path, "router", "ms-1", EMB_VERSION)
    two = KnowledgeJournal.for_model_set(tmp_path, "router", "ms-2", EMB_VERSION)
    three = KnowledgeJournal.for_model_set(tmp_path, "router", "ms-3", EMB_VERSION)
    one.append([a, b, c])
    two.append([a, ForgetRecord(("a", "b"))])  # forgotten while ms-2 served
    three.append([b])  # b learned again later, under ms-3
    assert list(still_learned_across([one, two, three])) == ["c", "b"]
    assert [j.model_set_version for j in three.others()] == ["ms-1", "ms-2"]


def test_new_taxa_scored_upstream_leave_the_trained_classes_as_they_were(
    base: TinyEnsemble, space: Space
) -> None:
    """When the router puts learned taxa into the broad net's softmax, the tiny ensemble's
    trained classes answer exactly as if nothing was learned: the new row takes no probability
    from its siblings, is not scored, and its examples nudge no trained row."""
    x = space.sample(space.mean("a4"), 20, seed=7)
    quiet = base.copy()
    quiet.learned_scored_upstream = True
    before = {b: quiet.group_top(x, b, 0, [0.0] * len(x)) for b in base.taxonomy.broad_ids}
    quiet.learn(_examples(space.sample(space.mean(NEW, "node/a/z"), 5, seed=3)))
    assert NEW in quiet.learned_taxa  # kept: Describe, Forget and replay know it
    after = {b: quiet.group_top(x, b, 0, [0.0] * len(x)) for b in quiet.taxonomy.broad_ids}
    assert after == before
    loud = base.copy()  # the default: scored here, trained rows nudged
    loud.learn(_examples(space.sample(space.mean(NEW, "node/a/z"), 5, seed=3)))
    scored = loud.group_top(x, "broad/a", 0, [0.0] * len(x))
    assert any(t == NEW for row, _ in scored for t, *_ in row)
    assert scored != before["broad/a"]


def test_a_replica_that_was_down_adopts_what_a_serving_peer_holds(
    servicer: TinyServicer, tax: Taxonomy, base: TinyEnsemble, space: Space, tmp_path: Path
) -> None:
    history = _history(space)
    stray = _examples(space.sample(space.mean("a4"), 1, seed=11), "a4", None, prefix="x")
    peer = TinyServicer(
        _model_set(tax),
        base.copy(),
        KnowledgeJournal.for_model_set(tmp_path / "peer", "tiny", MODEL_SET, EMB_VERSION),
    )

    async def body() -> tuple[int, int]:
        await peer.Learn(_learn_request(history), None)
        await peer.Forget(_forget(["n1"]), None)
        # The replica that was down: it holds what the peer forgot since, and something the
        # peer never held (a write acknowledged by nobody), and lacks the rest.
        await servicer.Learn(_learn_request([history[1], *stray]), None)
        export = await peer.ExportKnowledge(
            classifier_pb2.ExportKnowledgeRequest(model_set_version=MODEL_SET), None
        )
        return await servicer.adopt([example_from_proto(e) for e in export.examples], True)

    learned, forgotten = asyncio.run(body())
    assert (learned, forgotten) == (len(history) - 1, 2)
    held = {e.id: e.taxon_id for e in servicer.journal.replay()}
    assert held == {e.id: e.taxon_id for e in peer.journal.replay()}
    assert "n1" not in held and "x0" not in held
    assert servicer.ensemble.learned_taxa == peer.ensemble.learned_taxa
    # Adding only (the periodic catch-up): nothing is forgotten.
    extra = _examples(space.sample(space.mean("a4"), 1, seed=12), "a4", None, prefix="y")
    asyncio.run(servicer.Learn(_learn_request(extra), None))
    assert asyncio.run(servicer.adopt(list(peer.journal.replay()), False)) == (0, 0)
    assert servicer.ensemble.label_of("y0") == "a4"


def test_export_needs_the_served_model_set(servicer: TinyServicer) -> None:
    with pytest.raises(FailedPrecondition, match="this service learns for"):
        asyncio.run(
            servicer.ExportKnowledge(
                classifier_pb2.ExportKnowledgeRequest(model_set_version="ms-other"), None
            )
        )
