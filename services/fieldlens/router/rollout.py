"""A candidate model set next to the serving one: canary traffic, shadow traffic, comparison.

During a rollout the router holds two data planes: the current set's, which serves, and the
candidate's (loaded the way a switch loads a set). Two knobs decide what the candidate sees:

- canary weight w: an image whose content hash falls under w is answered by the candidate
  instead. The choice is a function of the image bytes alone, so one photo always gets the
  same set (and its cached answer, whose key names the set, stays valid);
- shadow fraction f: a random share f of the other requests is also answered by the candidate,
  on a task the caller never waits for, and the two answers are compared. At most
  `max_in_flight` shadow calls run at once; one more is dropped (and counted), never queued, so
  shadowing never makes the caller slower or piles up work under load.

The comparison asks not only "same top-1?" but "down to which taxonomy level do the two
answers agree?", which a hierarchical classifier allows.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fieldlens.common.errors import FieldlensError
from fieldlens.common.model_store import RolloutState
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.router.imaging import checked_hash

if TYPE_CHECKING:
    from fieldlens.router.dataplane import Classification, ClassifyOptions, RouterDataPlane

logger = logging.getLogger(__name__)

# Shadow calls in flight at once; more are dropped. A shadow call costs about what a request
# costs, so this bounds the extra load a rollout can put on the backends.
DEFAULT_SHADOW_IN_FLIGHT = 8
# Hex digits of the content hash read for the canary choice: 64 bits, uniform for SHA-256.
_CANARY_DIGITS = 16
_CANARY_SPAN = float(16**_CANARY_DIGITS)

Resolve = Callable[["RouterDataPlane"], "ClassifyOptions"]


def canary_point(digest: str) -> float:
    """Where an image falls in [0, 1): the first 64 bits of its content hash (hex)."""
    return int(digest[:_CANARY_DIGITS], 16) / _CANARY_SPAN


def canary_serves(digest: str, weight: float) -> bool:
    """Whether the candidate answers the image with this content hash at canary `weight`:
    stable per image, and monotone in the weight (raising it only moves images over)."""
    return canary_point(digest) < weight


@dataclass(frozen=True)
class Comparison:
    """How a current answer and the candidate's answer to the same request compare."""

    top1: bool
    best_effort: bool
    broad: bool
    # Depth of the deepest taxon both top-1 suggestions' paths share (Taxon.depth: 0 the root,
    # 1 a domain, 2 a broad group, the leaves deepest).
    top1_depth: int
    # Deepest level both best-effort answers share.
    best_effort_depth: int
    # The most probable broad group of each answer ("" when an answer has none): the cells of
    # the confusion between the two sets by broad group.
    current_broad: str = ""
    candidate_broad: str = ""


def _path(taxonomy: Taxonomy, taxon_id: str) -> list[str]:
    try:
        return taxonomy.path(taxon_id)
    except KeyError:  # a learned taxon forgotten meanwhile: compare by id alone
        return [taxon_id]


def agreement_depth(a: list[str], b: list[str]) -> int:
    """Deepest level at which two root-first paths agree: the depth of their last shared taxon
    (0: the root only; -1: not even the root)."""
    depth = -1
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        depth += 1
    return depth


def compare(
    current: Classification,
    current_taxonomy: Taxonomy,
    candidate: Classification,
    candidate_taxonomy: Taxonomy,
) -> Comparison:
    """Compares two answers to one request, each read against its own set's taxonomy."""
    top_a = current.suggestions[0].taxon_id if current.suggestions else ""
    top_b = candidate.suggestions[0].taxon_id if candidate.suggestions else ""
    broad_a = current.dispatch[0].category if current.dispatch else ""
    broad_b = candidate.dispatch[0].category if candidate.dispatch else ""
    return Comparison(
        top1=top_a == top_b,
        best_effort=current.answer_id == candidate.answer_id,
        broad=broad_a == broad_b,
        top1_depth=max(
            0, agreement_depth(_path(current_taxonomy, top_a), _path(candidate_taxonomy, top_b))
        ),
        best_effort_depth=max(
            0,
            agreement_depth(
                _path(current_taxonomy, current.answer_id),
                _path(candidate_taxonomy, candidate.answer_id),
            ),
        ),
        current_broad=broad_a,
        candidate_broad=broad_b,
    )


class Rollout:
    """A candidate set's plane and the traffic it gets; replaced, never mutated, except for
    `state` (an assignment), so a request keeps what it read.

    Args:
        plane: The candidate's data plane.
        state: Its canary weight and shadow fraction.
        max_in_flight: Shadow calls in flight at once; more are dropped.
        sample: Draws the shadow choice, uniform in [0, 1) (tests pass their own).
    """

    def __init__(
        self,
        plane: RouterDataPlane,
        state: RolloutState,
        max_in_flight: int = DEFAULT_SHADOW_IN_FLIGHT,
        sample: Callable[[], float] = random.random,
    ) -> None:
        if state.candidate != plane.model_set.version:
            raise ValueError(f"plane serves {plane.model_set.version}, not {state.candidate}")
        self.plane = plane
        self.state = state
        self.max_in_flight = max_in_flight
        self._sample = sample
        self._shadows: set[asyncio.Task[None]] = set()
        self.metrics = plane.metrics
        self.metrics.record_rollout(state.candidate, state.canary_weight, state.shadow_fraction)

    @property
    def candidate(self) -> str:
        return self.state.candidate

    @property
    def shadows_in_flight(self) -> int:
        return len(self._shadows)

    def update(self, state: RolloutState) -> None:
        """New weight and fraction for the same candidate."""
        if state.candidate != self.candidate:
            raise ValueError(f"rollout of {self.candidate} cannot become one of {state.candidate}")
        self.state = state
        self.metrics.record_rollout(state.candidate, state.canary_weight, state.shadow_fraction)

    async def classify(
        self, serving: RouterDataPlane, image: bytes, resolve: Resolve
    ) -> tuple[RouterDataPlane, ClassifyOptions, Classification]:
        """Answers one request from the set its image falls to, and maybe shadows it; returns
        the plane that answered, the options it resolved, and its answer.

        `resolve` turns the request's options into a plane's own (its default threshold, its
        min_precision curve), so the candidate answers as it would once promoted.
        """
        state = self.state
        digest = checked_hash(image, serving.limits)
        canary = canary_serves(digest, state.canary_weight)
        plane = self.plane if canary else serving
        arm = "canary" if canary else "current"
        options = resolve(plane)
        started = time.perf_counter()
        code = "INTERNAL"
        try:
            result = await plane.classify(image, options, digest=digest)
            code = "OK"
        except FieldlensError as exc:
            code = exc.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.metrics.record_rollout_request(
                state.candidate, arm, code, time.perf_counter() - started
            )
        if not canary and state.shadow_fraction > 0 and self._sample() < state.shadow_fraction:
            self.shadow(serving, result, image, digest, resolve)
        return plane, options, result

    def shadow(
        self,
        serving: RouterDataPlane,
        answer: Classification,
        image: bytes,
        digest: str,
        resolve: Resolve,
    ) -> None:
        """Has the candidate answer the request too, on a task nobody awaits, and compares;
        dropped (and counted) when `max_in_flight` shadow calls already run."""
        if len(self._shadows) >= self.max_in_flight:
            self.metrics.record_shadow_dropped(self.candidate)
            return
        task = asyncio.create_task(self._shadow(serving, answer, image, digest, resolve))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self,
        serving: RouterDataPlane,
        answer: Classification,
        image: bytes,
        digest: str,
        resolve: Resolve,
    ) -> None:
        candidate = self.candidate
        started = time.perf_counter()
        code = "INTERNAL"
        try:
            shadow = await self.plane.classify(image, resolve(self.plane), digest=digest)
            code = "OK"
        except FieldlensError as exc:
            code = exc.code.name
            logger.debug("shadow call to %s failed: %s", candidate, exc)
            return
        except asyncio.CancelledError:
            code = "CANCELLED"  # the rollout ended: nothing to compare against any more
            return
        except Exception:  # a shadow call must never surface anywhere but here
            logger.exception("shadow call to %s failed", candidate)
            return
        finally:
            if code != "CANCELLED":
                self.metrics.record_rollout_request(
                    candidate, "shadow", code, time.perf_counter() - started
                )
        c = compare(answer, serving.model_set.taxonomy, shadow, self.plane.model_set.taxonomy)
        self.metrics.record_shadow_comparison(
            candidate,
            {"top1": c.top1, "best_effort": c.best_effort, "broad": c.broad},
            {"top1": c.top1_depth, "best_effort": c.best_effort_depth},
            (c.current_broad, c.candidate_broad),
        )

    def close(self) -> None:
        """Cancels the shadow calls in flight (the candidate is going away)."""
        for task in list(self._shadows):
            task.cancel()
