"""gRPC client for the internal Classifier service (specialist and tiny speak the same API)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fieldlens.common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from fieldlens.common.knowledge import LearnedExample, NewTaxonSpec
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc

logger = logging.getLogger(__name__)

SERVED_BY = {classifier_pb2.SPECIALIST: "specialist", classifier_pb2.TINY: "tiny"}
# Loading a model set replays its knowledge journal (tiny).
LOAD_TIMEOUT_S = 300.0
LEARN_TIMEOUT_S = 10.0  # a Learn waits for the classifier's journal fsync
# A Forget waits for the journal fsync and a rebuild of the ensemble from every example still
# learned (measured: 0.3 s with 500 learned examples, 2.8 s with 2,000).
FORGET_TIMEOUT_S = 120.0


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


class ClassifierClient:
    """One channel to a Classifier endpoint; `classify` returns P(taxon | category)."""

    def __init__(self, addr: str, timeout_s: float, max_message_bytes: int) -> None:
        self.addr = addr
        self._timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(
            addr,
            options=[
                # A headless Service resolves to every pod; spread calls over all of them.
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._stub = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _error(self, exc: grpc.aio.AioRpcError) -> Exception:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput(f"{self.addr}: {exc.details()}")
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(f"{self.addr}: {exc.details()}")
        return Unavailable(f"classifier {self.addr}: {code.name} {exc.details()}")

    async def classify_batch(
        self, items: list[CategoriesItem], model_set_version: str
    ) -> list[dict[str, CategoryAnswer]]:
        """Several images' categories in one call; one {category: (scores, served_by)} per
        image, in order."""
        request = classifier_pb2.ClassifyBatchRequest(
            items=[
                classifier_pb2.CategoriesRequest(
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
                for item in items
            ]
        )
        try:
            reply = await self._stub.ClassifyBatch(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return [{r.category: _answer(r) for r in item.responses} for item in reply.items]

    async def learned_taxa(self, model_set_version: str = "") -> list[NewTaxonSpec]:
        """Taxa this classifier learned online (tiny) for a model set, in creation order."""
        try:
            reply = await self._stub.Describe(
                classifier_pb2.DescribeRequest(model_set_version=model_set_version),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"classifier {self.addr}: {exc.code().name} {exc.details()}"
            ) from None
        return [NewTaxonSpec(t.id, t.name, t.parent_id) for t in reply.learned_taxa]

    async def learn(
        self, examples: list[LearnedExample], model_set_version: str
    ) -> tuple[int, int, int]:
        """Applies examples online; returns (applied, duplicates, learned total)."""
        request = classifier_pb2.LearnExamplesRequest(
            examples=[
                classifier_pb2.LearnedExample(
                    id=e.id,
                    taxon_id=e.taxon_id,
                    embedding=np.asarray(e.vector, dtype=np.float32).tolist(),
                    new_taxon=None
                    if e.new_taxon is None
                    else classifier_pb2.NewTaxon(
                        id=e.new_taxon.id, name=e.new_taxon.name, parent_id=e.new_taxon.parent
                    ),
                )
                for e in examples
            ],
            model_set_version=model_set_version,
        )
        try:
            reply = await self._stub.Learn(request, timeout=max(self._timeout_s, LEARN_TIMEOUT_S))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidInput(f"{self.addr}: {exc.details()}") from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition(f"{self.addr}: {exc.details()}") from None
            raise Unavailable(f"classifier {self.addr}: {code.name} {exc.details()}") from None
        return reply.applied, reply.duplicates, reply.learned_total

    async def forget(
        self, example_ids: list[str], taxon_id: str, model_set_version: str
    ) -> tuple[int, list[str], int]:
        """Forgets learned examples (by id, and every example of `taxon_id` if given); returns
        (examples forgotten, learned taxa removed, learned total)."""
        request = classifier_pb2.ForgetExamplesRequest(
            example_ids=example_ids, taxon_id=taxon_id, model_set_version=model_set_version
        )
        try:
            reply = await self._stub.Forget(request, timeout=FORGET_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidInput(f"{self.addr}: {exc.details()}") from None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition(f"{self.addr}: {exc.details()}") from None
            raise Unavailable(f"classifier {self.addr}: {code.name} {exc.details()}") from None
        return reply.forgotten, list(reply.removed_taxa), reply.learned_total

    async def load_model_set(self, version: str, timeout_s: float = LOAD_TIMEOUT_S) -> None:
        """Has the service load a published model set next to its current ones."""
        try:
            await self._stub.LoadModelSet(
                classifier_pb2.LoadModelSetRequest(version=version), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                raise FailedPrecondition(f"{self.addr}: {exc.details()}") from None
            raise Unavailable(f"classifier {self.addr}: {code.name} {exc.details()}") from None

    async def is_serving(self, timeout_s: float = 1.0) -> bool:
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()


def _answer(reply: classifier_pb2.CategoryResponse) -> CategoryAnswer:
    scores = {s.taxon_id: float(s.probability) for s in reply.scores}
    total = reply.tempered_total
    tempered = {s.taxon_id: s.tempered for s in reply.scores} if total > 0.0 else {}
    return CategoryAnswer(scores, SERVED_BY.get(reply.served_by, ""), tempered, total)
