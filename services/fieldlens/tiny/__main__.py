"""Tiny-classifier service entry point: `python -m fieldlens.tiny`."""

from __future__ import annotations

import asyncio
import logging

from fieldlens.common.bootstrap import main_with_settings, serve_grpc
from fieldlens.common.errors import FailedPrecondition, FieldlensError
from fieldlens.common.knowledge import KnowledgeJournal
from fieldlens.common.loaded_sets import LoadedModelSets
from fieldlens.common.model_set import ModelSet
from fieldlens.common.model_store import load_served, load_version
from fieldlens.common.settings import ClassifierSettings
from fieldlens.tiny.ensemble import TinyEnsemble
from fieldlens.tiny.servicer import TinyServicer
from fieldlens.v1 import classifier_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = "fieldlens.v1.Classifier"


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

    await serve_grpc(
        common,
        (
            classifier_pb2_grpc.add_ClassifierServicer_to_server,
            LoadedModelSets(model_set.version, first, factory),
        ),
        SERVICE,
    )


def main() -> None:
    main_with_settings("tiny", lambda: ClassifierSettings.from_env("tiny"), serve)


if __name__ == "__main__":
    main()
