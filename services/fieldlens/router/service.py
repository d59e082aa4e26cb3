"""The router service: settings, backends, server (run by `python -m fieldlens.router`)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from fieldlens.backends.blob_store import open_blob_store
from fieldlens.backends.cache import RedisCache
from fieldlens.backends.triton_client import TritonClient
from fieldlens.backends.triton_repository import ensure_model_set
from fieldlens.backends.vector_store import VectorStore
from fieldlens.common.bootstrap import main_with_settings, serve_grpc
from fieldlens.common.credentials import Credentials, TokensFileError
from fieldlens.common.errors import FieldlensError
from fieldlens.common.interceptors import default_interceptors
from fieldlens.common.knowledge import KnowledgeJournal
from fieldlens.common.limits import FairShare, FairShareAdmission, Identity, Limits, peer_identity
from fieldlens.common.model_store import load_served
from fieldlens.common.settings import RouterSettings
from fieldlens.common.telemetry import get_metrics
from fieldlens.router.clients import ClassifierClient
from fieldlens.router.learning import Learner
from fieldlens.router.model_sets import (
    STAGING_SUFFIX,
    Backends,
    ModelSets,
    collection_name,
    existing_collections,
    new_plane,
    open_store,
    reindex_plan,
)
from fieldlens.router.servicer import RouterServicer
from fieldlens.v1 import router_pb2_grpc

logger = logging.getLogger(__name__)

__all__ = ["STAGING_SUFFIX", "collection_name", "main"]

SERVICE = "fieldlens.v1.Router"
# Fair share (common/limits.py): metadata calls are neither limited nor counted; writes count
# against their client's limits like reads but are never shed (rare, idempotent, and someone
# waits on each); streams and long admin calls do not feed the mean call time of retry hints.
UNLIMITED_METHODS = ("GetInfo", "GetTaxonomy")
ADMIN_METHODS = ("SwitchModelSet", "SetRollout", "PromoteCandidate", "AbortCandidate")
WRITE_METHODS = ("Learn", "LearnStream", "Forget", "IndexExemplars", *ADMIN_METHODS)
UNTIMED_METHODS = ("ClassifyStream", "IndexExemplars", "LearnStream", "Forget", *ADMIN_METHODS)


def fair_share(settings: RouterSettings, identity: Identity = peer_identity) -> FairShareAdmission:
    """The router's admission control from its settings.

    `identity` names each call's client, by default its peer address (one client per
    connection). A resolver that returns a credential's name when the call carries a known
    token, else the peer address, makes the limits per credential.
    """
    limits = Limits(
        client_in_flight=settings.client_in_flight,
        client_rate=settings.client_rate,
        client_burst=settings.client_burst,
        shed_in_flight=settings.shed_in_flight,
    )
    return FairShareAdmission(
        FairShare(limits),
        SERVICE,
        exempt=UNLIMITED_METHODS,
        unsheddable=WRITE_METHODS,
        untimed=UNTIMED_METHODS,
        identity=identity,
    )


async def _reindex(
    learner: Learner,
    sources: list[VectorStore],
    staging: VectorStore,
    collection: str,
    journals: list[KnowledgeJournal],
) -> None:
    try:
        await learner.reindex(sources, staging, collection, journals)
    except Exception:
        logger.exception("re-index into %s failed; neighbours stay off until a restart", collection)
        learner.plane.reindexing = f"re-index into {collection} failed (see the router log)"
    finally:
        for src in sources:
            src.close()


async def serve(settings: RouterSettings) -> None:
    common = settings.common
    credentials = Credentials(settings.tokens_file, settings.write_token)
    try:
        credentials.load()
    except TokensFileError as e:
        raise SystemExit(f"router: FIELDLENS_TOKENS_FILE: {e}") from e
    try:
        model_set = load_served(common.model_store, common.models_dir, settings.routing_path)
    except FieldlensError as e:
        raise SystemExit(str(e)) from e
    try:  # a set from the store is not in Triton's repository: Triton may not have it yet
        await ensure_model_set(
            settings.triton_addr, common.model_store, model_set, settings.triton_instance_kind
        )
    except FieldlensError as e:
        logger.warning(
            "Triton does not serve model set %s yet (retrying): %s", model_set.version, e
        )
    collection = collection_name(model_set.embedding_version)
    older = reindex_plan(await existing_collections(settings), collection)
    dim = model_set.embedding_dim
    # With older collections and none for this embedding space, exemplars are re-embedded
    # into a staging collection first; neighbours come back when it is published.
    store = await asyncio.to_thread(
        open_store, settings, collection + STAGING_SUFFIX if older else collection, dim
    )
    backends = Backends(
        settings,
        TritonClient(settings.triton_addr),
        ClassifierClient(
            settings.specialist_addr,
            settings.stage_timeout_s,
            common.max_message_bytes,
            common.tls,
        ),
        ClassifierClient(
            settings.tiny_addr, settings.stage_timeout_s, common.max_message_bytes, common.tls
        ),
        RedisCache.from_addr(
            settings.redis_addr, on_batch=get_metrics().batch_observer("router", "redis")
        )
        if settings.redis_addr
        else None,
        open_blob_store(settings.blob_store, common.state_dir / "blobs"),
    )
    plane = new_plane(backends, model_set, store)
    learner = plane.learner
    assert learner is not None
    await learner.restore()
    await plane.sync_learned_taxa()  # taxa learned through other router replicas
    servicer = RouterServicer(plane, credentials, settings.allow_plaintext_tokens)
    model_sets = ModelSets(
        backends,
        plane,
        lambda p: setattr(servicer, "plane", p),
        lambda r: setattr(servicer, "rollout", r),
    )
    servicer.model_sets = model_sets
    background: set[asyncio.Task[None]] = {asyncio.create_task(model_sets.follow())}
    if older and store is not None:
        staging, plane.store = store, None
        sources = [await asyncio.to_thread(open_store, settings, c, dim) for c in older]
        journals = KnowledgeJournal.older(common.state_dir, "router", model_set.version)
        background.add(
            asyncio.create_task(
                _reindex(
                    learner, [s for s in sources if s is not None], staging, collection, journals
                )
            )
        )
    logger.info(
        "model set %s, %d exemplars, %d learned examples, writes %s",
        model_set.version,
        await plane.exemplar_count(),
        learner.learned_total,
        "enabled"
        if credentials.enabled
        else "disabled (neither FIELDLENS_WRITE_TOKEN nor FIELDLENS_TOKENS_FILE)",
    )

    async def ready() -> bool:
        # The part the router cannot answer without: Triton's broad net. Without the tiny
        # service answers degrade (CLASSIFIER_UNAVAILABLE) rather than fail, so tiny replicas
        # restarting do not take the router out of its Service.
        broad = servicer.plane.model_set.broad_model
        return await backends.triton.model_ready(broad, timeout_s=1.0)

    async def close() -> None:
        for task in background:
            task.cancel()
        model_sets.close()
        for client in (backends.triton, backends.specialist, backends.tiny):
            await client.close()
        if backends.cache is not None:
            await backends.cache.close()
        if servicer.plane.store is not None:
            servicer.plane.store.close()

    def client(context: grpc.aio.ServicerContext) -> str:
        # A caller with a known token is one client however many connections it opens.
        return credentials.client_of(context.invocation_metadata()) or peer_identity(context)

    admission = fair_share(settings, identity=client)
    limits = admission.fair_share.limits
    logger.info(
        "fair share: per client %s calls in flight and %s calls/s; reads shed from %s in flight",
        limits.client_in_flight or "any",
        f"{limits.client_rate:g} (burst {limits.burst:g})" if limits.client_rate else "any",
        limits.shed_in_flight or "never",
    )
    await serve_grpc(
        common,
        (router_pb2_grpc.add_RouterServicer_to_server, servicer),
        SERVICE,
        ready,
        close,
        interceptors=default_interceptors(admission=admission),
    )


def main() -> None:
    main_with_settings("router", RouterSettings.from_env, serve)
