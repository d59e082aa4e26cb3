"""Router gRPC servicer: translates protobuf <-> the data plane's domain objects, nothing more."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from fieldlens.backends.vector_store import Neighbour
from fieldlens.common.credentials import Credentials, Scope
from fieldlens.common.errors import (
    FailedPrecondition,
    FieldlensError,
    InvalidInput,
    Unauthenticated,
)
from fieldlens.common.model_store import RolloutState
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.common.tls import transport_is_secure
from fieldlens.router.dataplane import (
    Classification,
    ClassifyOptions,
    Degradation,
    Dispatch,
    RouterDataPlane,
)
from fieldlens.router.learning import Learner, LearnItem, LearnOutcome
from fieldlens.router.merge import SPECIALIST, TINY, Suggestion
from fieldlens.router.rollout import Rollout
from fieldlens.v1 import classifier_pb2, router_pb2, router_pb2_grpc, taxonomy_pb2

if TYPE_CHECKING:
    from fieldlens.router.model_sets import ModelSets

logger = logging.getLogger(__name__)

_SERVED_BY = {SPECIALIST: classifier_pb2.SPECIALIST, TINY: classifier_pb2.TINY}
_SERVED_BY_NAME = {v: k for k, v in _SERVED_BY.items()}
MAX_INDEX_ITEMS = 100_000  # per IndexExemplars call
MAX_LEARN_ITEMS = 10_000  # per LearnStream call
# The scope each write RPC needs (common/credentials.py). Forget undoes Learn, so it is Learn's.
WRITE_SCOPES: dict[str, Scope] = {
    "Learn": "learn",
    "LearnStream": "learn",
    "Forget": "learn",
    "IndexExemplars": "index",
    "SwitchModelSet": "admin",
    "SetRollout": "admin",
    "PromoteCandidate": "admin",
    "AbortCandidate": "admin",
}

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _write_rpc(
    method: Callable[[Any, _Req, grpc.aio.ServicerContext, str], Awaitable[_Resp]],
) -> Callable[[Any, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]:
    """A write RPC: called with the client's name once its `authorization: Bearer <token>`
    holds the RPC's scope (WRITE_SCOPES); UNAUTHENTICATED for a missing or unknown token,
    PERMISSION_DENIED for a missing scope. Every call is counted by client and final code
    (`fieldlens_write_requests_total`) and logged with the client's name."""
    name = method.__name__
    scope = WRITE_SCOPES[name]

    @functools.wraps(method)
    async def wrapped(self: Any, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        started = time.perf_counter()
        client, code, problem = "", grpc.StatusCode.INTERNAL, ""
        try:
            if not self.allow_plaintext_tokens and not transport_is_secure(context):
                raise Unauthenticated(
                    "write tokens are refused over plaintext (they could be read off the wire): "
                    "call over TLS"
                )
            caller = self.credentials.caller(context.invocation_metadata())
            client = caller.name
            caller.require(scope)
            result = await method(self, request, context, client)
            code = grpc.StatusCode.OK
            return result
        except FieldlensError as exc:
            code, problem = exc.code, exc.message
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.plane.metrics.record_write(name, client, code.name)
            ms = (time.perf_counter() - started) * 1e3
            if code is grpc.StatusCode.OK:
                logger.info("%s by %s: OK in %.1f ms", name, client, ms)
            else:
                logger.warning(
                    "%s by %s: %s in %.1f ms: %s",
                    name,
                    client or f"an unauthenticated caller at {context.peer()}",
                    code.name,
                    ms,
                    problem,
                )

    return wrapped


def taxon_pb(taxonomy: Taxonomy, taxon_id: str) -> taxonomy_pb2.Taxon:
    t = taxonomy.get(taxon_id)
    return taxonomy_pb2.Taxon(
        id=t.id, name=t.name, rank=t.rank, depth=t.depth, parent_id=t.parent or ""
    )


class _TaxonMessages:
    """Every taxon's Taxon message, built once per taxonomy, and the encoded taxon + path of
    each taxon an answer names, built at first use: answers merge them instead of building a
    message per taxon per suggestion."""

    def __init__(self, taxonomy: Taxonomy) -> None:
        self._taxonomy = taxonomy
        self._taxon = {t.id: taxon_pb(taxonomy, t.id) for t in taxonomy}
        self._head: dict[str, bytes] = {}

    def head(self, taxon_id: str) -> bytes:
        """`taxon` and `path` of a taxon as the encoded fields 1 and 2 that Answer and
        Suggestion share: one parse merges both (copying the messages costs one per Taxon)."""
        found = self._head.get(taxon_id)
        if found is None:
            path = [self.taxon(t) for t in self._taxonomy.path(taxon_id)]
            found = router_pb2.Suggestion(taxon=self.taxon(taxon_id), path=path).SerializeToString()
            if taxon_id in self._taxon:  # not one Forget removed meanwhile (see `taxon`)
                self._head[taxon_id] = found
        return found

    def taxon(self, taxon_id: str) -> taxonomy_pb2.Taxon:
        found = self._taxon.get(taxon_id)
        # A taxon Forget removed while an answer naming it was being computed: the taxonomy
        # still knows it (see Taxonomy.without_learned), so build it the slow way.
        return found if found is not None else taxon_pb(self._taxonomy, taxon_id)

    def name(self, taxon_id: str) -> str:
        found = self._taxon.get(taxon_id)
        return found.name if found is not None else ""


# Taxonomies are immutable (Learn makes a new one), so each keeps its messages while in use.
_taxon_messages: weakref.WeakKeyDictionary[Taxonomy, _TaxonMessages] = weakref.WeakKeyDictionary()


def _messages(taxonomy: Taxonomy) -> _TaxonMessages:
    messages = _taxon_messages.get(taxonomy)
    if messages is None:
        messages = _taxon_messages[taxonomy] = _TaxonMessages(taxonomy)
    return messages


def to_proto(c: Classification, taxonomy: Taxonomy) -> router_pb2.ClassifyResponse:
    m = _messages(taxonomy)
    r = router_pb2.ClassifyResponse(
        cached=c.cached,
        model_set_version=c.model_set_version,
        embedding_version=c.embedding_version,
    )
    answer = r.answer
    answer.MergeFromString(m.head(c.answer_id))
    answer.probability = c.answer_probability
    for s in c.suggestions:
        sm = r.suggestions.add(probability=s.probability, served_by=_SERVED_BY.get(s.served_by, 0))
        sm.MergeFromString(m.head(s.taxon_id))
        for n in s.exemplars:
            sm.exemplars.add(
                id=n.id,
                label_id=n.label,
                label_name=m.name(n.label),
                similarity=n.similarity,
                source=n.source,
            )
    for d in c.dispatch:
        r.dispatch.add(
            category=d.category,
            probability=d.probability,
            served_by=_SERVED_BY.get(d.served_by, 0),
            fell_back=d.fell_back,
        )
    for s, ms in c.timings:
        r.timings.add(stage=s, duration_ms=ms)
    for d in c.degradations:
        r.degradations.add(
            kind=router_pb2.DegradationKind.Value(d.kind), message=d.message, category=d.category
        )
    return r


def response_of(c: Classification, taxonomy: Taxonomy) -> router_pb2.ClassifyResponse:
    """The ClassifyResponse of an answer: from its encoding when it has one (every answer the
    data plane returns does), with this request's timings and cache flag."""
    if not c.wire:
        return to_proto(c, taxonomy)
    r = router_pb2.ClassifyResponse.FromString(c.wire)
    r.cached = c.cached
    for s, ms in c.timings:
        r.timings.add(stage=s, duration_ms=ms)
    return r


def from_proto(r: router_pb2.ClassifyResponse) -> Classification:
    return Classification(
        answer_id=r.answer.taxon.id,
        answer_probability=r.answer.probability,
        suggestions=[
            Suggestion(
                s.taxon.id,
                s.probability,
                _SERVED_BY_NAME.get(s.served_by, ""),
                tuple(
                    Neighbour(e.id, e.label_id, "", e.similarity, [], e.source) for e in s.exemplars
                ),
            )
            for s in r.suggestions
        ],
        dispatch=[
            Dispatch(d.category, d.probability, _SERVED_BY_NAME.get(d.served_by, ""), d.fell_back)
            for d in r.dispatch
        ],
        timings=[(t.stage, t.duration_ms) for t in r.timings],
        cached=r.cached,
        degradations=[
            Degradation(router_pb2.DegradationKind.Name(d.kind), d.message, d.category)
            for d in r.degradations
        ],
        model_set_version=r.model_set_version,
        embedding_version=r.embedding_version,
    )


def codec(taxonomy: Callable[[], Taxonomy]):  # type: ignore[no-untyped-def]
    """(encode, decode) for the result cache: the protobuf wire form of the answer without
    timings (current taxonomy); a decoded answer keeps its encoding, to be sent as it is."""

    def decode(raw: bytes) -> Classification:
        c = from_proto(router_pb2.ClassifyResponse.FromString(raw))
        c.wire = raw
        return c

    return (lambda c: to_proto(c, taxonomy()).SerializeToString(), decode)


class RouterServicer(router_pb2_grpc.RouterServicer):
    """fieldlens.v1.Router: the public API."""

    def __init__(
        self,
        plane: RouterDataPlane,
        credentials: Credentials | None = None,
        allow_plaintext_tokens: bool = True,
    ) -> None:
        # Replaced, never mutated, by a model-set switch: a request keeps the plane it read.
        self.plane = plane
        # Who may write (None: nobody, writes answer FAILED_PRECONDITION).
        self.credentials = credentials or Credentials(None, None)
        # False (the router's setting by default): a write over plaintext is UNAUTHENTICATED.
        self.allow_plaintext_tokens = allow_plaintext_tokens
        self.model_sets: ModelSets | None = None  # set by the entry point
        # The candidate set being rolled out, if any; replaced by assignment, like `plane`.
        self.rollout: Rollout | None = None

    @property
    def taxonomy(self) -> Taxonomy:
        return self.plane.model_set.taxonomy

    def _learner(self, plane: RouterDataPlane) -> Learner:
        if plane.learner is None:
            raise FailedPrecondition("this router does not learn")
        return plane.learner

    async def _classify(self, request: router_pb2.ClassifyRequest) -> router_pb2.ClassifyResponse:
        def resolve(plane: RouterDataPlane) -> ClassifyOptions:
            return plane.resolve(
                request.top_k,
                request.neighbours,
                request.threshold,
                request.skip_cache,
                request.min_precision,
            )

        plane, rollout = self.plane, self.rollout
        if rollout is None:
            options = resolve(plane)
            result = await plane.classify(request.image, options)
        else:
            plane, options, result = await rollout.classify(plane, request.image, resolve)
        response = response_of(result, plane.model_set.taxonomy)
        response.request_id = request.request_id
        response.threshold = options.threshold
        return response

    async def Classify(
        self, request: router_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ClassifyResponse:
        return await self._classify(request)

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[router_pb2.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[router_pb2.ClassifyResponse]:
        async for request in request_iterator:
            try:
                yield await self._classify(request)
            except FieldlensError as exc:
                # One bad image must not end a bulk client's stream.
                yield router_pb2.ClassifyResponse(
                    request_id=request.request_id,
                    error=router_pb2.ItemError(code=exc.code.value[0], message=exc.message),
                )

    async def GetTaxonomy(
        self, request: router_pb2.GetTaxonomyRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GetTaxonomyResponse:
        taxa = sorted(self.taxonomy, key=lambda t: (t.depth, t.id))
        return router_pb2.GetTaxonomyResponse(
            taxa=[taxon_pb(self.taxonomy, t.id) for t in taxa],
            model_set_version=self.plane.model_set.version,
        )

    async def GetInfo(
        self, request: router_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.GetInfoResponse:
        plane = self.plane
        ms, learner = plane.model_set, plane.learner
        return router_pb2.GetInfoResponse(
            model_set_version=ms.version,
            embedding_version=ms.embedding_version,
            exemplar_count=await plane.exemplar_count(),
            routing=dict(ms.routing),
            learned_examples=learner.learned_total if learner else 0,
            writes_blocked=learner.writes_blocked if learner else (plane.reindexing or ""),
            broad_model=ms.broad_model,
            default_threshold=plane.defaults.threshold,
            precision_curve=[
                router_pb2.PrecisionPoint(
                    threshold=r["threshold"],
                    precision=r["precision"],
                    mean_depth=r["mean_depth"],
                )
                for r in ms.calibration.get("precision_curve", ())
            ],
            calibration_power=float(ms.calibration.get("power", 1.0)),
            rollout=self._rollout_status(),
        )

    def _rollout_status(self) -> router_pb2.RolloutStatus | None:
        rollout = self.rollout
        if rollout is None:
            return None
        state = rollout.state
        return router_pb2.RolloutStatus(
            candidate_version=state.candidate,
            canary_weight=state.canary_weight,
            shadow_fraction=state.shadow_fraction,
            shadows_in_flight=rollout.shadows_in_flight,
        )

    def _model_sets(self) -> ModelSets:
        if self.model_sets is None:
            raise FailedPrecondition("this router cannot change model sets")
        return self.model_sets

    @staticmethod
    def _learn_item(r: router_pb2.LearnRequest, client: str) -> LearnItem:
        label = r.WhichOneof("label")
        return LearnItem(
            image=r.image,
            taxon_id=r.taxon_id if label == "taxon_id" else "",
            new_name=r.new_taxon.name if label == "new_taxon" else "",
            new_parent=r.new_taxon.parent_id if label == "new_taxon" else "",
            source=r.source,
            client=client,
        )

    @_write_rpc
    async def Learn(
        self, request: router_pb2.LearnRequest, context: grpc.aio.ServicerContext, client: str
    ) -> router_pb2.LearnResponse:
        plane = self.plane
        (outcome,) = await self._learner(plane).learn([self._learn_item(request, client)])
        if isinstance(outcome, FieldlensError):
            raise outcome
        return self._learn_response(outcome, request.request_id, plane)

    @staticmethod
    def _learn_response(
        o: LearnOutcome, request_id: str, plane: RouterDataPlane
    ) -> router_pb2.LearnResponse:
        taxonomy = plane.model_set.taxonomy
        return router_pb2.LearnResponse(
            request_id=request_id,
            exemplar_id=o.exemplar_id,
            taxon=taxon_pb(taxonomy, o.taxon_id),
            path=[taxon_pb(taxonomy, t) for t in taxonomy.path(o.taxon_id)],
            created_taxon=o.created_taxon,
            duplicate=o.duplicate,
            learned_total=o.learned_total,
            embedding_version=plane.model_set.embedding_version,
        )

    @_write_rpc
    async def LearnStream(
        self,
        request_iterator: AsyncIterator[router_pb2.LearnRequest],
        context: grpc.aio.ServicerContext,
        client: str,
    ) -> router_pb2.LearnStreamResponse:
        items = []
        async for r in request_iterator:
            if len(items) >= MAX_LEARN_ITEMS:
                raise InvalidInput(f"at most {MAX_LEARN_ITEMS} items per LearnStream; split it")
            items.append(self._learn_item(r, client))
        outcomes = await self._learner(self.plane).learn(items)
        reply = router_pb2.LearnStreamResponse(received=len(items))
        for n, o in enumerate(outcomes):
            if isinstance(o, FieldlensError):
                reply.rejected += 1
                if len(reply.errors) < 10:
                    reply.errors.append(f"item {n}: {o.code.name}: {o.message}")
            elif o.duplicate:
                reply.duplicates += 1
            else:
                reply.learned += 1
        return reply

    @_write_rpc
    async def Forget(
        self, request: router_pb2.ForgetRequest, context: grpc.aio.ServicerContext, client: str
    ) -> router_pb2.ForgetResponse:
        o = await self._learner(self.plane).forget(
            list(request.exemplar_ids), request.taxon_id, client
        )
        return router_pb2.ForgetResponse(
            request_id=request.request_id,
            forgotten=o.forgotten,
            learned_forgotten=o.learned_forgotten,
            not_found=o.not_found,
            removed_taxa=o.removed_taxa,
            learned_total=o.learned_total,
        )

    @_write_rpc
    async def IndexExemplars(
        self,
        request_iterator: AsyncIterator[router_pb2.IndexExemplarsRequest],
        context: grpc.aio.ServicerContext,
        client: str,
    ) -> router_pb2.IndexExemplarsResponse:
        items = []
        async for r in request_iterator:
            if len(items) >= MAX_INDEX_ITEMS:
                raise InvalidInput(
                    f"at most {MAX_INDEX_ITEMS} exemplars per call; split the upload"
                )
            items.append((r.image, r.label, r.source))
        report = await self._learner(self.plane).index_exemplars(items, client)
        return router_pb2.IndexExemplarsResponse(
            received=report.received,
            indexed=report.indexed,
            duplicates=report.duplicates,
            rejected=report.rejected,
            errors=report.errors,
        )

    @_write_rpc
    async def SwitchModelSet(
        self,
        request: router_pb2.SwitchModelSetRequest,
        context: grpc.aio.ServicerContext,
        client: str,
    ) -> router_pb2.SwitchModelSetResponse:
        if not request.version:
            raise InvalidInput("version is required: a model set published in the model store")
        if self.model_sets is None:
            raise FailedPrecondition("this router cannot switch model sets")
        logger.info("%s asks for model set %s", client, request.version)
        r = await self.model_sets.switch(request.version)
        return router_pb2.SwitchModelSetResponse(
            model_set_version=r.version,
            previous_model_set_version=r.previous,
            embedding_version=r.embedding_version,
            reindexed=r.reindexed,
            relearned=r.relearned,
            seconds=r.seconds,
        )

    @_write_rpc
    async def SetRollout(
        self,
        request: router_pb2.SetRolloutRequest,
        context: grpc.aio.ServicerContext,
        client: str,
    ) -> router_pb2.SetRolloutResponse:
        if not request.candidate_version:
            raise InvalidInput(
                "candidate_version is required: a model set published in the model store"
            )
        state = RolloutState(
            request.candidate_version, request.canary_weight, request.shadow_fraction
        )
        logger.info(
            "%s rolls out model set %s: canary %g, shadow %g",
            client,
            state.candidate,
            state.canary_weight,
            state.shadow_fraction,
        )
        seconds = await self._model_sets().set_rollout(state)
        return router_pb2.SetRolloutResponse(rollout=self._rollout_status(), seconds=seconds)

    @_write_rpc
    async def PromoteCandidate(
        self,
        request: router_pb2.PromoteCandidateRequest,
        context: grpc.aio.ServicerContext,
        client: str,
    ) -> router_pb2.PromoteCandidateResponse:
        logger.info("%s promotes the candidate model set", client)
        r = await self._model_sets().promote()
        return router_pb2.PromoteCandidateResponse(
            model_set_version=r.version, previous_model_set_version=r.previous, seconds=r.seconds
        )

    @_write_rpc
    async def AbortCandidate(
        self,
        request: router_pb2.AbortCandidateRequest,
        context: grpc.aio.ServicerContext,
        client: str,
    ) -> router_pb2.AbortCandidateResponse:
        aborted = await self._model_sets().abort()
        logger.info("%s aborts the rollout of %s", client, aborted or "(none)")
        return router_pb2.AbortCandidateResponse(aborted_version=aborted)
