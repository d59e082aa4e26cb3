"""Specialist service: fine-tuned nets on Triton behind the Classifier API, with flip TTA."""

from __future__ import annotations

import grpc
import numpy as np

from fieldlens.backends.triton_client import TritonClient
from fieldlens.common.errors import FailedPrecondition, InvalidInput, Unimplemented
from fieldlens.common.model_set import ModelSet, SpecialistModel
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.tiny.servicer import check_request, to_response
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc

LOGITS = "LOGITS"


def rollup(
    taxonomy: Taxonomy, category: str, labels: tuple[str, ...], probs: np.ndarray
) -> list[tuple[str, float, bool]]:
    """Leaf probabilities summed up to every taxon under `category`."""
    leaf_p = dict(zip(labels, probs.tolist(), strict=True))
    out = []
    for t in taxonomy.under(category):
        leaves = taxonomy.leaves_under(t)
        out.append(
            (t, float(sum(leaf_p.get(leaf, 0.0) for leaf in leaves)), not taxonomy.children(t))
        )
    return out


class SpecialistServicer(classifier_pb2_grpc.ClassifierServicer):
    """fieldlens.v1.Classifier for the categories that have a fine-tuned net."""

    def __init__(self, model_set: ModelSet, triton: TritonClient, tta: bool = True) -> None:
        self.model_set = model_set
        self.triton = triton
        self.tta = tta

    def _model(self, category: str) -> SpecialistModel:
        try:
            return self.model_set.specialists[category]
        except KeyError:
            raise FailedPrecondition(f"no specialist serves {category}") from None

    async def Classify(
        self, request: classifier_pb2.CategoryRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.CategoryResponse:
        check_request(self.model_set, request)
        spec = self._model(request.category)
        size = self.model_set.image_size
        if request.image_size != size or len(request.image_rgb) != size * size * 3:
            raise InvalidInput(
                f"image_rgb must be {size}x{size}x3 uint8 ({size * size * 3} bytes), got "
                f"{len(request.image_rgb)} bytes at image_size {request.image_size}"
            )
        img = np.frombuffer(request.image_rgb, dtype=np.uint8).reshape(1, size, size, 3)
        batch = np.concatenate([img, img[:, :, ::-1]]) if self.tta else img
        (logits,) = await self.triton.infer(spec.model, np.ascontiguousarray(batch), (LOGITS,))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (e / e.sum(axis=1, keepdims=True)).mean(axis=0)
        scores = rollup(self.model_set.taxonomy, request.category, spec.labels, probs)
        return to_response(
            request.category, scores, request.top_k, classifier_pb2.SPECIALIST, spec.model
        )

    async def Describe(
        self, request: classifier_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.DescribeResponse:
        return classifier_pb2.DescribeResponse(
            served_by=classifier_pb2.SPECIALIST,
            categories=[
                classifier_pb2.CategoryModel(category=c, model_version=s.model)
                for c, s in self.model_set.specialists.items()
            ],
            model_set_version=self.model_set.version,
            embedding_version=self.model_set.embedding_version,
        )

    # Specialist nets are fine-tuned offline; online learning lives in the tiny service.
    async def Learn(
        self, request: classifier_pb2.LearnExamplesRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.LearnExamplesResponse:
        raise Unimplemented("a specialist does not learn online; the tiny service does")

    async def Forget(
        self, request: classifier_pb2.ForgetExamplesRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ForgetExamplesResponse:
        raise Unimplemented("a specialist does not learn online, so it has nothing to forget")
