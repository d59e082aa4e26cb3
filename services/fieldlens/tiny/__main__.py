"""Tiny-classifier service entry point: `python -m fieldlens.tiny`."""

from __future__ import annotations

import logging

from fieldlens.common.bootstrap import main_with_settings, serve_grpc
from fieldlens.common.errors import FieldlensError
from fieldlens.common.knowledge import KnowledgeJournal
from fieldlens.common.model_set import load_model_set
from fieldlens.common.settings import ClassifierSettings
from fieldlens.tiny.ensemble import TinyEnsemble
from fieldlens.tiny.servicer import TinyServicer
from fieldlens.v1 import classifier_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = "fieldlens.v1.Classifier"


async def serve(settings: ClassifierSettings) -> None:
    model_set = load_model_set(settings.common.models_dir)
    ensemble = TinyEnsemble.load(model_set.tiny_path, model_set.taxonomy)
    if ensemble.embedding_version != model_set.embedding_version:
        raise SystemExit(
            f"tiny ensemble is for {ensemble.embedding_version}, the model set "
            f"for {model_set.embedding_version}"
        )
    logger.info("tiny ensemble: %d edges over %d-d embeddings", len(ensemble.bias), ensemble.dim)
    journal = KnowledgeJournal.for_model_set(
        settings.common.state_dir, "tiny", model_set.version, model_set.embedding_version
    )
    try:
        replayed = list(journal.replay())
        ensemble.learn(replayed)
    except (ValueError, FieldlensError) as e:
        raise SystemExit(f"cannot replay the knowledge journal {journal.path}: {e}") from e
    logger.info(
        "replayed %d learned examples (%d distinct, %d new taxa) from %s",
        len(replayed),
        ensemble.learned_examples,
        len(ensemble.learned_taxa),
        journal.path,
    )
    servicer = TinyServicer(model_set, ensemble, journal)
    await serve_grpc(
        settings.common,
        (classifier_pb2_grpc.add_ClassifierServicer_to_server, servicer),
        SERVICE,
    )


def main() -> None:
    main_with_settings("tiny", lambda: ClassifierSettings.from_env("tiny"), serve)


if __name__ == "__main__":
    main()
