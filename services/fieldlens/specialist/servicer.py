"""Specialist service: fine-tuned nets on Triton behind the Classifier API, with flip TTA."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from fieldlens.backends.triton_client import TritonClient
from fieldlens.common.errors import FailedPrecondition, InvalidInput, NotFound, Unimplemented
from fieldlens.common.model_set import ModelSet, SpecialistModel
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.tiny.servicer import check_request, check_version, to_response
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc

LOGITS = "LOGITS"


class Rollup:
    """Leaf probabilities of one specialist summed up to every taxon under its category, as
    one matrix product (built once per category)."""

    def __init__(self, taxonomy: Taxonomy, category: str, labels: tuple[str, ...]) -> None:
        self.taxa = list(taxonomy.under(category))
        self.leaf = [not taxonomy.children(t) for t in self.taxa]
        column = {label: j for j, label in enumerate(labels)}
        self.matrix = np.zeros((len(labels), len(self.taxa)), dtype=np.float64)
        for i, t in enumerate(self.taxa):
            for leaf in taxonomy.leaves_under(t):
                if leaf in column:
                    self.matrix[column[leaf], i] = 1.0

    def scores(self, probs: np.ndarray) -> list[list[tuple[str, float, bool]]]:
        """(taxon, probability, is_leaf) for each row of leaf probabilities."""
        summed = probs.astype(np.float64) @ self.matrix
        return [list(zip(self.taxa, row.tolist(), self.leaf, strict=True)) for row in summed]

    def tempered(self, probs: np.ndarray, power: float) -> np.ndarray:
        """Per row, the sum of P(leaf)^power over the leaves below each taxon (calibration)."""
        return (probs.astype(np.float64) ** power) @ self.matrix


class SpecialistServicer(classifier_pb2_grpc.ClassifierServicer):
    """fieldlens.v1.Classifier for the categories that have a fine-tuned net."""

    def __init__(self, model_set: ModelSet, triton: TritonClient, tta: bool = True) -> None:
        self.model_set = model_set
        self.triton = triton
        self.tta = tta
        self._rollups: dict[str, Rollup] = {}

    def _rollup(self, category: str, spec: SpecialistModel) -> Rollup:
        rollup = self._rollups.get(category)
        if rollup is None:
            rollup = self._rollups[category] = Rollup(
                self.model_set.taxonomy, category, spec.labels
            )
        return rollup

    def _pixels(self, image_rgb: bytes, image_size: int) -> np.ndarray:
        size = self.model_set.image_size
        if image_size != size or len(image_rgb) != size * size * 3:
            raise InvalidInput(
                f"image_rgb must be {size}x{size}x3 uint8 ({size * size * 3} bytes), got "
                f"{len(image_rgb)} bytes at image_size {image_size}"
            )
        return np.frombuffer(image_rgb, dtype=np.uint8).reshape(size, size, 3)

    async def _probabilities(self, spec: SpecialistModel, images: np.ndarray) -> np.ndarray:
        """The net's leaf probabilities for each image (mean with its mirror image, TTA)."""
        n = len(images)
        batch = np.concatenate([images, images[:, :, ::-1]]) if self.tta else images
        (logits,) = await self.triton.infer(spec.model, np.ascontiguousarray(batch), (LOGITS,))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        return (probs[:n] + probs[n:]) / 2 if self.tta else probs

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
        img = self._pixels(request.image_rgb, request.image_size)
        probs = await self._probabilities(spec, img[None])
        (scores,) = self._rollup(request.category, spec).scores(probs)
        return to_response(
            request.category, scores, request.top_k, classifier_pb2.SPECIALIST, spec.model
        )

    async def ClassifyBatch(
        self, request: classifier_pb2.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ClassifyBatchResponse:
        """Several images' categories: one net pass per category for all the images that ask
        for it (the router coalesces concurrent requests' specialist calls)."""
        items: Sequence[classifier_pb2.CategoriesRequest] = request.items
        known = self.model_set.taxonomy.broad_ids
        asks: dict[str, list[tuple[int, int, float]]] = {}
        for i, item in enumerate(items):
            check_version(self.model_set, item.model_set_version)
            floors = item.min_node_probability
            for j, category in enumerate(item.categories):
                if category not in known:
                    raise NotFound(f"unknown category {category!r}")
                self._model(category)
                floor = floors[j] if j < len(floors) else 0.0
                asks.setdefault(category, []).append((i, j, floor))
        images = [self._pixels(item.image_rgb, item.image_size) for item in items]
        out = [
            classifier_pb2.CategoriesResponse(
                responses=[classifier_pb2.CategoryResponse() for _ in item.categories]
            )
            for item in items
        ]
        # Every item of a batch comes from one router plane: one calibration power.
        power = (items[0].power or 1.0) if items else 1.0
        for category, who in asks.items():
            spec = self._model(category)
            probs = await self._probabilities(spec, np.stack([images[i] for i, _, _ in who]))
            rollup = self._rollup(category, spec)
            tempered = rollup.tempered(probs, power) if power != 1.0 else None
            for n, ((i, j, floor), scores) in enumerate(
                zip(who, rollup.scores(probs), strict=True)
            ):
                out[i].responses[j].CopyFrom(
                    to_response(
                        category,
                        scores,
                        items[i].top_k,
                        classifier_pb2.SPECIALIST,
                        spec.model,
                        floor,
                        None if tempered is None else tempered[n].tolist(),
                    )
                )
        return classifier_pb2.ClassifyBatchResponse(items=out)

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
