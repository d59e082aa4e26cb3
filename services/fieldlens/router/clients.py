"""gRPC client for the internal Classifier service (specialist and tiny speak the same API)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fieldlens.common import targets, tls
from fieldlens.common.errors import (
    FailedPrecondition,
    FieldlensError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from fieldlens.common.knowledge import LearnedExample, NewTaxonSpec, example_to_proto
from fieldlens.common.tls import TlsFiles
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

SERVED_BY = {classifier_pb2.SPECIALIST: "specialist", classifier_pb2.TINY: "tiny"}
# Loading a model set replays its knowledge journal (tiny).
LOAD_TIMEOUT_S = 300.0
LEARN_TIMEOUT_S = 10.0  # a Learn waits for the classifier's journal fsync
# A Forget waits for the journal fsync and a rebuild of the ensemble from every example still
# learned (measured: 0.3 s with 500 learned examples, 2.8 s with 2,000).
FORGET_TIMEOUT_S = 120.0
RECONNECT_BACKOFF_MS = 200


@dataclass(frozen=True)
class CategoryAnswer:
    """What a Classifier said about one category of one image."""

    scores: dict[str, float]  # P(taxon | category)
    served_by: str
    # Calibration (router/merge.py): sum of P(leaf | category)^power below each scored taxon,
    # and over every leaf of the category; empty and 0 when no power was asked for.
    tempered: dict[str, float]
    tempered_total: float


@dataclass(frozen=True)
class CategoriesItem:
    """One image's categories for a Classifier: the tiny ensemble needs its embedding, a
    specialist its pixels (size x size x 3 uint8)."""

    categories: list[str]
    top_k: int  # leaves per category, best first; 0 = all
    floors: list[float]  # per category: internal nodes below this P(node | category) stay out
    embedding: np.ndarray | None = None
    image: np.ndarray | None = None
    power: float = 1.0  # calibration: tempered sums come back when it is not 1


@dataclass
class _Endpoint:
    """One server behind the client's target."""

    addr: str
    channel: grpc.aio.Channel
    stub: classifier_pb2_grpc.ClassifierStub
    health: health_pb2_grpc.HealthStub


class ClassifierClient:
    """A Classifier service behind one gRPC target, which may stand for several replicas (a
    headless Service's pods, a local `ipv4:` list; common/targets.py).

    Reads (`classify_batch`, `learned_taxa`) go round the replicas, and one a replica cannot
    answer (UNAVAILABLE) is tried once on another. Writes (`learn`, `forget`,
    `load_model_set`) go to every replica that reports SERVING, and fail if one of them fails
    (they are idempotent: the caller retries); a replica that is down or starting misses them
    and copies a serving peer's knowledge when it starts (tiny/service.py).
    """

    def __init__(
        self,
        addr: str,
        timeout_s: float,
        max_message_bytes: int,
        tls_files: TlsFiles | None = None,
    ) -> None:
        self.addr = addr
        self._tls = tls_files
        self._timeout_s = timeout_s
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A replica that restarts is written to again within a second of serving, not
            # after gRPC's default backoff (up to 2 minutes) has run out.
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", 5 * RECONNECT_BACKOFF_MS),
        ]
        self._endpoints: list[_Endpoint] = []
        self._next = 0

    def servers(self) -> list[str]:
        return [e.addr for e in self._known()]

    def _known(self) -> list[_Endpoint]:
        if not self._endpoints:
            self._adopt(targets.servers(self.addr))
        return self._endpoints

    def _adopt(self, addrs: Sequence[str]) -> list[grpc.aio.Channel]:
        """Serves `addrs` from now on; returns the channels of servers no longer among them."""
        old = {e.addr: e for e in self._endpoints}
        endpoints = []
        for addr in addrs:
            endpoint = old.pop(addr, None)
            if endpoint is None:
                channel = tls.aio_channel(
                    addr, self._tls, self._options, targets.dns_name(self.addr)
                )
                endpoint = _Endpoint(
                    addr,
                    channel,
                    classifier_pb2_grpc.ClassifierStub(channel),
                    health_pb2_grpc.HealthStub(channel),
                )
            endpoints.append(endpoint)
        self._endpoints = endpoints
        return [e.channel for e in old.values()]

    async def refresh(self) -> list[str]:
        """Re-resolves the target (replicas come and go); returns the servers now."""
        for gone in self._adopt(await asyncio.to_thread(targets.servers, self.addr)):
            await gone.close()
        return [e.addr for e in self._endpoints]

    def _error(
        self, exc: grpc.aio.AioRpcError, not_found: type[FieldlensError] = NotFound
    ) -> FieldlensError:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput(f"{self.addr}: {exc.details()}")
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return FailedPrecondition(f"{self.addr}: {exc.details()}")
        if code == grpc.StatusCode.NOT_FOUND:
            return not_found(f"{self.addr}: {exc.details()}")
        return Unavailable(f"classifier {self.addr}: {code.name} {exc.details()}")

    async def _read(self, call: Callable[[_Endpoint], Awaitable[_T]]) -> _T:
        """`call` on the next replica; on UNAVAILABLE, once more on another."""
        endpoints = self._known()
        error: grpc.aio.AioRpcError | None = None
        for attempt in range(min(2, len(endpoints))):
            self._next += 1
            endpoint = endpoints[(self._next + attempt) % len(endpoints)]
            try:
                return await call(endpoint)
            except grpc.aio.AioRpcError as exc:
                error = exc
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    break
        assert error is not None
        raise self._error(error) from None

    async def _write(
        self,
        call: Callable[[_Endpoint], Awaitable[_T]],
        not_found: type[FieldlensError] = NotFound,
    ) -> _T:
        """`call` on every replica that serves; the first one's answer.

        Raises:
            Unavailable: no replica serves.
            FieldlensError: a serving replica failed the call (its error).
        """
        try:
            await self.refresh()
        except FieldlensError as exc:  # keep writing to the replicas known so far
            logger.warning("%s: %s", self.addr, exc)
        endpoints = self._known()
        serving = [
            e
            for e, ok in zip(
                endpoints,
                await asyncio.gather(*(_serving(e, 1.0) for e in endpoints)),
                strict=True,
            )
            if ok
        ]
        if not serving:
            raise Unavailable(f"classifier {self.addr}: no replica is serving ({self.servers()})")
        results = await asyncio.gather(*(call(e) for e in serving), return_exceptions=True)
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                raise self._error(result, not_found) from None
            if isinstance(result, BaseException):
                raise result
        if len(serving) < len(endpoints):
            logger.warning(
                "%s: written to %d of %d replicas (the others are down or starting)",
                self.addr,
                len(serving),
                len(endpoints),
            )
        return cast(_T, results[0])

    async def classify_batch(
        self, items: list[CategoriesItem], model_set_version: str
    ) -> list[dict[str, CategoryAnswer]]:
        """Several images' categories in one call; one {category: (scores, served_by)} per
        image, in order."""
        request = classifier_pb2.ClassifyBatchRequest()
        add = request.items.add  # in place: no message built, then copied in
        for item in items:
            add(
                categories=item.categories,
                embedding_f32=b""
                if item.embedding is None
                else item.embedding.astype("<f4", copy=False).tobytes(),
                image_rgb=b"" if item.image is None else item.image.tobytes(),
                image_size=0 if item.image is None else int(item.image.shape[0]),
                model_set_version=model_set_version,
                top_k=item.top_k,
                min_node_probability=item.floors,
                power=0.0 if item.power == 1.0 else item.power,
            )
        reply = await self._read(lambda e: e.stub.ClassifyBatch(request, timeout=self._timeout_s))
        return [{r.category: _answer(r) for r in item.responses} for item in reply.items]

    async def learned_taxa(self, model_set_version: str = "") -> list[NewTaxonSpec]:
        """Taxa this classifier learned online (tiny) for a model set, in creation order."""
        request = classifier_pb2.DescribeRequest(model_set_version=model_set_version)
        try:
            reply = await self._read(lambda e: e.stub.Describe(request, timeout=self._timeout_s))
        except (InvalidInput, FailedPrecondition, NotFound) as exc:
            raise Unavailable(str(exc)) from None
        return [NewTaxonSpec(t.id, t.name, t.parent_id) for t in reply.learned_taxa]

    async def learn(
        self, examples: list[LearnedExample], model_set_version: str
    ) -> tuple[int, int, int]:
        """Applies examples online on every serving replica; returns (applied, duplicates,
        learned total) of the first."""
        request = classifier_pb2.LearnExamplesRequest(
            examples=[example_to_proto(e) for e in examples],
            model_set_version=model_set_version,
        )
        timeout = max(self._timeout_s, LEARN_TIMEOUT_S)
        reply = await self._write(lambda e: e.stub.Learn(request, timeout=timeout))
        return reply.applied, reply.duplicates, reply.learned_total

    async def forget(
        self, example_ids: list[str], taxon_id: str, model_set_version: str
    ) -> tuple[int, list[str], int]:
        """Forgets learned examples (by id, and every example of `taxon_id` if given) on every
        serving replica; returns (examples forgotten, learned taxa removed, learned total)."""
        request = classifier_pb2.ForgetExamplesRequest(
            example_ids=example_ids, taxon_id=taxon_id, model_set_version=model_set_version
        )
        reply = await self._write(lambda e: e.stub.Forget(request, timeout=FORGET_TIMEOUT_S))
        return reply.forgotten, list(reply.removed_taxa), reply.learned_total

    async def load_model_set(self, version: str, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        """Has every serving replica load a published model set next to its current ones."""
        request = classifier_pb2.LoadModelSetRequest(version=version)
        await self._write(
            lambda e: e.stub.LoadModelSet(request, timeout=timeout_s),
            not_found=FailedPrecondition,
        )

    async def is_serving(self, timeout_s: float = 1.0) -> bool:
        """Whether any replica reports SERVING."""
        try:
            endpoints = self._known()
        except FieldlensError:
            return False
        return any(await asyncio.gather(*(_serving(e, timeout_s) for e in endpoints)))

    async def close(self) -> None:
        for channel in self._adopt([]):
            await channel.close()


async def _serving(endpoint: _Endpoint, timeout_s: float) -> bool:
    try:
        reply = await endpoint.health.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s, wait_for_ready=True
        )
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _answer(reply: classifier_pb2.CategoryResponse) -> CategoryAnswer:
    scores = {s.taxon_id: float(s.probability) for s in reply.scores}
    total = reply.tempered_total
    tempered = {s.taxon_id: s.tempered for s in reply.scores} if total > 0.0 else {}
    return CategoryAnswer(scores, SERVED_BY.get(reply.served_by, ""), tempered, total)
