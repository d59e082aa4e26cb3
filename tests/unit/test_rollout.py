"""Rollouts: the canary choice by content hash, shadow comparisons by taxonomy level, the bound
on shadow calls, and the rollout's state in the model store and in ModelSets."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from small_tree import CLASSES

from fieldlens.common import model_store
from fieldlens.common.errors import FailedPrecondition, InvalidInput
from fieldlens.common.model_store import RolloutState
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.common.telemetry import Metrics
from fieldlens.router import model_sets as model_sets_module
from fieldlens.router.dataplane import Classification, ClassifyOptions, Dispatch
from fieldlens.router.imaging import ImageLimits
from fieldlens.router.merge import Suggestion
from fieldlens.router.model_sets import ModelSets
from fieldlens.router.rollout import (
    Rollout,
    agreement_depth,
    canary_point,
    canary_serves,
    compare,
)

TAXONOMY = Taxonomy.from_classes(CLASSES)
OPTIONS = ClassifyOptions(top_k=5, neighbours=1, threshold=0.5)


def _digests(n: int) -> list[str]:
    return [hashlib.sha256(os.urandom(32)).hexdigest() for _ in range(n)]


# -- canary ------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [0.01, 0.1, 0.2, 0.5, 0.9])
def test_the_canary_takes_its_weight_of_images_within_three_points(weight: float):
    digests = _digests(20_000)
    share = sum(canary_serves(d, weight) for d in digests) / len(digests)
    assert abs(share - weight) <= 0.03, share


def test_the_canary_choice_is_stable_per_image_and_monotone_in_the_weight():
    digests = _digests(2_000)
    first = [canary_serves(d, 0.3) for d in digests]
    assert first == [canary_serves(d, 0.3) for d in digests]  # one photo, one set
    for d, chosen in zip(digests, first, strict=True):
        if chosen:  # raising the weight only moves images over, never back
            assert canary_serves(d, 0.5)
    assert not any(canary_serves(d, 0.0) for d in digests)
    assert all(canary_serves(d, 1.0) for d in digests)
    assert 0.0 <= min(map(canary_point, digests)) and max(map(canary_point, digests)) < 1.0


# -- comparison --------------------------------------------------------------------------------
def _answer(top1: str, answer: str | None = None, broad: str | None = None) -> Classification:
    return Classification(
        answer_id=answer or top1,
        answer_probability=0.9,
        suggestions=[Suggestion(top1, 0.9, "tiny")],
        dispatch=[Dispatch(broad or TAXONOMY.path(top1)[2], 0.9, "tiny", False)],
    )


def test_agreement_depth_is_the_last_shared_level():
    assert agreement_depth(["r", "a", "b"], ["r", "a", "c"]) == 1
    assert agreement_depth(["r", "a"], ["r", "a"]) == 1
    assert agreement_depth(["r"], ["s"]) == -1


@pytest.mark.parametrize(
    ("a", "b", "depth"),
    [
        ("a1", "a1", 4),  # root > domain > broad/a > x > a1: the leaf itself
        ("a1", "a2", 3),  # siblings under node x
        ("a4", "a5", 4),  # siblings under node z, one level deeper
        ("a1", "a4", 2),  # the same broad group only
        ("a1", "b1", 1),  # the same domain only
    ],
)
def test_shadow_comparison_levels_on_a_small_taxonomy(a: str, b: str, depth: int):
    c = compare(_answer(a), TAXONOMY, _answer(b), TAXONOMY)
    assert c.top1 == (a == b)
    assert c.best_effort == (a == b)
    assert c.top1_depth == depth
    assert c.broad == (TAXONOMY.broad_of(a) == TAXONOMY.broad_of(b))


def test_best_effort_answers_compare_at_the_level_they_stop():
    # Same top-1 leaf, but the candidate's best-effort answer stops at the broad group.
    c = compare(_answer("a4"), TAXONOMY, _answer("a4", answer="broad/a"), TAXONOMY)
    assert (c.top1, c.best_effort, c.broad) == (True, False, True)
    assert c.best_effort_depth == TAXONOMY.get("broad/a").depth
    # A taxon one set does not know (learned under it only) is compared by id alone.
    c = compare(_answer("a1", answer="learned/x"), TAXONOMY, _answer("a1"), TAXONOMY)
    assert (c.best_effort, c.best_effort_depth) == (False, 0)


# -- shadow calls ------------------------------------------------------------------------------
class _Plane:
    """A data plane as a rollout uses it: answers `answers[image]`, optionally after `gate`."""

    def __init__(self, version: str, metrics: Metrics, answers: dict[bytes, str]) -> None:
        self.model_set = SimpleNamespace(
            version=version, taxonomy=TAXONOMY, embedding_version="e1", broad_model="broad"
        )
        self.metrics = metrics
        self.limits = ImageLimits(1 << 20, 1 << 24)
        self.answers = answers
        self.gate: asyncio.Event | None = None
        self.calls = 0
        self.store = None

    async def classify(
        self, image: bytes, options: ClassifyOptions, digest: str | None = None
    ) -> Classification:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        result = _answer(self.answers[image])
        result.model_set_version = self.model_set.version
        return result

    def resolve(self, *args: object) -> ClassifyOptions:
        return OPTIONS


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _planes(answers_now: dict[bytes, str], answers_next: dict[bytes, str]):
    metrics = Metrics(CollectorRegistry())
    return metrics, _Plane("now", metrics, answers_now), _Plane("next", metrics, answers_next)


def test_shadow_calls_past_the_bound_are_dropped_and_counted():
    images = {bytes([i]): "a1" for i in range(5)}
    metrics, now, candidate = _planes(images, images)

    async def body() -> None:
        candidate.gate = asyncio.Event()
        rollout = Rollout(candidate, RolloutState("next", 0.0, 1.0), max_in_flight=2)
        for image in images:
            # Every request is shadowed; the caller never waits for the candidate.
            plane, _, answer = await asyncio.wait_for(
                rollout.classify(now, image, lambda p: OPTIONS), timeout=1
            )
            assert plane is now and answer.model_set_version == "now"
        assert rollout.shadows_in_flight == 2
        assert _value(metrics, "fieldlens_rollout_shadow_dropped_total", candidate="next") == 3
        candidate.gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert rollout.shadows_in_flight == 0
        assert candidate.calls == 2  # the dropped ones never reached it

    asyncio.run(body())
    assert _value(metrics, "fieldlens_rollout_shadow_comparisons_total", candidate="next") == 2
    assert (
        _value(
            metrics, "fieldlens_rollout_requests_total", candidate="next", arm="current", code="OK"
        )
        == 5
    )


def test_shadow_comparisons_are_counted_by_answer_and_level():
    now_answers = {b"same": "a1", b"sibling": "a4", b"other": "a1"}
    next_answers = {b"same": "a1", b"sibling": "a5", b"other": "b1"}
    metrics, now, candidate = _planes(now_answers, next_answers)

    async def body() -> None:
        rollout = Rollout(candidate, RolloutState("next", 0.0, 1.0))
        for image in now_answers:
            await rollout.classify(now, image, lambda p: OPTIONS)
        for _ in range(10):
            await asyncio.sleep(0)

    asyncio.run(body())
    c = "next"
    assert _value(metrics, "fieldlens_rollout_shadow_comparisons_total", candidate=c) == 3
    agreed = {
        a: _value(metrics, "fieldlens_rollout_shadow_agreements_total", candidate=c, answer=a)
        for a in ("top1", "best_effort", "broad")
    }
    assert agreed == {"top1": 1, "best_effort": 1, "broad": 2}
    depths = {
        d: _value(
            metrics,
            "fieldlens_rollout_shadow_agreement_depth_total",
            candidate=c,
            answer="top1",
            depth=str(d),
        )
        for d in range(6)
    }
    assert depths == {0: 0, 1: 1, 2: 0, 3: 0, 4: 2, 5: 0}  # b1/a1: domain; a4/a5: z; a1: leaf
    # The confusion by broad group: "same" and "sibling" stay in broad/a, "other" moves to b.
    pairs = {
        (s.labels["current_broad"], s.labels["candidate_broad"]): s.value
        for family in metrics.registry.collect()
        if family.name == "fieldlens_rollout_shadow_broad_pairs"
        for s in family.samples
        if s.name.endswith("_total") and s.labels["candidate"] == c
    }
    assert pairs == {
        (TAXONOMY.broad_of("a1"), TAXONOMY.broad_of("a1")): 2,
        (TAXONOMY.broad_of("a1"), TAXONOMY.broad_of("b1")): 1,
    }
    assert (
        _value(metrics, "fieldlens_rollout_request_seconds_count", candidate=c, arm="shadow") == 3
    )


def test_the_canary_arm_serves_from_the_candidate_and_is_not_shadowed():
    images = {hashlib.sha256(bytes([i])).digest(): "a1" for i in range(200)}
    metrics, now, candidate = _planes(images, images)

    async def body() -> dict[str, int]:
        rollout = Rollout(candidate, RolloutState("next", 0.25, 1.0))
        served: dict[str, int] = {"now": 0, "next": 0}
        for image in images:
            plane, _, answer = await rollout.classify(now, image, lambda p: OPTIONS)
            assert answer.model_set_version == plane.model_set.version
            served[answer.model_set_version] += 1
        for _ in range(10):
            await asyncio.sleep(0)
        return served

    served = asyncio.run(body())
    assert 30 <= served["next"] <= 70  # 25% of 200, by content hash
    comparisons = _value(metrics, "fieldlens_rollout_shadow_comparisons_total", candidate="next")
    dropped = _value(metrics, "fieldlens_rollout_shadow_dropped_total", candidate="next")
    assert comparisons + dropped == served["now"]  # only the current set's answers
    assert candidate.calls == served["next"] + comparisons


# -- the rollout's state -----------------------------------------------------------------------
def test_rollout_state_round_trips_through_the_store(tmp_path: Path):
    assert model_store.rollout(tmp_path) is None
    state = RolloutState("ms-next", 0.1, 0.2)
    model_store.set_rollout(tmp_path, state)
    assert model_store.rollout(tmp_path) == state
    model_store.set_rollout(tmp_path, None)
    assert model_store.rollout(tmp_path) is None
    model_store.set_rollout(tmp_path, None)  # idempotent
    (tmp_path / model_store.ROLLOUT).write_text("{not json")
    with pytest.raises(FailedPrecondition, match="malformed"):
        model_store.rollout(tmp_path)


@pytest.mark.parametrize(
    ("weight", "fraction"), [(-0.1, 0.0), (1.5, 0.0), (0.0, 2.0), (float("nan"), 0.0)]
)
def test_rollout_shares_outside_zero_to_one_are_refused(weight: float, fraction: float):
    with pytest.raises(InvalidInput):
        RolloutState("ms-next", weight, fraction)


def _model_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unloaded: list[list[str]] | None = None
) -> ModelSets:
    """ModelSets over fake planes; candidates load at once, unloaded nets land in `unloaded`."""
    metrics = Metrics(CollectorRegistry())
    serving = _Plane("now", metrics, {})
    backends = SimpleNamespace(
        settings=SimpleNamespace(common=SimpleNamespace(model_store=tmp_path), triton_addr="t")
    )
    unloaded = [] if unloaded is None else unloaded

    async def load(self: ModelSets, version: str) -> _Plane:
        return _Plane(version, metrics, {})

    async def unload(addr: str, names: list[str]) -> None:
        unloaded.append(names)

    monkeypatch.setattr(ModelSets, "_load_candidate", load)
    monkeypatch.setattr(model_sets_module, "unload_nets", unload)
    monkeypatch.setattr(model_sets_module, "nets_of", lambda ms: [f"broad__{ms.version}"])
    sets = ModelSets(backends, serving, lambda p: None)  # type: ignore[arg-type]
    sets.retire_after_s = 0.0
    return sets


def test_a_rollout_is_persisted_followed_and_aborted(tmp_path: Path, monkeypatch):
    unloaded: list[list[str]] = []
    sets = _model_sets(tmp_path, monkeypatch, unloaded)

    async def body() -> None:
        with pytest.raises(FailedPrecondition, match="current"):
            await sets.set_rollout(RolloutState("now", 0.1, 0.0))
        await sets.set_rollout(RolloutState("next", 0.1, 0.0))
        assert model_store.rollout(tmp_path) == RolloutState("next", 0.1, 0.0)
        plane = sets.rollout.plane  # type: ignore[union-attr]
        assert await sets.set_rollout(RolloutState("next", 0.1, 0.2)) == 0.0  # same candidate
        assert sets.rollout.plane is plane  # type: ignore[union-attr]
        with pytest.raises(FailedPrecondition, match="promote or abort"):
            await sets.set_rollout(RolloutState("other", 0.1, 0.0))

        # Another replica (or this one after a restart) takes the stored rollout up.
        follower = _model_sets(tmp_path, monkeypatch, unloaded)
        await follower.follow_rollout()
        assert follower.rollout is not None
        assert follower.rollout.state == RolloutState("next", 0.1, 0.2)

        assert await sets.abort() == "next"
        assert sets.rollout is None and model_store.rollout(tmp_path) is None
        await asyncio.sleep(0.01)
        assert unloaded == [["broad__next"]]
        assert await sets.abort() == ""  # idempotent
        await follower.follow_rollout()  # the abort reaches the other replica
        assert follower.rollout is None
        await asyncio.sleep(0.01)
        assert unloaded == [["broad__next"]] * 2

    asyncio.run(body())


def test_a_stored_rollout_of_the_current_set_is_over(tmp_path: Path, monkeypatch):
    # Promoted, then killed before the store's rollout record went: nothing to roll out.
    model_store.set_rollout(tmp_path, RolloutState("now", 0.5, 0.5))
    sets = _model_sets(tmp_path, monkeypatch)
    asyncio.run(sets.follow_rollout())
    assert sets.rollout is None
