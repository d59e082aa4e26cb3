"""A Classifier service holding more than one model set, so a new one loads without downtime.

Each loaded model set has its own servicer (tiny: its ensemble and journal; specialist: its
nets' Triton names). A request goes to the set it names (`model_set_version`), or to the most
recently loaded one when it names none. `LoadModelSet` builds the next set's servicer while the
others keep answering, then makes it the default; the oldest sets beyond `keep` are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import grpc

from fieldlens.common.errors import FailedPrecondition, FieldlensError, InvalidInput
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc

logger = logging.getLogger(__name__)

Servicer = classifier_pb2_grpc.ClassifierServicer
# Version -> a ready servicer for it (may block on disk: it runs in its own task).
Factory = Callable[[str], Awaitable[Servicer]]
# The set a router is switching away from stays loaded while its last requests finish.
DEFAULT_KEEP = 2


class LoadedModelSets(classifier_pb2_grpc.ClassifierServicer):
    """fieldlens.v1.Classifier over several loaded model sets.

    Args:
        version: Version of the model set loaded at start.
        servicer: Its servicer.
        factory: Builds the servicer of another published version.
        keep: How many model sets stay loaded.
    """

    def __init__(
        self, version: str, servicer: Servicer, factory: Factory, keep: int = DEFAULT_KEEP
    ) -> None:
        self._sets: OrderedDict[str, Servicer] = OrderedDict({version: servicer})
        self._factory = factory
        self._keep = max(1, keep)
        self._lock = asyncio.Lock()

    @property
    def default(self) -> str:
        return next(reversed(self._sets))

    @property
    def versions(self) -> list[str]:
        return list(self._sets)

    def pick(self, version: str) -> Servicer:
        servicer = self._sets.get(version or self.default)
        if servicer is None:
            raise FailedPrecondition(
                f"model set {version} is not loaded here (loaded: {', '.join(self._sets)})"
            )
        return servicer

    async def Classify(
        self, request: classifier_pb2.CategoryRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.CategoryResponse:
        return await self.pick(request.model_set_version).Classify(request, context)

    async def ClassifyCategories(
        self, request: classifier_pb2.CategoriesRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.CategoriesResponse:
        return await self.pick(request.model_set_version).ClassifyCategories(request, context)

    async def ClassifyBatch(
        self, request: classifier_pb2.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ClassifyBatchResponse:
        versions = {item.model_set_version for item in request.items}
        if len(versions) > 1:  # one router plane, one model set: batches never mix them
            raise InvalidInput(f"a batch names several model sets: {sorted(versions)}")
        version = versions.pop() if versions else ""
        return await self.pick(version).ClassifyBatch(request, context)

    async def Describe(
        self, request: classifier_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.DescribeResponse:
        return await self.pick(request.model_set_version).Describe(request, context)

    async def Learn(
        self, request: classifier_pb2.LearnExamplesRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.LearnExamplesResponse:
        return await self.pick(request.model_set_version).Learn(request, context)

    async def Forget(
        self, request: classifier_pb2.ForgetExamplesRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ForgetExamplesResponse:
        return await self.pick(request.model_set_version).Forget(request, context)

    async def ExportKnowledge(
        self, request: classifier_pb2.ExportKnowledgeRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ExportKnowledgeResponse:
        return await self.pick(request.model_set_version).ExportKnowledge(request, context)

    async def LoadModelSet(
        self, request: classifier_pb2.LoadModelSetRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.DescribeResponse:
        version = request.version
        if not version:
            raise InvalidInput("version is required")
        await self.load(version)
        return await self.pick(version).Describe(
            classifier_pb2.DescribeRequest(model_set_version=version), context
        )

    async def load(self, version: str) -> None:
        """Loads `version` (unless loaded) and makes it the default. Idempotent."""
        async with self._lock:
            if version not in self._sets:
                try:
                    servicer = await self._factory(version)
                except FieldlensError:
                    raise
                except (OSError, ValueError) as e:
                    raise FailedPrecondition(f"cannot load model set {version}: {e}") from e
                self._sets[version] = servicer
                logger.info("model set %s loaded", version)
            self._sets.move_to_end(version)
            while len(self._sets) > self._keep:
                old, _ = self._sets.popitem(last=False)
                logger.info("model set %s dropped (keeping %d)", old, self._keep)
