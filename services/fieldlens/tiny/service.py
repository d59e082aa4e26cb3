"""The tiny-classifier service: settings, backends, server (run by `python -m fieldlens.tiny`)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from fieldlens.common import targets, tls
from fieldlens.common.bootstrap import main_with_settings, serve_grpc
from fieldlens.common.errors import FailedPrecondition, FieldlensError
from fieldlens.common.knowledge import KnowledgeJournal, example_from_proto
from fieldlens.common.loaded_sets import LoadedModelSets
from fieldlens.common.model_set import ModelSet
from fieldlens.common.model_store import load_served, load_version
from fieldlens.common.settings import ClassifierSettings, CommonSettings
from fieldlens.tiny.ensemble import TinyEnsemble
from fieldlens.tiny.servicer import INSTANCE_ID, TinyServicer
from fieldlens.v1 import classifier_pb2, classifier_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = "fieldlens.v1.Classifier"
EXPORT_TIMEOUT_S = 120.0
KEEP_UP_S = 15.0


def build(settings: ClassifierSettings, model_set: ModelSet) -> TinyServicer:
    """The servicer of one model set, its knowledge journal replayed into its ensemble."""
    ensemble = TinyEnsemble.load(model_set.tiny_path, model_set.taxonomy)
    if ensemble.embedding_version != model_set.embedding_version:
        raise FailedPrecondition(
            f"tiny ensemble is for {ensemble.embedding_version}, the model set "
            f"for {model_set.embedding_version}"
        )
    # The router puts learned taxa into the broad net's softmax when the model set says how.
    ensemble.learned_scored_upstream = bool(model_set.manifest.get("broad", {}).get("imprint"))
    logger.info(
        "model set %s: tiny ensemble of %d edges over %d-d embeddings (learned taxa scored %s)",
        model_set.version,
        len(ensemble.bias),
        ensemble.dim,
        "by the router" if ensemble.learned_scored_upstream else "here",
    )
    journal = KnowledgeJournal.for_model_set(
        settings.common.state_dir, "tiny", model_set.version, model_set.embedding_version
    )
    try:
        # The trained ensemble is kept as the servicer's base: Forget rebuilds from it.
        servicer = TinyServicer.restored(model_set, ensemble, journal)
    except (ValueError, FieldlensError) as e:
        raise FailedPrecondition(f"cannot replay the knowledge journal {journal.path}: {e}") from e
    logger.info(
        "replayed %d learned examples (%d new taxa) from %s",
        servicer.ensemble.learned_examples,
        len(servicer.ensemble.learned_taxa),
        journal.path,
    )
    return servicer


async def serve(settings: ClassifierSettings) -> None:
    common = settings.common
    try:
        model_set = load_served(common.model_store, common.models_dir)
        first = build(settings, model_set)
    except FieldlensError as e:
        raise SystemExit(str(e)) from e

    async def factory(version: str) -> TinyServicer:
        ms = load_version(common.model_store, common.models_dir, version)
        return await asyncio.to_thread(build, settings, ms)

    sets = LoadedModelSets(model_set.version, first, factory)
    tasks: set[asyncio.Task[None]] = set()
    if settings.peers:
        # Before the port opens (so before SERVING): the writes this replica missed while it
        # was down, copied from a peer that serves.
        await catch_up(settings.peers, first, common, forget=True)
        # Then now and again, adding only: a write fanned out while the router could not
        # reach this replica (it was starting, or a connection dropped) reached its peers.
        tasks.add(asyncio.create_task(keep_up(settings.peers, sets, common)))

    async def close() -> None:
        for task in tasks:
            task.cancel()

    await serve_grpc(
        common,
        (
            classifier_pb2_grpc.add_ClassifierServicer_to_server,
            sets,
        ),
        SERVICE,
        on_close=close,
    )


async def keep_up(peers: str, sets: LoadedModelSets, common: CommonSettings) -> None:
    """Forever: learns what a peer holds for the serving model set and this replica lacks
    (never forgets: a forget reaches every serving replica, or is not acknowledged and the
    caller retries it)."""
    while True:
        await asyncio.sleep(KEEP_UP_S)
        servicer = sets.pick("")
        assert isinstance(servicer, TinyServicer)
        try:
            await catch_up(peers, servicer, common, forget=False)
        except FieldlensError as exc:
            logger.warning("catching up with peers failed (retrying): %s", exc)


async def catch_up(
    peers: str, servicer: TinyServicer, common: CommonSettings, forget: bool
) -> bool:
    """Makes `servicer` hold what the first peer that answers holds for its model set
    (TinyServicer.adopt); False when no peer answered (a lone replica, or all restarting:
    each then serves its own journal, which has every write acknowledged to it)."""
    version = servicer.model_set.version
    try:
        addrs = await asyncio.to_thread(targets.servers, peers)
    except FieldlensError as exc:
        logger.warning("no peer to catch up from: %s", exc)
        return False
    options = [("grpc.max_receive_message_length", common.max_message_bytes)]
    for addr in addrs:
        async with tls.aio_channel(addr, common.tls, options, targets.dns_name(peers)) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            try:
                info = await stub.Describe(
                    classifier_pb2.DescribeRequest(model_set_version=version), timeout=2.0
                )
                if info.instance_id == INSTANCE_ID:
                    continue
                export = await stub.ExportKnowledge(
                    classifier_pb2.ExportKnowledgeRequest(model_set_version=version),
                    timeout=EXPORT_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as exc:
                logger.info("peer %s cannot be caught up from: %s", addr, exc.code().name)
                continue
        theirs = [example_from_proto(e) for e in export.examples]
        learned, forgotten = await servicer.adopt(theirs, forget)
        if not (learned or forgotten or forget):
            return True
        logger.info(
            "caught up with peer %s for model set %s: %d examples learned, %d forgotten "
            "(%d held now)",
            addr,
            version,
            learned,
            forgotten,
            servicer.ensemble.learned_examples,
        )
        return True
    logger.warning("no peer of %s answered: serving this replica's own journal", peers)
    return False


def main() -> None:
    main_with_settings("tiny", lambda: ClassifierSettings.from_env("tiny"), serve)
