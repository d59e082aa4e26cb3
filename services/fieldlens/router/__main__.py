"""Router service entry point: `python -m fieldlens.router`."""

from __future__ import annotations

import asyncio
import logging

from fieldlens.backends.blob_store import open_blob_store
from fieldlens.backends.cache import RedisCache
from fieldlens.backends.triton_client import TritonClient
from fieldlens.backends.vector_store import VectorStore, list_collections, open_vector_store
from fieldlens.common.bootstrap import main_with_settings, serve_grpc
from fieldlens.common.knowledge import KnowledgeJournal
from fieldlens.common.model_set import load_model_set
from fieldlens.common.settings import RouterSettings
from fieldlens.router.clients import ClassifierClient
from fieldlens.router.dataplane import ClassifyOptions, RouterDataPlane
from fieldlens.router.imaging import ImageLimits
from fieldlens.router.servicer import RouterServicer, codec
from fieldlens.v1 import router_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = "fieldlens.v1.Router"
DEFAULT_NEIGHBOURS = 1


COLLECTION_PREFIX = "exemplars_"
STAGING_SUFFIX = "__reindex"


def collection_name(embedding_version: str) -> str:
    """One collection per embedding space: vectors of different backbones never meet."""
    return COLLECTION_PREFIX + embedding_version.replace("-", "_")


def reindex_plan(existing: list[str], collection: str) -> list[str]:
    """Older collections to re-embed from, when this embedding space has no collection yet."""
    if collection in existing:
        return []
    return [
        c
        for c in existing
        if c.startswith(COLLECTION_PREFIX) and c != collection and not c.endswith(STAGING_SUFFIX)
    ]


def _open_store(settings: RouterSettings, collection: str, dim: int) -> VectorStore | None:
    target = settings.qdrant_addr or str(settings.qdrant_path)
    try:
        return open_vector_store(target, collection, dim)
    except Exception:  # the router serves without neighbours rather than not at all
        logger.exception("vector store %s unavailable; answers will lack exemplars", target)
        return None


async def _reindex(
    plane: RouterDataPlane,
    sources: list[VectorStore],
    staging: VectorStore,
    collection: str,
    journals: list[KnowledgeJournal],
) -> None:
    try:
        await plane.reindex(sources, staging, collection, journals)
    except Exception:
        logger.exception("re-index into %s failed; neighbours stay off until a restart", collection)
        plane.reindexing = f"re-index into {collection} failed (see the router log)"
    finally:
        for src in sources:
            src.close()


async def serve(settings: RouterSettings) -> None:
    common = settings.common
    model_set = load_model_set(common.models_dir, settings.routing_path)
    collection = collection_name(model_set.embedding_version)
    target = settings.qdrant_addr or str(settings.qdrant_path)
    try:
        older = reindex_plan(await asyncio.to_thread(list_collections, target), collection)
    except Exception:
        logger.exception("cannot list the collections at %s", target)
        older = []
    dim = model_set.embedding_dim
    # With older collections and none for this embedding space, exemplars are re-embedded
    # into a staging collection first; neighbours come back when it is published.
    store = await asyncio.to_thread(
        _open_store, settings, collection + STAGING_SUFFIX if older else collection, dim
    )
    cache = RedisCache.from_addr(settings.redis_addr) if settings.redis_addr else None
    triton = TritonClient(settings.triton_addr)
    specialist = ClassifierClient(
        settings.specialist_addr, settings.stage_timeout_s, common.max_message_bytes
    )
    tiny = ClassifierClient(settings.tiny_addr, settings.stage_timeout_s, common.max_message_bytes)
    journal = KnowledgeJournal.for_model_set(
        common.state_dir, "router", model_set.version, model_set.embedding_version
    )
    blobs = open_blob_store(settings.blob_store, common.state_dir / "blobs")
    plane = RouterDataPlane(
        model_set,
        triton,
        specialist,
        tiny,
        store,
        cache,
        codec(lambda: plane.model_set.taxonomy),
        ImageLimits(settings.max_image_bytes, settings.max_pixels, model_set.image_size),
        ClassifyOptions(settings.top_k, DEFAULT_NEIGHBOURS, settings.threshold),
        settings.dispatch_top,
        settings.cache_ttl_s,
        settings.stage_timeout_s,
        journal=journal,
        blobs=blobs,
        specialist_min_p=settings.specialist_min_p,
    )
    await plane.restore_knowledge()
    await plane.sync_learned_taxa()  # taxa learned through other router replicas
    background: set[asyncio.Task[object]] = set()
    if older and store is not None:
        staging, plane.store = store, None
        sources = [await asyncio.to_thread(_open_store, settings, c, dim) for c in older]
        journals = KnowledgeJournal.older(common.state_dir, "router", model_set.version)
        task = asyncio.create_task(
            _reindex(plane, [s for s in sources if s is not None], staging, collection, journals)
        )
        background.add(task)
    logger.info(
        "model set %s, %d exemplars, %d learned examples, writes %s",
        model_set.version,
        await plane.exemplar_count(),
        plane.learned_total,
        "enabled" if settings.write_token else "disabled (no FIELDLENS_WRITE_TOKEN)",
    )

    async def ready() -> bool:
        # The parts the router cannot answer without: Triton's broad net and the tiny service.
        return await triton.model_ready("broad", timeout_s=1.0) and await tiny.is_serving()

    async def close() -> None:
        for client in (triton, specialist, tiny):
            await client.close()
        if cache is not None:
            await cache.close()
        for task in background:
            task.cancel()
        if plane.store is not None:
            plane.store.close()

    await serve_grpc(
        common,
        (
            router_pb2_grpc.add_RouterServicer_to_server,
            RouterServicer(plane, settings.write_token),
        ),
        SERVICE,
        ready,
        close,
    )


def main() -> None:
    main_with_settings("router", RouterSettings.from_env, serve)


if __name__ == "__main__":
    main()
