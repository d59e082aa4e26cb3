"""The specialist service: settings, backends, server (run by `python -m fieldlens.specialist`)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fieldlens.backends.triton_client import TritonClient
from fieldlens.backends.triton_repository import ensure_model_set
from fieldlens.common.bootstrap import main_with_settings, serve_grpc
from fieldlens.common.errors import FieldlensError
from fieldlens.common.loaded_sets import LoadedModelSets
from fieldlens.common.model_set import ModelSet
from fieldlens.common.model_store import current, load_served, load_version, rollout
from fieldlens.common.settings import ClassifierSettings
from fieldlens.specialist.servicer import SpecialistServicer
from fieldlens.v1 import classifier_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = "fieldlens.v1.Classifier"
FOLLOW_S = 5.0


async def serve(settings: ClassifierSettings) -> None:
    common = settings.common
    try:
        model_set = load_served(common.model_store, common.models_dir)
    except FieldlensError as e:
        raise SystemExit(str(e)) from e
    triton = TritonClient(settings.triton_addr)
    logger.info("specialists: %s", [s.model for s in model_set.specialists.values()])

    kind = settings.triton_instance_kind
    # A set from the store has its nets loaded into Triton by whichever of router and
    # specialist gets there first (idempotent); a restarted Triton only has the boot set's.
    await ensure_model_set(settings.triton_addr, common.model_store, model_set, kind)

    async def factory(version: str) -> SpecialistServicer:
        ms = await asyncio.to_thread(load_version, common.model_store, common.models_dir, version)
        await ensure_model_set(settings.triton_addr, common.model_store, ms, kind)
        return SpecialistServicer(ms, triton)

    sets = LoadedModelSets(model_set.version, SpecialistServicer(model_set, triton), factory)

    async def catch_up() -> None:
        """Forever: every Triton server that lacks the specialist nets of the set the routers
        serve, or of a rollout's candidate (restarted, or added), gets them; until then calls
        skip it (TritonClient.refresh). Not those of a set this service still holds for the
        requests a switch left on it: the router unloads them once it retires the set."""
        while True:
            await asyncio.sleep(FOLLOW_S)
            try:
                wanted = await asyncio.to_thread(
                    served_versions, common.model_store, model_set.version
                )
                loaded = [_servicer(sets, v).model_set for v in sets.versions if v in wanted]
                lacking = await triton.refresh([n for ms in loaded for n in _nets(ms)])
                for ms in loaded:
                    only = sorted(a for a, nets in lacking.items() if set(nets) & set(_nets(ms)))
                    if only:
                        await ensure_model_set(
                            settings.triton_addr, common.model_store, ms, kind, only=only
                        )
            except FieldlensError as exc:
                logger.warning("triton catch-up failed (retrying): %s", exc)

    follower = asyncio.create_task(catch_up())

    async def close() -> None:
        follower.cancel()
        await triton.close()

    async def ready() -> bool:
        # Honest readiness: every specialist net of the default set must be loaded on Triton.
        for spec in _servicer(sets, "").model_set.specialists.values():
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
        close,
    )


def _servicer(sets: LoadedModelSets, version: str) -> SpecialistServicer:
    servicer = sets.pick(version)
    assert isinstance(servicer, SpecialistServicer)
    return servicer


def served_versions(store: Path, served_at_start: str) -> set[str]:
    """The model sets whose nets Triton must hold: the one the routers serve (the store's
    current one; before any switch, the one served at start) and a rollout's candidate."""
    wanted = {current(store) or served_at_start}
    state = rollout(store)
    if state is not None:
        wanted.add(state.candidate)
    return wanted


def _nets(ms: ModelSet) -> list[str]:
    return [s.model for s in ms.specialists.values()]


def main() -> None:
    main_with_settings("specialist", lambda: ClassifierSettings.from_env("specialist"), serve)
