"""The Classifier services' shared response shaping and the specialist's rollup."""

from __future__ import annotations

import numpy as np
import pytest

from fieldlens.common.taxonomy import Taxon, Taxonomy
from fieldlens.specialist.servicer import Rollup
from fieldlens.tiny.servicer import to_response
from fieldlens.v1 import classifier_pb2


@pytest.fixture
def taxonomy() -> Taxonomy:
    taxa = [
        Taxon("root", "root", "root", None, 0),
        Taxon("domain/animal", "animal", "domain", "root", 1),
        Taxon("broad/insect", "insect", "broad", "domain/animal", 2),
        Taxon("node/insect/beetle", "beetle", "node", "broad/insect", 3),
        Taxon("a", "ladybug", "class", "node/insect/beetle", 4),
        Taxon("b", "weevil", "class", "node/insect/beetle", 4),
        Taxon("c", "bee", "class", "broad/insect", 3),
    ]
    return Taxonomy(taxa, ["broad/insect"], ["a", "b", "c"])


def test_rollup_sums_leaves_into_their_ancestors(taxonomy: Taxonomy) -> None:
    rollup = Rollup(taxonomy, "broad/insect", ("c", "a", "b"))
    (scored,) = rollup.scores(np.array([[0.5, 0.3, 0.2]]))
    scores = {t: (p, leaf) for t, p, leaf in scored}
    assert scores["c"] == (pytest.approx(0.5), True)
    assert scores["a"] == (pytest.approx(0.3), True)
    assert scores["node/insect/beetle"] == (pytest.approx(0.5), False)
    assert "broad/insect" not in scores  # the category itself is implied (probability 1)


def test_to_response_keeps_top_k_leaves_and_every_internal_node() -> None:
    scores = [("a", 0.3, True), ("b", 0.2, True), ("c", 0.5, True), ("n", 0.5, False)]
    r = to_response("broad/insect", scores, 2, classifier_pb2.TINY, "v")
    ids = [s.taxon_id for s in r.scores]
    assert set(ids) == {"c", "a", "n"}
    probs = [s.probability for s in r.scores]
    assert probs == sorted(probs, reverse=True)
    assert r.served_by == classifier_pb2.TINY
    assert len(to_response("x", scores, 0, classifier_pb2.TINY, "v").scores) == 4
