"""Specialist service entry point: `python -m fieldlens.specialist`."""

from __future__ import annotations

import asyncio
import logging

from fieldlens.backends.triton_client import TritonClient
from fieldlens.backends.triton_repository import ensure_model_set
from fieldlens.common.bootstrap import main_with_settings, serve_grpc
from fieldlens.common.errors import FieldlensError
from fieldlens.common.loaded_sets import LoadedModelSets
from fieldlens.common.model_store import load_served, load_version
from fieldlens.common.settings import ClassifierSettings
from fieldlens.specialist.servicer import SpecialistServicer
from fieldlens.v1 import classifier_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = "fieldlens.v1.Classifier"


async def serve(settings: ClassifierSettings) -> None:
    common = settings.common
    try:
        model_set = load_served(common.model_store, common.models_dir)
    except FieldlensError as e:
        raise SystemExit(str(e)) from e
    triton = TritonClient(settings.triton_addr)
    logger.info("specialists: %s", [s.model for s in model_set.specialists.values()])

    # A set from the store has its nets loaded into Triton by whichever of router and
    # specialist gets there first (idempotent); a restarted Triton only has the boot set's.
    await ensure_model_set(settings.triton_addr, common.model_store, model_set)

    async def factory(version: str) -> SpecialistServicer:
        ms = await asyncio.to_thread(load_version, common.model_store, common.models_dir, version)
        await ensure_model_set(settings.triton_addr, common.model_store, ms)
        return SpecialistServicer(ms, triton)

    sets = LoadedModelSets(model_set.version, SpecialistServicer(model_set, triton), factory)

    async def ready() -> bool:
        # Honest readiness: every specialist net of the default set must be loaded on Triton.
        default = sets.pick("")
        assert isinstance(default, SpecialistServicer)
        for spec in default.model_set.specialists.values():
            if not await triton.model_ready(spec.model, timeout_s=1.0):
                return False
        return True

    await serve_grpc(
        settings.common,
        (
            classifier_pb2_grpc.add_ClassifierServicer_to_server,
            sets,
        ),
        SERVICE,
        ready,
        triton.close,
    )


def main() -> None:
    main_with_settings("specialist", lambda: ClassifierSettings.from_env("specialist"), serve)


if __name__ == "__main__":
    main()
