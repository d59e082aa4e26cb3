"""Specialist service entry point: `python -m fieldlens.specialist`."""

from __future__ import annotations

import logging

from fieldlens.backends.triton_client import TritonClient
from fieldlens.common.bootstrap import main_with_settings, serve_grpc
from fieldlens.common.model_set import load_model_set
from fieldlens.common.settings import ClassifierSettings
from fieldlens.specialist.servicer import SpecialistServicer
from fieldlens.v1 import classifier_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = "fieldlens.v1.Classifier"


async def serve(settings: ClassifierSettings) -> None:
    model_set = load_model_set(settings.common.models_dir)
    triton = TritonClient(settings.triton_addr)
    models = [s.model for s in model_set.specialists.values()]
    logger.info("specialists: %s", models)

    async def ready() -> bool:
        # Honest readiness: every specialist net must be loaded on Triton.
        for m in models:
            if not await triton.model_ready(m, timeout_s=1.0):
                return False
        return True

    await serve_grpc(
        settings.common,
        (
            classifier_pb2_grpc.add_ClassifierServicer_to_server,
            SpecialistServicer(model_set, triton),
        ),
        SERVICE,
        ready,
        triton.close,
    )


def main() -> None:
    main_with_settings("specialist", lambda: ClassifierSettings.from_env("specialist"), serve)


if __name__ == "__main__":
    main()
