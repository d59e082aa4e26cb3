"""learn-eval's figures from what a cluster answered: recall, precision, base-class cost."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fieldlens.common.taxonomy import Taxonomy
from fieldlens.learn_eval import Seen, _metrics


def _taxonomy() -> Taxonomy:
    classes = [
        SimpleNamespace(
            wnid=w,
            name=w,
            broad=b,
            domain="animal",
            wordnet_path=("animal", b, f"{b}-{'x' if i % 2 else 'y'}", w),
        )
        for i, (w, b) in enumerate(
            [("c1", "cat"), ("c2", "cat"), ("c3", "cat"), ("d1", "dog"), ("d2", "dog")]
        )
    ]
    return Taxonomy.from_classes(classes)


def _seen(*top: str, answer: str = "root", depth: int = 0) -> Seen:
    return Seen(tuple(top), answer, depth)


def test_recall_precision_and_the_cost_to_trained_classes() -> None:
    tax = _taxonomy()
    classes = [{"wnid": "n1", "name": "lion", "broad": "broad/cat", "parent": "broad/cat"}]
    taxon_of = {"n1": "learned/lion"}
    truth = ["c1", "c1", "c2", "c3", "d1", "d2"]
    before = [_seen("c1"), _seen("c1"), _seen("c2"), _seen("c1"), _seen("d1"), _seen("d1")]
    # After: the lion takes one cat photo (c2's) and one dog photo; c3's photo was wrong anyway.
    after = [
        _seen("c1"),
        _seen("c1"),
        _seen("learned/lion", "c2"),
        _seen("c1"),
        _seen("learned/lion"),
        _seen("d1"),
    ]
    novel_truth = ["n1"] * 4
    novel_seen = [
        _seen("learned/lion"),
        _seen("learned/lion"),
        _seen("c1", "learned/lion"),
        _seen("c2"),
    ]
    m = _metrics(tax, truth, before, after, novel_truth, novel_seen, classes, taxon_of)
    (row,) = m["classes"]
    assert row["recall_at_1"] == 0.5 and row["recall_at_5"] == 0.75
    assert row["claimed_trained_photos"] == 2 and row["claimed_in_group"] == 1
    assert row["precision"] == pytest.approx(2 / 4)  # 2 right of 4 answers naming it
    assert row["precision_in_group"] == pytest.approx(2 / 3)
    assert m["trained_top1_before"] == pytest.approx(4 / 6)
    assert m["trained_top1_after"] == pytest.approx(2 / 6)
    # c1: named 4 times (3 split photos + 1 novel), right twice; c2: named once (a novel
    # photo), never right; d1: named once (d2's photo), never right.
    assert m["trained_mean_precision"] == pytest.approx((2 / 4 + 0 + 0) / 3)
    assert m["harmonic_mean"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    (group,) = m["affected_groups"]
    assert (group["broad"], group["photos"]) == ("broad/cat", 4)
    assert (group["top1_before"], group["top1_after"]) == (0.75, 0.5)


def test_the_best_effort_answer_is_right_when_the_class_is_at_or_below_it() -> None:
    tax = _taxonomy()
    classes = [{"wnid": "n1", "name": "lion", "broad": "broad/cat", "parent": "broad/cat"}]
    truth = ["c1", "c2", "d1"]
    seen = [
        _seen("c1", answer="broad/cat", depth=2),
        _seen("c1", answer="c1", depth=4),  # wrong leaf
        _seen("d1", answer="root", depth=0),
    ]
    m = _metrics(tax, truth, seen, seen, ["n1"], [_seen("c1")], classes, {"n1": "learned/lion"})
    assert m["answer_after"]["precision"] == pytest.approx(2 / 3)
    assert m["answer_after"]["mean_depth"] == pytest.approx(2.0)
    assert m["classes"][0]["precision"] is None  # never named
