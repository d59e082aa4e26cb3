"""End-to-end: what a Learn changes besides the taxon learned, on the shared session cluster.

Cached answers of every group once a learned taxon changes (the global knowledge generation),
cached answers a Redis outage during a Learn would have kept fresh (the bump is retried), and
the routing of a group that holds learned taxa (tiny, not its specialist). Each test leaves the
cluster as it found it: what it learned is forgotten, Redis is restarted without a snapshot.
"""

from __future__ import annotations

import time

import pytest
import redis
from e2e_cluster import metric_value

from fieldlens import cluster, gallery
from fieldlens.backends.cache import generations_key
from fieldlens.common.model_set import load_model_set
from fieldlens.common.settings import DEFAULT_SPECIALIST_MIN_P
from fieldlens.v1 import classifier_pb2, router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPECIALIST_GROUP = "broad/insect"
# test_learn.py and test_forget.py learn the first 25 photos of the novel classes; these
# modules' learned photos come after them, so no photo is learned under two labels.
NOVEL_FROM = 25
NOVEL_PHOTOS = 5
PHOTOS_PER_CLASS = 8
# How long the cache client may take to close its circuit again after Redis is back.
CACHE_BACK_S = 30.0


@pytest.fixture(scope="module")
def model_set():
    return load_model_set(cluster.ClusterConfig().models_dir)


@pytest.fixture(scope="module")
def novel_photos(data_dir) -> list[bytes]:
    """Photos of a class the model set never saw, that no other module learns."""
    (first, *_) = gallery.novel_classes(cluster.ClusterConfig().models_dir)
    images = gallery.class_samples(data_dir, [first["wnid"]], NOVEL_FROM + NOVEL_PHOTOS)
    photos = images[first["wnid"]][NOVEL_FROM:]
    assert len(photos) == NOVEL_PHOTOS
    return photos


def _photos(data_dir, wnids: list[str]) -> dict[str, list[bytes]]:
    found = gallery.class_samples(data_dir, wnids, PHOTOS_PER_CLASS)
    assert all(len(v) == PHOTOS_PER_CLASS for v in found.values()), "too few photos"
    return found


def _validation_photos(data_dir, keys: set[str], wnid: str) -> list[bytes]:
    """Photos of `wnid` from the validation split: never in a gallery another module indexes,
    so learning one and forgetting it leaves the exemplars as they were."""
    out = []
    for key, data, _ in gallery.gallery_items(data_dir, 10**6, set(), {wnid}):
        if key in keys:
            out.append(data)
            if len(out) == PHOTOS_PER_CLASS:
                return out
    raise AssertionError(f"too few validation photos of {wnid}")


def _classify(router, image: bytes, **kw) -> router_pb2.ClassifyResponse:
    return router.Classify(router_pb2.ClassifyRequest(image=image, **kw), timeout=30)


def _until_cached(router, image: bytes) -> router_pb2.ClassifyResponse:
    for _ in range(50):  # the cache write-back is off the response path
        r = _classify(router, image)
        if r.cached:
            return r
        time.sleep(0.02)
    raise AssertionError("the answer was never served from the cache")


def _kinds(r: router_pb2.ClassifyResponse) -> set[str]:
    return {router_pb2.DegradationKind.Name(d.kind) for d in r.degradations}


def _stale(cfg) -> float:
    return metric_value(cfg.router_metrics_port, "fieldlens_cache_requests_total", result="stale")


def _learn_new(router, token, image: bytes, name: str, parent: str) -> router_pb2.LearnResponse:
    label = router_pb2.NewTaxonLabel(name=name, parent_id=parent)
    return router.Learn(
        router_pb2.LearnRequest(image=image, new_taxon=label), timeout=30, metadata=token
    )


def _forget_taxon(router, token, taxon_id: str) -> None:
    reply = router.Forget(router_pb2.ForgetRequest(taxon_id=taxon_id), timeout=120, metadata=token)
    assert list(reply.removed_taxa) == [taxon_id]


def test_a_learned_taxon_makes_cached_answers_of_every_group_stale(
    cluster_up, token, model_set, novel_photos, data_dir
):
    """README, Learning at once: any cached answer is not served once a learned taxon has
    changed (its imprinted row can shift any photo's broad probabilities); here an answer
    that used no group the taxon belongs to, so only the global generation can stop it."""
    router, cfg = cluster_up.router, cluster_up.cfg
    wnid = model_set.taxonomy.class_ids[0]
    probe = _photos(data_dir, [wnid])[wnid][-1]
    cached = _until_cached(router, probe)
    used = {d.category for d in cached.dispatch}
    group = next(
        b
        for b in model_set.taxonomy.broad_ids
        if b not in used and model_set.routing.get(b, "tiny") == "tiny"
    )
    stale = _stale(cfg)
    learned = _learn_new(router, token, novel_photos[0], "e2e global generation", group)
    try:
        assert learned.created_taxon and learned.path[-2].id == group
        after = _classify(router, probe)
        assert not after.cached, f"a cached answer (groups {sorted(used)}) was served"
        assert _stale(cfg) >= stale + 1
    finally:
        _forget_taxon(router, token, learned.taxon.id)


def test_a_generation_bump_redis_missed_during_a_learn_is_retried(
    cluster_up, token, model_set, data_dir, validation_keys
):
    """README, Learning at once: Learn bumps its group's generation in Redis; with Redis
    down the Learn still succeeds and the bump waits. Redis comes back with its data (a
    snapshot, as a Redis with persistence would): the answer cached before the Learn, fresh by
    the generations Redis holds, must not be served, because the bump is made then."""
    router, cfg = cluster_up.router, cluster_up.cfg
    wnid = next(
        c
        for c in model_set.taxonomy.class_ids
        if model_set.routing.get(model_set.taxonomy.broad_of(c) or "", "tiny") == "tiny"
    )
    group = model_set.taxonomy.broad_of(wnid)
    photos = _validation_photos(data_dir, validation_keys, wnid)
    probe = next(
        p
        for p in photos[1:]
        if group in {d.category for d in _classify(router, p, skip_cache=True).dispatch}
    )
    assert _until_cached(router, probe).cached
    version = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10).model_set_version
    client = redis.Redis(host=cfg.host, port=cfg.redis_port, socket_timeout=5)
    generation = int(client.hget(generations_key(version), group) or 0)
    client.save()  # the snapshot the restarted Redis loads: the cached answer and generations
    snapshot = cfg.run_dir / "redis" / "dump.rdb"
    stale = _stale(cfg)
    assert cluster.kill(cfg, "redis")
    learned = None
    try:
        learned = router.Learn(
            router_pb2.LearnRequest(image=photos[0], taxon_id=wnid), timeout=30, metadata=token
        )
        assert not learned.duplicate
        during = _classify(router, probe)
        assert not during.cached and "CACHE_UNAVAILABLE" in _kinds(during)
        cluster.start(cfg, ["redis"])
        # Back with the generation of before the Learn: only the retried bump moves it.
        assert int(client.hget(generations_key(version), group) or 0) == generation
        deadline = time.monotonic() + CACHE_BACK_S
        after = _classify(router, probe)
        while "CACHE_UNAVAILABLE" in _kinds(after):  # until the cache client trusts Redis again
            assert time.monotonic() < deadline, "the cache never came back"
            time.sleep(0.2)
            after = _classify(router, probe)
        assert not after.cached, "the answer cached before the Learn was served"
        assert int(client.hget(generations_key(version), group) or 0) > generation
        assert _stale(cfg) >= stale + 1
    finally:
        cluster.start(cfg, ["redis"])
        snapshot.unlink(missing_ok=True)  # a later restart must not bring old generations back
        client.close()
        if learned is not None:
            router.Forget(
                router_pb2.ForgetRequest(exemplar_ids=[learned.exemplar_id]),
                timeout=120,
                metadata=token,
            )


def test_a_group_holding_learned_taxa_is_served_by_tiny(
    cluster_up, token, model_set, novel_photos, data_dir
):
    """README, Learning at once: a broad group holding learned taxa is served by the tiny
    ensemble, since its specialist net was trained before those taxa existed; once they are
    forgotten, its specialist serves it again."""
    router = cluster_up.router
    assert model_set.routing[SPECIALIST_GROUP] == "specialist"
    labels = model_set.specialists[SPECIALIST_GROUP].labels[:2]
    photos = [p for ps in _photos(data_dir, list(labels)).values() for p in ps]

    def served(r: router_pb2.ClassifyResponse) -> list[router_pb2.Dispatch]:
        return [d for d in r.dispatch if d.category == SPECIALIST_GROUP]

    def by_specialist(p: bytes) -> bool:
        (d,) = served(_classify(router, p, skip_cache=True)) or [None]
        return d is not None and d.served_by == classifier_pb2.SPECIALIST

    probe = next((p for p in photos if by_specialist(p)), None)
    assert probe is not None, f"no photo of {labels} was dispatched to the specialist"
    learned = _learn_new(router, token, novel_photos[1], "e2e learned insect", SPECIALIST_GROUP)
    try:
        assert learned.created_taxon
        r = _classify(router, probe, skip_cache=True)
        (d,) = served(r)
        assert d.probability >= DEFAULT_SPECIALIST_MIN_P  # the specialist's, by its routing
        assert d.served_by == classifier_pb2.TINY and not d.fell_back, d
        assert "SPECIALIST_FALLBACK" not in _kinds(r)
    finally:
        _forget_taxon(router, token, learned.taxon.id)
    assert by_specialist(probe), "the specialist did not serve its group again after Forget"
