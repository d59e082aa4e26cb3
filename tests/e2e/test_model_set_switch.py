"""End-to-end model-set switch: a new model set is loaded next to the serving one (Triton
explicit model control, classifier services holding both) and served without a failed request,
learned knowledge carried over, writes held back meanwhile, other routers following, and the
choice surviving restarts.

The tests share one cluster and run in any order: each first switches to the set it starts
from (`_serving`), and counts are deltas against what it found.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_cluster import (
    BlobHold,
    Traffic,
    metric_samples,
    publish_rerouted,
    router_replica,
    running,
)
from e2e_cluster import switch as _switch

from fieldlens import cluster, gallery
from fieldlens.backends.triton_repository import nets_of
from fieldlens.backends.triton_server import is_ready, not_ready_models
from fieldlens.backends.vector_store import list_collections
from fieldlens.common import model_store
from fieldlens.common.credentials import bearer
from fieldlens.common.model_set import load_model_set
from fieldlens.common.settings import DEFAULT_SPECIALIST_MIN_P
from fieldlens.router.model_sets import FOLLOW_S, RETIRE_AFTER_S, STAGING_SUFFIX, collection_name
from fieldlens.v1 import classifier_pb2, router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPECIALIST_GROUP = "broad/insect"  # moved to tiny by the second set
OTHER_SPECIALIST_GROUP = "broad/other_invertebrate"  # a specialist's in both sets
# A replica notices a switch within FOLLOW_S, then makes its own; this much more is polling
# and a loaded machine's scheduling.
FOLLOW_SLACK_S = 3.0
# How long a write RPC may wait before it counts as not refused at once.
WRITE_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def images(data_dir) -> list[bytes]:
    """Three photos of each of the first four classes, class by class."""
    classes = load_model_set(cluster.ClusterConfig().models_dir).taxonomy.class_ids[:4]
    return [data for imgs in gallery.class_samples(data_dir, classes, 3).values() for data in imgs]


@pytest.fixture(scope="module")
def switch_cluster(tmp_path_factory, images):
    """A throwaway cluster on the shipped model set, and a second set published in its store:
    the same nets, released again with the insect group moved from its specialist to tiny."""
    cfg = cluster.ClusterConfig(run_dir=tmp_path_factory.mktemp("switch")).with_free_ports()
    old_version, new_version = publish_rerouted(
        cfg, tmp_path_factory.mktemp("next"), "next", SPECIALIST_GROUP
    )
    with running(cfg) as (_, router):
        yield cfg, router, old_version, new_version, images


@dataclass(frozen=True)
class Spare:
    """Photos the newer tests use, apart from the ones above (whose indices tests rely on)."""

    writes: list[tuple[bytes, str]]  # (photo, its trained class) to learn
    routed: list[bytes]  # photos of the specialists' groups: where routing shows


@pytest.fixture(scope="module")
def spare(data_dir) -> Spare:
    ms = load_model_set(cluster.ClusterConfig().models_dir)
    writers = ms.taxonomy.class_ids[4:6]
    photos = gallery.class_samples(data_dir, writers, 1)
    routed = [
        *ms.specialists[SPECIALIST_GROUP].labels[:2],
        *ms.specialists[OTHER_SPECIALIST_GROUP].labels[:2],
    ]
    return Spare(
        writes=[(photos[w][0], w) for w in writers],
        routed=[p for ps in gallery.class_samples(data_dir, routed, 3).values() for p in ps],
    )


def _every_other(n: int) -> bool:
    """Every other call skips the cache: the nets themselves answer during the switch."""
    return n % 2 == 1


def _info(router) -> router_pb2.GetInfoResponse:
    return router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)


def _serving(router, cfg, version: str) -> router_pb2.GetInfoResponse:
    """Switches to `version` unless it serves already: the state a test starts from."""
    if _info(router).model_set_version != version:
        _switch(router, cfg, version)
    info = _info(router)
    assert info.model_set_version == version
    return info


def _switch_metrics(cfg) -> tuple[float, float, float]:
    """(switches that went ok, switch-duration count, its sum) from the router's /metrics."""
    samples = metric_samples(cfg.router_metrics_port)
    ok = sum(
        m.value for m in samples["fieldlens_model_set_switches_total"] if m.labels["result"] == "ok"
    )
    (count,) = samples["fieldlens_model_set_switch_seconds_count"]
    (total,) = samples["fieldlens_model_set_switch_seconds_sum"]
    return ok, count.value, total.value


def _until(what: Callable[[], Any], timeout_s: float, interval_s: float = 0.05) -> Any:
    """The first truthy result of `what`, polled until `timeout_s` passes (then a failure)."""
    deadline = time.monotonic() + timeout_s
    while not (found := what()):
        assert time.monotonic() < deadline, f"still not true after {timeout_s:.0f} s"
        time.sleep(interval_s)
    return found


def test_switch_needs_the_token_and_a_published_version(switch_cluster):
    cfg, router, *_ = switch_cluster
    with pytest.raises(grpc.RpcError) as err:
        router.SwitchModelSet(router_pb2.SwitchModelSetRequest(version="x"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        _switch(router, cfg, "ms-not-published")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not published" in err.value.details()


def test_switch_serves_the_new_set_without_a_failed_request(switch_cluster):
    cfg, router, old, new, images = switch_cluster
    info = _serving(router, cfg, old)
    assert info.routing[SPECIALIST_GROUP] == "specialist"
    learned = router.Learn(
        router_pb2.LearnRequest(image=images[0], taxon_id=_leaf(router)),
        timeout=30,
        metadata=bearer(cfg.write_token()),
    )
    assert not learned.duplicate
    assert learned.learned_total == info.learned_examples + 1
    switches, count, total = _switch_metrics(cfg)
    with Traffic(router, images, skip_cache=_every_other) as traffic:
        time.sleep(1.0)
        started = time.monotonic()
        reply = _switch(router, cfg, new)
        ended = time.monotonic()
        time.sleep(1.0)
    assert traffic.errors == []
    assert (reply.model_set_version, reply.previous_model_set_version) == (new, old)
    # Everything learned is learned again (the sets' journals hold the same examples), and
    # nothing is re-embedded: the same embedding space.
    assert (reply.relearned, reply.reindexed) == (learned.learned_total, 0)
    during = [a.version for a in traffic.answers if started <= a.sent <= ended]
    print(
        f"switch took {reply.seconds:.2f} s; {len(during)} answers during it "
        f"({traffic.computed} computed by the nets in the whole run), none failed"
    )
    assert traffic.computed > 0
    assert during and set(during) <= {old, new}  # answered all along, from the old set
    assert {a.version for a in traffic.answers if a.sent < started} == {old}
    assert {a.version for a in traffic.answers if a.sent > ended} == {new}
    info = _info(router)
    assert (info.model_set_version, info.learned_examples) == (new, learned.learned_total)
    assert info.routing[SPECIALIST_GROUP] == "tiny"
    assert info.writes_blocked == ""  # writes are accepted again
    # Triton serves the new set's nets under their own names, next to the boot set's.
    suffix = model_store.triton_suffix(new)
    triton_http = cfg.addr(cfg.triton_http_port)
    assert is_ready(triton_http, ["broad" + suffix, "specialist_insect" + suffix])
    assert info.broad_model == "broad" + suffix
    assert model_store.current(cfg.model_store) == new
    # SREs see which set serves, and how the switches went.
    samples = metric_samples(cfg.router_metrics_port)
    serving = [(m.labels["version"], m.value) for m in samples["fieldlens_model_set"]]
    assert serving == [(new, 1.0)]
    switches_after, count_after, total_after = _switch_metrics(cfg)
    assert (switches_after - switches, count_after - count) == (1.0, 1.0)
    assert total_after - total == pytest.approx(reply.seconds, rel=0.05, abs=0.05)


def _routes(router, image: bytes) -> list[tuple[str, int, bool, bool]]:
    """Where an answer's groups went: (group, served by, fell back, P(group) reached the
    specialist threshold), as the nets themselves answer (no cache)."""
    r = router.Classify(router_pb2.ClassifyRequest(image=image, skip_cache=True), timeout=60)
    return sorted(
        (d.category, d.served_by, d.fell_back, d.probability >= DEFAULT_SPECIALIST_MIN_P)
        for d in r.dispatch
    )


def test_the_switch_survives_restarts(switch_cluster, spare):
    """README: learned examples, the routing of the new set and the choice itself survive a
    kill -9 of every service and Triton: after the restart each photo's groups go where they
    went before (the switched set sends its formerly specialist group to tiny)."""
    cfg, router, _, new, images = switch_cluster
    info = _serving(router, cfg, new)
    assert info.routing[SPECIALIST_GROUP] == "tiny"
    assert info.routing[OTHER_SPECIALIST_GROUP] == "specialist"
    before = [_routes(router, p) for p in spare.routed]
    likely = {(g, by) for routes in before for g, by, _, likely in routes if likely}
    # What the switched set changed shows in the answers, and what it kept too.
    assert (SPECIALIST_GROUP, classifier_pb2.TINY) in likely
    assert (SPECIALIST_GROUP, classifier_pb2.SPECIALIST) not in likely
    assert (OTHER_SPECIALIST_GROUP, classifier_pb2.SPECIALIST) in likely
    for name in cluster.COMPONENTS:
        cluster.kill(cfg, name)
    cluster.start(cfg)
    r = router.Classify(router_pb2.ClassifyRequest(image=images[1]), timeout=60)
    assert r.model_set_version == new
    again = _info(router)
    assert (again.model_set_version, again.learned_examples) == (new, info.learned_examples)
    assert dict(again.routing) == dict(info.routing)
    assert [_routes(router, p) for p in spare.routed] == before


def test_switching_back_to_the_boot_set(switch_cluster):
    cfg, router, old, new, images = switch_cluster
    info = _serving(router, cfg, new)
    reply = _switch(router, cfg, old)
    assert (reply.model_set_version, reply.previous_model_set_version) == (old, new)
    r = router.Classify(router_pb2.ClassifyRequest(image=images[2], skip_cache=True), timeout=30)
    assert r.model_set_version == old
    assert _info(router).learned_examples == info.learned_examples
    assert _switch(router, cfg, old).seconds == 0.0  # already current: a no-op


def test_a_forgotten_example_stays_forgotten_across_switches(switch_cluster):
    cfg, router, old, new, images = switch_cluster
    token = bearer(cfg.write_token())
    before = _serving(router, cfg, old).learned_examples
    label = router_pb2.NewTaxonLabel(name="switch forget probe", parent_id="broad/cat")
    learned = router.Learn(
        router_pb2.LearnRequest(image=images[1], new_taxon=label), timeout=30, metadata=token
    )
    tid = learned.taxon.id
    assert _switch(router, cfg, new).relearned == before + 1  # the earlier examples and this one

    def state() -> tuple[int, bool]:
        info = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
        taxa = router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa
        return info.learned_examples, tid in {t.id for t in taxa}

    assert state() == (before + 1, True)
    forgot = router.Forget(
        router_pb2.ForgetRequest(exemplar_ids=[learned.exemplar_id]), timeout=60, metadata=token
    )
    assert (forgot.forgotten, list(forgot.removed_taxa)) == (1, [tid])
    # The boot set learned it first, in its own journal: switching back does not restore it,
    # and re-learning what the newer set learned does not bring it back either.
    reply = _switch(router, cfg, old)
    assert reply.model_set_version == old
    assert state() == (before, False)
    r = router.Classify(router_pb2.ClassifyRequest(image=images[1], skip_cache=True), timeout=30)
    assert tid not in {s.taxon.id for s in r.suggestions}


@pytest.fixture(scope="module")
def smoke_set(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """A model set with another backbone (the trainer's smoke profile): (models, nets)."""
    import torch

    from fieldlens.trainer.config import config_for
    from fieldlens.trainer.train import run

    root = tmp_path_factory.mktemp("smoke")
    torch.set_num_threads(2)
    run(config_for("smoke"), data_dir, root / "work", root / "models", root / "repo")
    return root / "models", root / "repo"


@pytest.fixture
def space_cluster(tmp_path_factory, smoke_set, images):
    """A fresh cluster on the shipped set with the smoke set (another embedding space)
    published: a switch between spaces leaves the space switched from in use for
    RETIRE_AFTER_S, so those switches get a cluster of their own."""
    old = load_model_set(cluster.ClusterConfig().models_dir).version
    cfg = cluster.ClusterConfig(run_dir=tmp_path_factory.mktemp("space")).with_free_ports()
    space = model_store.publish(cfg.model_store, *smoke_set)
    with running(cfg) as (_, router):
        yield cfg, router, old, space, images


def _index(router, cfg, images: list[bytes]) -> router_pb2.IndexExemplarsResponse:
    labels = load_model_set(cluster.ClusterConfig().models_dir).taxonomy.class_ids[:4]
    return router.IndexExemplars(
        iter(
            router_pb2.IndexExemplarsRequest(image=img, label=labels[i // 3], source="test")
            for i, img in enumerate(images, start=3)
        ),
        timeout=60,
        metadata=bearer(cfg.write_token()),
    )


def test_a_new_embedding_space_is_re_embedded_before_it_serves(space_cluster):
    cfg, router, old, space, images = space_cluster
    router.Learn(
        router_pb2.LearnRequest(image=images[0], taxon_id=_leaf(router)),
        timeout=30,
        metadata=bearer(cfg.write_token()),
    )
    before = _info(router)
    assert before.model_set_version == old and before.learned_examples == 1
    gallery_images = images[3:]
    indexed = _index(router, cfg, gallery_images)
    assert indexed.indexed + indexed.duplicates == len(gallery_images)
    with Traffic(router, images, skip_cache=_every_other) as traffic:
        reply = _switch(router, cfg, space)
    assert traffic.errors == []
    assert reply.embedding_version != before.embedding_version
    print(f"switch with re-index took {reply.seconds:.2f} s over {len(traffic.answers)} answers")
    # Every stored exemplar with kept bytes (the gallery and the learned one) is re-embedded.
    assert reply.reindexed >= len(gallery_images)
    assert reply.relearned == 1
    info = _info(router)
    assert (info.model_set_version, info.embedding_version) == (space, reply.embedding_version)
    assert info.exemplar_count >= len(gallery_images) and info.learned_examples == 1
    r = router.Classify(router_pb2.ClassifyRequest(image=gallery_images[0]), timeout=30)
    assert r.embedding_version == reply.embedding_version
    # Published under the new space's name, staging gone; the old collection stays.
    collections = list_collections(str(cfg.qdrant_dir))
    assert collection_name(reply.embedding_version) in collections
    assert collection_name(before.embedding_version) in collections
    assert not [c for c in collections if c.endswith(STAGING_SUFFIX)]


def test_switching_straight_back_to_the_embedding_space_just_left(space_cluster):
    cfg, router, old, space, images = space_cluster
    router.Learn(
        router_pb2.LearnRequest(image=images[0], taxon_id=_leaf(router)),
        timeout=30,
        metadata=bearer(cfg.write_token()),
    )
    _index(router, cfg, images[3:])
    before = _info(router)
    _switch(router, cfg, space)
    reply = _switch(router, cfg, old)  # at once: the old space's plane is still retiring
    assert reply.model_set_version == old
    info = _info(router)
    assert (info.exemplar_count, info.learned_examples) == (
        before.exemplar_count,
        before.learned_examples,
    )
    r = router.Classify(router_pb2.ClassifyRequest(image=images[3], skip_cache=True), timeout=30)
    assert not r.degradations and [e for s in r.suggestions for e in s.exemplars]


def test_writes_answer_unavailable_while_a_switch_holds_them(switch_cluster, spare):
    """README, switching step 3: while the new set's plane is built, writes answer
    UNAVAILABLE ("switching ...", retryable) so that none lands in the plane being retired,
    and GetInfo.writes_blocked says why; reads go on from the old set. The switch is held in
    its re-learning by one learned photo whose kept bytes wait (BlobHold)."""
    cfg, router, old, new, images = switch_cluster
    token = bearer(cfg.write_token())
    (held, held_label), (photo, label) = spare.writes
    _serving(router, cfg, old)
    first = router.Learn(
        router_pb2.LearnRequest(image=held, taxon_id=held_label), timeout=30, metadata=token
    )
    assert not first.duplicate  # kept in the blob store, and re-learned by the switch
    before = _info(router)
    outcome: dict[str, Any] = {}

    def switch() -> None:
        try:
            outcome["reply"] = _switch(router, cfg, new)
        except grpc.RpcError as exc:
            outcome["error"] = exc

    writes: dict[str, Callable[[], object]] = {
        "Learn": lambda: router.Learn(
            router_pb2.LearnRequest(image=photo, taxon_id=label),
            timeout=WRITE_TIMEOUT_S,
            metadata=token,
        ),
        "LearnStream": lambda: router.LearnStream(
            iter([router_pb2.LearnRequest(image=photo, taxon_id=label)]),
            timeout=WRITE_TIMEOUT_S,
            metadata=token,
        ),
        "Forget": lambda: router.Forget(
            router_pb2.ForgetRequest(exemplar_ids=[first.exemplar_id]),
            timeout=WRITE_TIMEOUT_S,
            metadata=token,
        ),
        "IndexExemplars": lambda: router.IndexExemplars(
            iter([router_pb2.IndexExemplarsRequest(image=photo, label=label)]),
            timeout=WRITE_TIMEOUT_S,
            metadata=token,
        ),
    }
    thread = threading.Thread(target=switch, daemon=True)
    with BlobHold(cfg.state_dir / "blobs", held) as hold:
        thread.start()
        try:
            blocked = _until(lambda: _info(router).writes_blocked, timeout_s=120)
            assert blocked.startswith(f"switching to model set {new}"), blocked
            for name, write in writes.items():
                with pytest.raises(grpc.RpcError) as err:
                    write()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name
                assert f"switching to model set {new}" in err.value.details(), name
                assert "retry" in err.value.details(), name
            # Reads are answered all along, by the old set.
            r = router.Classify(
                router_pb2.ClassifyRequest(image=images[2], skip_cache=True), timeout=30
            )
            assert r.model_set_version == old
            info = _info(router)
            assert info.model_set_version == old and info.writes_blocked
            assert thread.is_alive() and not outcome, "the switch did not wait for the photo"
        finally:
            hold.release()
            thread.join(timeout=300)
    assert "error" not in outcome, outcome
    assert outcome["reply"].model_set_version == new
    after = _info(router)
    assert (after.model_set_version, after.writes_blocked) == (new, "")
    # Nothing refused was learned (the photo is new to the new set), nothing acknowledged lost.
    assert after.learned_examples == before.learned_examples
    learned = writes["Learn"]()
    assert isinstance(learned, router_pb2.LearnResponse) and not learned.duplicate
    assert learned.learned_total == before.learned_examples + 1


def test_other_routers_follow_a_switch(switch_cluster, tmp_path):
    """README, switching step 4: other router replicas follow within FOLLOW_S (5 s). The
    replica is a second router process on the same Triton, Redis, services and model store."""
    cfg, router, old, new, images = switch_cluster
    _serving(router, cfg, old)
    with router_replica(cfg, tmp_path) as (replica, replica_metrics):
        assert _info(replica).model_set_version == old
        _switch(router, cfg, new)
        switched = time.monotonic()
        _until(lambda: _info(replica).model_set_version == new, timeout_s=120, interval_s=0.2)
        followed = time.monotonic() - switched
        (own,) = metric_samples(replica_metrics)["fieldlens_model_set_switch_seconds_sum"]
        print(
            f"the replica served {new} {followed:.1f} s after the switch "
            f"({own.value:.1f} s of it its own switch)"
        )
        # It noticed within FOLLOW_S, then made the switch itself.
        assert followed <= FOLLOW_S + own.value + FOLLOW_SLACK_S
        for stub in (router, replica):
            r = stub.Classify(
                router_pb2.ClassifyRequest(image=images[0], skip_cache=True), timeout=30
            )
            assert r.model_set_version == new


def test_the_old_nets_are_unloaded_after_the_switch(switch_cluster):
    """README, switching step 4: the old set's nets are unloaded RETIRE_AFTER_S (30 s) after
    the switch (requests begun on the old set may need them until then), and stay unloaded."""
    cfg, router, old, new, _ = switch_cluster
    _serving(router, cfg, old)
    boot = cluster.ClusterConfig()
    old_nets = nets_of(model_store.load_version(cfg.model_store, boot.models_dir, old))
    triton = cfg.addr(cfg.triton_http_port)
    assert not not_ready_models(triton, old_nets)
    _switch(router, cfg, new)
    switched = time.monotonic()
    time.sleep(max(0.0, switched + RETIRE_AFTER_S - 5 - time.monotonic()))
    assert not not_ready_models(triton, old_nets), "the old nets went early"
    _until(lambda: not_ready_models(triton, old_nets) == old_nets, timeout_s=20, interval_s=0.5)
    # Gone for good: no service loads them again (every follow-up has run twice meanwhile).
    stay = time.monotonic() + 2 * FOLLOW_S + FOLLOW_SLACK_S
    while time.monotonic() < stay:
        loaded = sorted(set(old_nets) - set(not_ready_models(triton, old_nets)))
        assert not loaded, f"{loaded} loaded again after the switch retired them"
        time.sleep(0.5)
    # Without the boot nets Triton is still ready: it holds the set the store names current
    # (`fieldlens status`, and `fieldlens up` on the running cluster, read it so).
    assert cluster.status(cfg)["triton"] == "running"


def _leaf(router) -> str:
    taxa = router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa
    return next(t.id for t in taxa if t.rank == "class")
