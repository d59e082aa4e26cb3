"""Tiny-classifier service: the hierarchical linear ensemble behind the Classifier API."""

from __future__ import annotations

import grpc
import numpy as np

from fieldlens.common.errors import FailedPrecondition, InvalidInput, NotFound
from fieldlens.common.model_set import ModelSet
from fieldlens.tiny.ensemble import TinyEnsemble
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc


def check_request(model_set: ModelSet, request: classifier_pb2.CategoryRequest) -> None:
    """Checks shared by both Classifier implementations."""
    if request.model_set_version and request.model_set_version != model_set.version:
        raise FailedPrecondition(
            f"request is for model set {request.model_set_version}, this service serves "
            f"{model_set.version}"
        )
    if request.category not in model_set.taxonomy.broad_ids:
        raise NotFound(f"unknown category {request.category!r}")


def to_response(
    category: str,
    scores: list[tuple[str, float, bool]],
    top_k: int,
    served_by: int,
    model_version: str,
) -> classifier_pb2.CategoryResponse:
    """Scores sorted best first; `top_k` keeps that many leaves plus every internal node."""
    scores = sorted(scores, key=lambda s: -s[1])
    if top_k > 0:
        leaves = [s for s in scores if s[2]][:top_k]
        scores = [s for s in scores if not s[2]] + leaves
        scores.sort(key=lambda s: -s[1])
    return classifier_pb2.CategoryResponse(
        category=category,
        scores=[
            classifier_pb2.ScoredTaxon(taxon_id=t, probability=p, leaf=leaf)
            for t, p, leaf in scores
        ],
        served_by=served_by,
        model_version=model_version,
    )


class TinyServicer(classifier_pb2_grpc.ClassifierServicer):
    """fieldlens.v1.Classifier over the tiny ensemble (no Triton needed)."""

    def __init__(self, model_set: ModelSet, ensemble: TinyEnsemble) -> None:
        self.model_set = model_set
        self.ensemble = ensemble

    async def Classify(
        self, request: classifier_pb2.CategoryRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.CategoryResponse:
        check_request(self.model_set, request)
        if len(request.embedding) != self.ensemble.dim:
            raise InvalidInput(
                f"embedding has {len(request.embedding)} values; expected {self.ensemble.dim}"
            )
        emb = np.asarray(request.embedding, dtype=np.float32)
        if not np.all(np.isfinite(emb)):
            raise InvalidInput("embedding contains NaN or infinity")
        scores = self.ensemble.scores_for(emb[None], request.category)
        return to_response(
            request.category,
            scores,
            request.top_k,
            classifier_pb2.TINY,
            self.ensemble.embedding_version,
        )

    async def Describe(
        self, request: classifier_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.DescribeResponse:
        return classifier_pb2.DescribeResponse(
            served_by=classifier_pb2.TINY,
            categories=[
                classifier_pb2.CategoryModel(category=b, model_version="tiny")
                for b in self.model_set.taxonomy.broad_ids
            ],
            model_set_version=self.model_set.version,
            embedding_version=self.ensemble.embedding_version,
        )
