"""Tiny-classifier service: the hierarchical linear ensemble behind the Classifier API."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from fieldlens.common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from fieldlens.common.knowledge import (
    ForgetRecord,
    KnowledgeJournal,
    LearnedExample,
    example_from_proto,
    example_to_proto,
)
from fieldlens.common.model_set import ModelSet
from fieldlens.common.taxonomy import LEARNED_PREFIX
from fieldlens.tiny.ensemble import TinyEnsemble, replayed
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Random per process (Describe.instance_id): a replica tells itself apart from its peers.
INSTANCE_ID = uuid.uuid4().hex


def check_version(model_set: ModelSet, version: str) -> None:
    """A request naming a model set must name this one (empty names none)."""
    if version and version != model_set.version:
        raise FailedPrecondition(
            f"request is for model set {version}, this service serves {model_set.version}"
        )


def check_request(model_set: ModelSet, request: classifier_pb2.CategoryRequest) -> None:
    """Checks shared by both Classifier implementations."""
    check_version(model_set, request.model_set_version)
    if request.category not in model_set.taxonomy.broad_ids:
        raise NotFound(f"unknown category {request.category!r}")


def to_response(
    category: str,
    scores: Sequence[tuple[str, float, bool]],
    top_k: int,
    served_by: int,
    model_version: str,
    min_node_probability: float = 0.0,
    tempered: Sequence[float] | None = None,
) -> classifier_pb2.CategoryResponse:
    """Scores sorted best first: `top_k` leaves (0: all) plus every internal node whose
    probability reaches `min_node_probability`.

    With `tempered` (one per score: the sum of P(leaf)^power over its leaves, calibration) the
    responses carry them and their total, and the floor applies to a node's share of it.
    """
    q = list(tempered) if tempered is not None else [0.0] * len(scores)
    total = sum(qi for (_, _, leaf), qi in zip(scores, q, strict=True) if leaf)
    rows = [(t, p, leaf, qi) for (t, p, leaf), qi in zip(scores, q, strict=True)]
    leaves = sorted((r for r in rows if r[2]), key=lambda r: -r[1])
    if top_k > 0:
        leaves = leaves[:top_k]
    if tempered is None:
        nodes = [r for r in rows if not r[2] and r[1] >= min_node_probability]
    else:
        nodes = [r for r in rows if not r[2] and r[3] >= min_node_probability * total]
    kept = nodes + leaves
    kept.sort(key=lambda r: -r[1])
    response = classifier_pb2.CategoryResponse(
        category=category,
        served_by=served_by,
        model_version=model_version,
        tempered_total=total if tempered is not None else 0.0,
    )
    _add_scores(response, kept)
    return response


def _add_scores(
    response: classifier_pb2.CategoryResponse, scores: Sequence[tuple[str, float, bool, float]]
) -> None:
    """Appends (taxon id, probability, is_leaf, tempered) rows as ScoredTaxon messages, each
    added in place: twice as fast as building the messages, then copying them in."""
    add = response.scores.add
    for t, p, leaf, q in scores:
        add(taxon_id=t, probability=p, leaf=leaf, tempered=q)


class TinyServicer(classifier_pb2_grpc.ClassifierServicer):
    """fieldlens.v1.Classifier over the tiny ensemble (no Triton needed).

    Args:
        model_set: The served model set (its taxonomy's broad groups are the categories).
        ensemble: The ensemble with the knowledge journal already replayed into it.
        journal: Where Learn and Forget make their records durable before applying them.
        base: The trained ensemble, before any journal replay: Forget rebuilds from it. None
            means a copy of `ensemble`, which must then have learned nothing.
    """

    def __init__(
        self,
        model_set: ModelSet,
        ensemble: TinyEnsemble,
        journal: KnowledgeJournal,
        base: TinyEnsemble | None = None,
    ) -> None:
        if base is None:
            if ensemble.learned_examples:
                raise ValueError("give the trained ensemble as `base`: this one has learned")
            base = ensemble.copy()
        self.model_set = model_set
        # Replaced, never mutated, by Learn and Forget: a Classify holds the version it read.
        self.ensemble = ensemble
        self.journal = journal
        self._base = base
        self._learn_lock = asyncio.Lock()
        self._learning: set[asyncio.Future[Any]] = set()

    @classmethod
    def restored(
        cls, model_set: ModelSet, base: TinyEnsemble, journal: KnowledgeJournal
    ) -> TinyServicer:
        """The servicer of `base` (the trained ensemble) with the examples its journal still
        holds learned again, in order (ValueError or InvalidInput for a bad journal)."""
        return cls(model_set, replayed(base, journal.replay()), journal, base)

    def _item_embedding(
        self, item: classifier_pb2.CategoriesRequest, ensemble: TinyEnsemble
    ) -> np.ndarray:
        """An item's embedding, (1, dim): from its float32 bytes when it has them."""
        if not item.embedding_f32:
            return self._embedding(item.embedding, ensemble)
        if len(item.embedding_f32) != 4 * ensemble.dim:
            raise InvalidInput(
                f"embedding_f32 has {len(item.embedding_f32)} bytes; expected {4 * ensemble.dim}"
            )
        emb = np.frombuffer(item.embedding_f32, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(emb)):
            raise InvalidInput("embedding contains NaN or infinity")
        return emb[None]

    def _embedding(self, values: Sequence[float], ensemble: TinyEnsemble) -> np.ndarray:
        if len(values) != ensemble.dim:
            raise InvalidInput(f"embedding has {len(values)} values; expected {ensemble.dim}")
        emb = np.asarray(values, dtype=np.float32)
        if not np.all(np.isfinite(emb)):
            raise InvalidInput("embedding contains NaN or infinity")
        return emb[None]

    async def Classify(
        self, request: classifier_pb2.CategoryRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.CategoryResponse:
        check_request(self.model_set, request)
        ensemble = self.ensemble
        emb = self._embedding(request.embedding, ensemble)
        scores = ensemble.scores_for(emb, request.category)
        return to_response(
            request.category,
            scores,
            request.top_k,
            classifier_pb2.TINY,
            ensemble.embedding_version,
        )

    async def ClassifyCategories(
        self, request: classifier_pb2.CategoriesRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.CategoriesResponse:
        (response,) = self._batch([request], self.ensemble)
        return response

    async def ClassifyBatch(
        self, request: classifier_pb2.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ClassifyBatchResponse:
        # One ensemble version for the whole batch, even if a Learn swaps it meanwhile.
        return classifier_pb2.ClassifyBatchResponse(items=self._batch(request.items, self.ensemble))

    def _batch(
        self, items: Sequence[classifier_pb2.CategoriesRequest], ensemble: TinyEnsemble
    ) -> list[classifier_pb2.CategoriesResponse]:
        """Every item's categories; the images that ask for the same group share its matrix
        product."""
        known = self.model_set.taxonomy.broad_ids
        for item in items:
            check_version(self.model_set, item.model_set_version)
            for category in item.categories:
                if category not in known:
                    raise NotFound(f"unknown category {category!r}")
        if not items:
            return []
        emb = np.concatenate([self._item_embedding(item, ensemble) for item in items])
        # category -> (item, position in the item, floor) of every image that asks for it
        asks: dict[str, list[tuple[int, int, float]]] = {}
        for i, item in enumerate(items):
            floors = item.min_node_probability
            for j, category in enumerate(item.categories):
                floor = floors[j] if j < len(floors) else 0.0
                asks.setdefault(category, []).append((i, j, floor))
        out = [
            classifier_pb2.CategoriesResponse(
                responses=[classifier_pb2.CategoryResponse() for _ in item.categories]
            )
            for item in items
        ]
        # Every item of a batch comes from one router plane: one calibration power.
        power = (items[0].power or 1.0) if items else 1.0
        for category, who in asks.items():
            rows = [i for i, _, _ in who]
            # Every item of a batch asks for the same top_k (the router's request option).
            tops = {items[i].top_k for i in rows}
            for top_k in tops:
                same = [(i, j, f) for i, j, f in who if items[i].top_k == top_k]
                scored = ensemble.group_top(
                    emb[[i for i, _, _ in same]],
                    category,
                    top_k,
                    [f for _, _, f in same],
                    power,
                )
                for (i, j, _), (scores, total) in zip(same, scored, strict=True):
                    response = out[i].responses[j]
                    response.category = category
                    response.served_by = classifier_pb2.TINY
                    response.model_version = ensemble.embedding_version
                    response.tempered_total = total
                    _add_scores(response, scores)
        return out

    async def Describe(
        self, request: classifier_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.DescribeResponse:
        ensemble = self.ensemble
        return classifier_pb2.DescribeResponse(
            served_by=classifier_pb2.TINY,
            categories=[
                classifier_pb2.CategoryModel(category=b, model_version="tiny")
                for b in self.model_set.taxonomy.broad_ids
            ],
            model_set_version=self.model_set.version,
            embedding_version=ensemble.embedding_version,
            learned_examples=ensemble.learned_examples,
            learned_taxa=[
                classifier_pb2.NewTaxon(id=t.id, name=t.name, parent_id=t.parent)
                for t in ensemble.learned_taxa.values()
            ],
            instance_id=INSTANCE_ID,
        )

    async def ExportKnowledge(
        self, request: classifier_pb2.ExportKnowledgeRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ExportKnowledgeResponse:
        self._check_write_version(request.model_set_version)
        async with self._learn_lock:  # a consistent cut: no write half-applied
            examples = await asyncio.to_thread(self.journal.replay)
        return classifier_pb2.ExportKnowledgeResponse(
            model_set_version=self.model_set.version,
            examples=[example_to_proto(e) for e in examples],
        )

    async def adopt(self, theirs: Sequence[LearnedExample], forget: bool) -> tuple[int, int]:
        """Makes this replica hold what a peer holds: learns the examples it lacks (or holds
        under another label) and, with `forget`, forgets those the peer does not hold; both
        journaled like any Learn and Forget. Returns (learned, forgotten)."""
        mine = {e.id: e.taxon_id for e in await asyncio.to_thread(self.journal.replay)}
        held = {e.id for e in theirs}
        stale = [i for i in mine if i not in held] if forget else []
        relabelled = [e.id for e in theirs if e.id in mine and mine[e.id] != e.taxon_id]
        forgotten = 0
        if stale or relabelled:
            forgotten, _, _ = await self._shielded(self._forget(stale + relabelled, ""))
        missing = [e for e in theirs if mine.get(e.id) != e.taxon_id]
        learned = 0
        if missing:
            learned, _, _ = await self._shielded(self._learn(list(missing)))
        return learned, forgotten

    def _check_write_version(self, version: str) -> None:
        # Required, unlike Classify's: learned vectors are kept, and a vector from another
        # embedding space would corrupt the classifiers for good.
        if not version:
            raise InvalidInput("model_set_version is required: name the embeddings' model set")
        if version != self.model_set.version:
            raise FailedPrecondition(
                f"examples are for model set {version}, this service learns "
                f"for {self.model_set.version}"
            )

    async def _shielded(self, job: Awaitable[_T]) -> _T:
        """Runs a journaled write to the end even if the caller goes away: once its record is
        in the journal it must also be applied in memory, or a retry would journal it twice."""
        task = asyncio.ensure_future(job)
        self._learning.add(task)
        task.add_done_callback(self._learning.discard)
        return await asyncio.shield(task)

    async def Learn(
        self, request: classifier_pb2.LearnExamplesRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.LearnExamplesResponse:
        self._check_write_version(request.model_set_version)
        examples = [example_from_proto(e) for e in request.examples]
        applied, duplicates, total = await self._shielded(self._learn(examples))
        return classifier_pb2.LearnExamplesResponse(
            applied=applied, duplicates=duplicates, learned_total=total
        )

    async def Forget(
        self, request: classifier_pb2.ForgetExamplesRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ForgetExamplesResponse:
        self._check_write_version(request.model_set_version)
        taxon = request.taxon_id
        if taxon and not taxon.startswith(LEARNED_PREFIX):
            raise InvalidInput(f"only learned taxa ({LEARNED_PREFIX}...) can be forgotten")
        ids = list(dict.fromkeys(request.example_ids))
        if not ids and not taxon:
            raise InvalidInput("name the example ids or the learned taxon to forget")
        forgotten, removed, total = await self._shielded(self._forget(ids, taxon))
        return classifier_pb2.ForgetExamplesResponse(
            forgotten=forgotten, removed_taxa=removed, learned_total=total
        )

    async def _forget(self, ids: list[str], taxon: str) -> tuple[int, list[str], int]:
        """Journal the forget record first (durable), then rebuild from the trained ensemble
        and the examples still learned, off the event loop, and swap the result in."""
        async with self._learn_lock:
            current = self.ensemble
            targets = [i for i in ids if current.label_of(i) is not None]
            if taxon:
                named = set(targets)
                targets += [i for i in current.examples_of(taxon) if i not in named]
            if not targets:
                return 0, [], current.learned_examples
            try:
                await asyncio.to_thread(self.journal.append, [ForgetRecord(tuple(targets), taxon)])
            except OSError as e:
                logger.exception("cannot append to %s", self.journal.path)
                raise Unavailable("the knowledge journal cannot be written; retry") from e
            started = time.perf_counter()
            self.ensemble = await asyncio.to_thread(self._rebuild)
            removed = [t for t in current.learned_taxa if t not in self.ensemble.learned_taxa]
            logger.info(
                "forgot %d examples (taxa removed: %s); rebuilt from %d examples in %.0f ms",
                len(targets),
                ", ".join(removed) or "none",
                self.ensemble.learned_examples,
                (time.perf_counter() - started) * 1e3,
            )
            return len(targets), removed, self.ensemble.learned_examples

    def _rebuild(self) -> TinyEnsemble:
        """The trained ensemble plus what the journal still holds: the state a restart gives."""
        return replayed(self._base, self.journal.replay())

    async def _learn(self, examples: list[LearnedExample]) -> tuple[int, int, int]:
        """Journal first (durable), then apply to a copy and swap it in; one batch at a time."""
        async with self._learn_lock:
            current = self.ensemble
            fresh, duplicates = current.triage(examples)
            if fresh:
                try:
                    await asyncio.to_thread(self.journal.append, fresh)
                except OSError as e:
                    logger.exception("cannot append to %s", self.journal.path)
                    raise Unavailable("the knowledge journal cannot be written; retry") from e
                self.ensemble = await asyncio.to_thread(_learned, current, fresh)
                logger.info(
                    "learned %d examples (%d duplicates); %d examples, %d new taxa in all",
                    len(fresh),
                    duplicates,
                    self.ensemble.learned_examples,
                    len(self.ensemble.learned_taxa),
                )
            return len(fresh), duplicates, self.ensemble.learned_examples


def _learned(ensemble: TinyEnsemble, examples: list[LearnedExample]) -> TinyEnsemble:
    updated = ensemble.copy()
    updated.learn(examples)
    return updated
