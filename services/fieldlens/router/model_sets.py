"""Which model set the router serves, and switching to another one without downtime.

A switch builds a complete data plane for the new set next to the serving one: Triton loads its
nets under their own names (explicit model control), the tiny and specialist services load it
next to theirs, exemplars are re-embedded if its embedding space is new, and examples learned
under older sets are learned again. Classify keeps answering from the old plane meanwhile;
writes wait (UNAVAILABLE, retryable) so that none lands in a plane about to be retired. Then
one assignment makes the new plane serve, the store's `current` names it, and the old set's
nets and collection are released after a grace period. Other router replicas see `current`
change and follow.

A rollout (router/rollout.py) loads a candidate set the same way, next to the serving one, but
only gives it a share of the traffic; promoting it is a switch, aborting it unloads it. Its
state sits next to `current` in the store, so restarts and other replicas follow it too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fieldlens.backends.blob_store import FolderBlobStore
from fieldlens.backends.cache import RedisCache
from fieldlens.backends.triton_client import TritonClient
from fieldlens.backends.triton_repository import ensure_model_set, nets_of, unload_nets
from fieldlens.backends.vector_store import VectorStore, list_collections, open_vector_store
from fieldlens.common import model_store
from fieldlens.common.errors import FailedPrecondition, FieldlensError
from fieldlens.common.knowledge import KnowledgeJournal
from fieldlens.common.model_set import ModelSet
from fieldlens.common.model_store import RolloutState
from fieldlens.common.settings import RouterSettings
from fieldlens.router.clients import ClassifierClient
from fieldlens.router.dataplane import ClassifyOptions, RouterDataPlane
from fieldlens.router.imaging import ImageLimits
from fieldlens.router.learning import Learner
from fieldlens.router.rollout import Rollout
from fieldlens.router.servicer import codec

logger = logging.getLogger(__name__)

DEFAULT_NEIGHBOURS = 1
COLLECTION_PREFIX = "exemplars_"
STAGING_SUFFIX = "__reindex"
# How often a router checks the store's `current` and that Triton still has its nets.
FOLLOW_S = 5.0
# Requests that started on the old plane get this long before its nets and store go away.
RETIRE_AFTER_S = 30.0


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


def open_store(settings: RouterSettings, collection: str, dim: int) -> VectorStore | None:
    target = settings.qdrant_addr or str(settings.qdrant_path)
    try:
        return open_vector_store(target, collection, dim, settings.common.cpu_threads)
    except Exception:  # the router serves without neighbours rather than not at all
        logger.exception("vector store %s unavailable; answers will lack exemplars", target)
        return None


async def existing_collections(settings: RouterSettings) -> list[str]:
    target = settings.qdrant_addr or str(settings.qdrant_path)
    try:
        return await asyncio.to_thread(list_collections, target)
    except Exception:
        logger.exception("cannot list the collections at %s", target)
        return []


@dataclass
class Backends:
    """What every model set's data plane shares."""

    settings: RouterSettings
    triton: TritonClient
    specialist: ClassifierClient
    tiny: ClassifierClient
    cache: RedisCache | None
    blobs: FolderBlobStore


def new_plane(b: Backends, model_set: ModelSet, store: VectorStore | None) -> RouterDataPlane:
    """A data plane for `model_set`, with its learner (journal and blob store) attached."""
    s = b.settings
    journal = KnowledgeJournal.for_model_set(
        s.common.state_dir, "router", model_set.version, model_set.embedding_version
    )
    plane: RouterDataPlane

    def taxonomy():  # type: ignore[no-untyped-def]
        return plane.model_set.taxonomy

    plane = RouterDataPlane(
        model_set,
        b.triton,
        b.specialist,
        b.tiny,
        store,
        b.cache,
        codec(taxonomy),
        ImageLimits(s.max_image_bytes, s.max_pixels, model_set.image_size),
        ClassifyOptions(
            s.top_k,
            DEFAULT_NEIGHBOURS,
            model_set.default_threshold if s.threshold is None else s.threshold,
        ),
        s.dispatch_top,
        s.cache_ttl_s,
        s.stage_timeout_s,
        specialist_min_p=s.specialist_min_p,
        batch_max=s.batch_max,
        batch_in_flight=s.batch_in_flight,
    )
    plane.learner = Learner(plane, journal, b.blobs)
    return plane


def _learner(plane: RouterDataPlane) -> Learner:
    assert plane.learner is not None, "planes are built by new_plane, learner attached"
    return plane.learner


@dataclass(frozen=True)
class SwitchReport:
    version: str
    previous: str
    embedding_version: str
    reindexed: int
    relearned: int
    seconds: float


class ModelSets:
    """Owns the serving plane; switches it to another published model set.

    Args:
        backends: What every plane shares.
        plane: The plane serving now.
        on_switch: Called with the new plane the moment it starts serving.
        on_rollout: Called with the rollout the moment it starts or changes candidate, and
            with None the moment it ends.
    """

    def __init__(
        self,
        backends: Backends,
        plane: RouterDataPlane,
        on_switch: Callable[[RouterDataPlane], None],
        on_rollout: Callable[[Rollout | None], None] | None = None,
    ) -> None:
        self.backends = backends
        self.plane = plane
        self._on_switch = on_switch
        self._on_rollout = on_rollout or (lambda r: None)
        self.rollout: Rollout | None = None
        # How long an aborted candidate's nets stay loaded for the requests still on them.
        self.retire_after_s = RETIRE_AFTER_S
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # Planes switched away from, answering their last requests until they retire.
        self._retiring: list[RouterDataPlane] = []
        self.metrics = plane.metrics
        self.metrics.record_model_set(plane.model_set.version, plane.model_set.embedding_version)

    @property
    def store_dir(self):  # type: ignore[no-untyped-def]
        return self.backends.settings.common.model_store

    async def switch(self, version: str) -> SwitchReport:
        """Serves `version` from now on (a no-op when it already does).

        Raises:
            FailedPrecondition: the version is not published, or does not load.
            Unavailable: Triton or a classifier service cannot load it; the old set serves on.
        """
        async with self._lock:
            old = self.plane
            started = time.perf_counter()
            if version == old.model_set.version:
                return SwitchReport(version, version, old.model_set.embedding_version, 0, 0, 0.0)
            try:
                report = await self._switch(old, version, started)
            except Exception:
                self.metrics.record_switch(ok=False)
                raise
            self.metrics.record_switch(ok=True, seconds=report.seconds)
            return report

    async def _switch(self, old: RouterDataPlane, version: str, started: float) -> SwitchReport:
        """The switch itself, under the lock; `old` is the serving plane."""
        b, s = self.backends, self.backends.settings
        ms = await asyncio.to_thread(
            model_store.load_version,
            self.store_dir,
            s.common.models_dir,
            version,
            s.routing_path,
        )
        logger.info("switching model set %s -> %s", old.model_set.version, version)
        await ensure_model_set(s.triton_addr, self.store_dir, ms, s.triton_instance_kind)
        for client in (b.tiny, b.specialist):
            await client.load_model_set(version)
        learner = _learner(old)
        learner.writes_paused = f"switching to model set {version}"
        try:
            async with learner.lock:  # in-flight writes finish on the old plane
                plane, reindexed, relearned = await self._prepare(old, ms)
        except BaseException:
            learner.writes_paused = None
            raise
        self.plane = plane
        self._on_switch(plane)
        # A switch ends any rollout: promoted, its candidate now serves; else the baseline it
        # was compared with is gone.
        ended = self._end_rollout(
            unload=self.rollout is not None and self.rollout.candidate != version
        )
        self.metrics.record_model_set(version, ms.embedding_version)
        await asyncio.to_thread(model_store.set_current, self.store_dir, version)
        if ended is not None:
            await asyncio.to_thread(model_store.set_rollout, self.store_dir, None)
        seconds = time.perf_counter() - started
        logger.info("model set %s serving after %.1f s", version, seconds)
        self._retire_later(old, plane)
        return SwitchReport(
            version, old.model_set.version, ms.embedding_version, reindexed, relearned, seconds
        )

    async def _prepare(
        self, old: RouterDataPlane, ms: ModelSet
    ) -> tuple[RouterDataPlane, int, int]:
        """The new set's plane, with its knowledge restored and older knowledge re-learned."""
        s = self.backends.settings
        older = KnowledgeJournal.older(s.common.state_dir, "router", ms.version)

        def progress(step: str) -> None:  # shown by GetInfo.writes_blocked meanwhile
            _learner(old).writes_paused = f"switching to model set {ms.version}: {step}"

        if ms.embedding_version == old.model_set.embedding_version:
            plane = new_plane(self.backends, ms, old.store)
            learner = _learner(plane)
            await learner.restore()
            return plane, 0, await learner.relearn(older, progress)
        collection = collection_name(ms.embedding_version)
        exists = collection in await existing_collections(s)
        name = collection if exists else collection + STAGING_SUFFIX
        # Switched straight back: the plane that left this space keeps its store open until
        # it retires, and an in-process store has one owner, so the new plane takes it over.
        store = self._retiring_store(name)
        if store is None:
            store = await asyncio.to_thread(open_store, s, name, ms.embedding_dim)
        plane = new_plane(self.backends, ms, store)
        learner = _learner(plane)
        await learner.restore()
        if exists or store is None or old.store is None:
            return plane, 0, await learner.relearn(older, progress)
        counts = await learner.reindex([old.store], store, collection, older, progress)
        return plane, counts["indexed"], counts["relearned"]

    def _retiring_store(self, collection: str) -> VectorStore | None:
        """The open store of `collection` that a retiring plane still holds, if any."""
        for plane in self._retiring:
            if plane.store is not None and plane.store.collection == collection:
                return plane.store
        return None

    def _in_use(self, store: VectorStore) -> bool:
        """Whether a plane that serves, or may serve, still needs `store`."""
        planes = [self.plane, *self._retiring]
        if self.rollout is not None:
            planes.append(self.rollout.plane)
        return any(p.store is store for p in planes)

    def _retire_later(self, old: RouterDataPlane, new: RouterDataPlane) -> None:
        self._retiring.append(old)

        async def retire() -> None:
            try:
                await asyncio.sleep(RETIRE_AFTER_S)
            finally:
                self._retiring.remove(old)
            # Its store stays open when a newer plane uses it (the same embedding space, or
            # this space switched back to meanwhile).
            if old.store is not None and not self._in_use(old.store):
                await asyncio.to_thread(old.store.close)
            if self.plane is new:  # not switched back meanwhile
                await unload_nets(self.backends.settings.triton_addr, nets_of(old.model_set))

        task = asyncio.create_task(retire())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- Rollouts ------------------------------------------------------------------------------
    async def set_rollout(self, state: RolloutState) -> float:
        """Starts rolling out `state.candidate`, or changes its shares; returns the seconds
        loading it took (0 when it was loaded). Persisted before it takes effect.

        Raises:
            FailedPrecondition: the candidate is the current set, or another one is rolling out.
            NotFound: the candidate is not published.
            Unavailable: Triton or a classifier service cannot load it.
        """
        async with self._lock:
            return await self._set_rollout(state, persist=True)

    async def _set_rollout(self, state: RolloutState, persist: bool) -> float:
        if state.candidate == self.plane.model_set.version:
            raise FailedPrecondition(
                f"model set {state.candidate} is the current one: roll out another"
            )
        rollout = self.rollout
        if rollout is not None and rollout.candidate == state.candidate:
            if persist:
                await asyncio.to_thread(model_store.set_rollout, self.store_dir, state)
            rollout.update(state)
            return 0.0
        if rollout is not None:
            if persist:  # an operator's call: replacing a candidate by accident loses its data
                raise FailedPrecondition(
                    f"model set {rollout.candidate} is rolling out: promote or abort it first"
                )
            self._end_rollout(unload=True)
        started = time.perf_counter()
        plane = await self._load_candidate(state.candidate)
        if persist:
            await asyncio.to_thread(model_store.set_rollout, self.store_dir, state)
        self.rollout = Rollout(plane, state)
        self._on_rollout(self.rollout)
        seconds = time.perf_counter() - started
        logger.info(
            "rolling out model set %s (canary %.3g, shadow %.3g), loaded in %.1f s",
            state.candidate,
            state.canary_weight,
            state.shadow_fraction,
            seconds,
        )
        return seconds

    async def _load_candidate(self, version: str) -> RouterDataPlane:
        """The candidate's plane, loaded as a switch loads a set: Triton and the classifier
        services hold it next to the serving set; its journal is replayed and what older sets
        learned is learned again. A candidate in another embedding space answers without
        exemplars (its collection is built when it is promoted)."""
        b, s = self.backends, self.backends.settings
        ms = await asyncio.to_thread(
            model_store.load_version, self.store_dir, s.common.models_dir, version, s.routing_path
        )
        await ensure_model_set(s.triton_addr, self.store_dir, ms, s.triton_instance_kind)
        for client in (b.tiny, b.specialist):
            await client.load_model_set(version)
        serving = self.plane
        same_space = ms.embedding_version == serving.model_set.embedding_version
        plane = new_plane(b, ms, serving.store if same_space else None)
        learner = _learner(plane)
        await learner.restore()
        await learner.relearn(KnowledgeJournal.older(s.common.state_dir, "router", version))
        return plane

    async def promote(self) -> SwitchReport:
        """Makes the candidate the serving set (a switch) and ends the rollout.

        Raises:
            FailedPrecondition: no rollout is running.
        """
        rollout = self.rollout
        if rollout is None:
            raise FailedPrecondition("no candidate model set to promote (see SetRollout)")
        return await self.switch(rollout.candidate)

    async def abort(self) -> str:
        """Ends the rollout: the current set answers everything, the candidate's nets are
        unloaded after a grace period. Returns the candidate dropped ("" when none)."""
        async with self._lock:
            stored = await asyncio.to_thread(model_store.rollout, self.store_dir)
            await asyncio.to_thread(model_store.set_rollout, self.store_dir, None)
            ended = self._end_rollout(unload=True)
            return ended or (stored.candidate if stored is not None else "")

    def _end_rollout(self, unload: bool) -> str | None:
        """Drops the rollout at once (requests already on its plane finish); returns its
        candidate, None when none ran."""
        rollout = self.rollout
        if rollout is None:
            return None
        self.rollout = None
        self._on_rollout(None)
        self.metrics.record_rollout(None, 0.0, 0.0)
        rollout.close()
        logger.info("rollout of model set %s ended", rollout.candidate)
        if unload:
            self._unload_later(rollout.plane.model_set)
        return rollout.candidate

    def _unload_later(self, ms: ModelSet) -> None:
        async def unload() -> None:
            await asyncio.sleep(self.retire_after_s)
            serving = self.plane.model_set.version
            candidate = self.rollout.candidate if self.rollout is not None else None
            if ms.version not in (serving, candidate):  # not taken up again meanwhile
                await unload_nets(self.backends.settings.triton_addr, nets_of(ms))

        task = asyncio.create_task(unload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def follow_rollout(self) -> None:
        """Runs the rollout the store names (set through another replica, or before a
        restart), or ends this one when the store names none."""
        wanted = await asyncio.to_thread(model_store.rollout, self.store_dir)
        if wanted is not None and wanted.candidate == self.plane.model_set.version:
            wanted = None  # promoted; the store's record outlived it by a crash
        rollout = self.rollout
        if (rollout.state if rollout is not None else None) == wanted or self._lock.locked():
            return
        async with self._lock:
            if wanted is None:
                self._end_rollout(unload=True)
            else:
                await self._set_rollout(wanted, persist=False)

    async def follow(self, interval_s: float = FOLLOW_S) -> None:
        """Forever: switch when the store names another current set (a switch made through
        another replica), run the rollout it names, and give every Triton server that lacks
        this set's nets (one that restarted, or was added) its nets; until then calls skip it
        (TritonClient.refresh)."""
        try:  # a restarted router takes its rollout up again at once
            await self.follow_rollout()
        except (FieldlensError, OSError) as exc:
            logger.warning("rollout follow-up failed (retrying): %s", exc)
        while True:
            await asyncio.sleep(interval_s)
            try:
                wanted = await asyncio.to_thread(model_store.current, self.store_dir)
                if wanted and wanted != self.plane.model_set.version and not self._lock.locked():
                    await self.switch(wanted)
                await self.follow_rollout()
                await self.catch_up_triton()
                for client in (self.backends.tiny, self.backends.specialist):
                    await client.refresh()  # replicas come and go
            except (FieldlensError, OSError) as exc:
                logger.warning("model-set follow-up failed (retrying): %s", exc)

    async def catch_up_triton(self) -> list[str]:
        """Loads the serving set's nets on every Triton server that lacks them; returns those
        servers."""
        s, triton = self.backends.settings, self.backends.triton
        sets = [self.plane.model_set]
        if self.rollout is not None:  # the candidate answers requests too
            sets.append(self.rollout.plane.model_set)
        nets = [n for ms in sets for n in nets_of(ms)]
        lacking = await triton.refresh(nets)
        if lacking:
            for ms in sets:
                logger.warning("triton servers without model set %s: %s", ms.version, lacking)
                await ensure_model_set(
                    s.triton_addr, self.store_dir, ms, s.triton_instance_kind, only=sorted(lacking)
                )
            await triton.refresh(nets)
        return sorted(lacking)

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.close()
        for task in self._tasks:
            task.cancel()
