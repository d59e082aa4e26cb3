"""End-to-end Forget and Learn's input rules, on the shared session cluster.

Other modules share the cluster, so every check here is a delta against the state a test found,
and the photos and taxon names are this module's own (novel classes other modules do not use).
"""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest

from fieldlens import cluster, gallery
from fieldlens.v1 import router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHOTS = 5
HELD_OUT = 15
# test_learn.py learns the first two novel classes; these are the next ones.
FIRST_CLASS = 2


@pytest.fixture(scope="module")
def photos(data_dir) -> list[tuple[dict[str, str], list[bytes]]]:
    classes = gallery.novel_classes(cluster.ClusterConfig().models_dir)[FIRST_CLASS:]
    assert len(classes) >= 3, "the shipped model set holds out five novel classes"
    wnids = [c["wnid"] for c in classes[:3]]
    images = gallery.class_samples(data_dir, wnids, SHOTS + HELD_OUT)
    return [(c, images[c["wnid"]]) for c in classes[:3]]


def _info(router) -> router_pb2.GetInfoResponse:
    return router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)


def _taxa(router) -> set[str]:
    return {t.id for t in router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa}


def _learn(router, token, image: bytes, name: str, parent: str, **kw) -> router_pb2.LearnResponse:
    label = router_pb2.NewTaxonLabel(name=name, parent_id=parent)
    return router.Learn(
        router_pb2.LearnRequest(image=image, new_taxon=label, **kw), timeout=30, metadata=token
    )


def _forget(router, token, ids=(), taxon: str = "") -> router_pb2.ForgetResponse:
    return router.Forget(
        router_pb2.ForgetRequest(exemplar_ids=list(ids), taxon_id=taxon),
        timeout=120,
        metadata=token,
    )


def _classify(router, image: bytes, **kw) -> router_pb2.ClassifyResponse:
    return router.Classify(router_pb2.ClassifyRequest(image=image, **kw), timeout=30)


def _named(r: router_pb2.ClassifyResponse) -> set[str]:
    """Every taxon an answer names: the answer's path, suggestions, their exemplars' labels."""
    out = {t.id for t in r.answer.path}
    for s in r.suggestions:
        out |= {s.taxon.id, *(t.id for t in s.path), *(e.label_id for e in s.exemplars)}
    return out


def _exemplar_ids(r: router_pb2.ClassifyResponse) -> set[str]:
    return {e.id for s in r.suggestions for e in s.exemplars}


def _until_cached(router, image: bytes) -> router_pb2.ClassifyResponse:
    for _ in range(50):  # the cache write-back is off the response path
        r = _classify(router, image)
        if r.cached:
            break
        time.sleep(0.02)
    return r


def test_forget_needs_the_token_and_a_well_formed_request(cluster_up, token):
    router = cluster_up.router
    digest = "ab" * 32
    for metadata in ((), (("authorization", "Bearer not-the-token"),)):
        with pytest.raises(grpc.RpcError) as err:
            _forget(router, metadata, [digest])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for ids, taxon, message in (
        ([], "", "not both"),
        ([digest], "learned/x", "not both"),
        ([], "broad/cat", "not a learned taxon"),
        (["not-a-hash"], "", "SHA-256"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            _forget(router, token, ids, taxon)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()
    # Nothing there: fine, and it says so.
    r = _forget(router, token, [digest])
    assert (r.forgotten, r.learned_forgotten, list(r.not_found)) == (0, 0, [digest])
    r = _forget(router, token, taxon="learned/never_learned_here")
    assert (r.forgotten, list(r.removed_taxa)) == (0, [])


def test_forget_by_exemplar_id_then_learn_again(cluster_up, token, photos):
    router = cluster_up.router
    c, images = photos[0]
    name = f"forget e2e {c['name']}"
    before = _info(router)
    replies = [_learn(router, token, img, name, c["parent"]) for img in images[:3]]
    tid, ids = replies[0].taxon.id, [r.exemplar_id for r in replies]
    info = _info(router)
    assert info.learned_examples == before.learned_examples + 3
    assert info.exemplar_count == before.exemplar_count + 3

    r = _forget(router, token, ids[:1])
    assert (r.forgotten, r.learned_forgotten, list(r.not_found), list(r.removed_taxa)) == (
        1,
        1,
        [],
        [],
    )
    assert r.learned_total == before.learned_examples + 2
    info = _info(router)
    assert info.learned_examples == before.learned_examples + 2
    assert info.exemplar_count == before.exemplar_count + 2
    assert tid in _taxa(router)
    # Its own photo no longer finds itself as evidence.
    assert ids[0] not in _exemplar_ids(_classify(router, images[0], neighbours=10, skip_cache=True))
    again = _forget(router, token, ids[:1])
    assert (again.forgotten, list(again.not_found)) == (0, ids[:1])

    # The last examples go: the taxon goes with them.
    r = _forget(router, token, ids[1:])
    assert (r.forgotten, list(r.removed_taxa)) == (2, [tid])
    assert tid not in _taxa(router)
    assert _info(router).learned_examples == before.learned_examples

    # Learned again afterwards: a new taxon again, not a duplicate.
    back = _learn(router, token, images[0], name, c["parent"])
    assert back.created_taxon and not back.duplicate and back.taxon.id == tid
    assert tid in _taxa(router)
    r = _forget(router, token, taxon=tid)
    assert (r.forgotten, list(r.removed_taxa)) == (1, [tid])


def test_forget_by_taxon_stops_answers_naming_it_and_cached_ones_being_served(
    cluster_up, token, photos
):
    router = cluster_up.router
    c, images = photos[1]
    shots, held_out = images[:SHOTS], images[SHOTS:]
    before = _info(router)
    replies = [_learn(router, token, img, f"forget e2e {c['name']}", c["parent"]) for img in shots]
    tid = replies[0].taxon.id
    # A photo whose answer names the learned taxon, and that answer cached.
    probe = next(
        (img for img in held_out if tid in _named(_classify(router, img, skip_cache=True))), None
    )
    assert probe is not None, f"no held-out photo's answer names {tid}"
    cached = _until_cached(router, probe)
    assert cached.cached and tid in _named(cached)

    r = _forget(router, token, taxon=tid)
    assert (r.forgotten, r.learned_forgotten, list(r.removed_taxa)) == (SHOTS, SHOTS, [tid])
    assert r.learned_total == before.learned_examples
    assert tid not in _taxa(router)
    after = _classify(router, probe)
    assert not after.cached, "a cached answer naming a forgotten taxon was served"
    assert tid not in _named(after)
    learned = {x.exemplar_id for x in replies}
    for img in (*shots, *held_out):
        got = _classify(router, img, neighbours=10)
        assert tid not in _named(got) and not (_exemplar_ids(got) & learned)
    info = _info(router)
    assert (info.learned_examples, info.exemplar_count) == (
        before.learned_examples,
        before.exemplar_count,
    )
    again = _forget(router, token, taxon=tid)
    assert (again.forgotten, list(again.removed_taxa)) == (0, [])


def test_forgetting_an_indexed_exemplar_removes_it_from_the_index_only(cluster_up, token, photos):
    router = cluster_up.router
    c, images = photos[0]
    trained = sorted(
        t.id
        for t in router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa
        if t.rank == "class" and not t.id.startswith("learned/")
    )[0]
    photo = images[-1]
    before = _info(router)
    reply = router.IndexExemplars(
        iter([router_pb2.IndexExemplarsRequest(image=photo, label=trained, source="e2e-forget")]),
        timeout=60,
        metadata=token,
    )
    assert reply.indexed == 1
    assert _info(router).exemplar_count == before.exemplar_count + 1
    exemplar = hashlib.sha256(photo).hexdigest()  # an exemplar's id is its content hash
    r = _forget(router, token, [exemplar])
    assert (r.forgotten, r.learned_forgotten, list(r.removed_taxa)) == (1, 0, [])
    info = _info(router)
    assert (info.exemplar_count, info.learned_examples) == (
        before.exemplar_count,
        before.learned_examples,
    )


def test_forget_survives_a_kill_of_router_and_tiny_and_learning_again_after(
    cluster_up, token, photos
):
    router, cfg = cluster_up.router, cluster_up.cfg
    c, images = photos[2]
    name = f"forget e2e {c['name']}"
    replies = [_learn(router, token, img, name, c["parent"]) for img in images[:SHOTS]]
    tid, ids = replies[0].taxon.id, [r.exemplar_id for r in replies]
    assert _forget(router, token, ids[:2]).forgotten == 2
    info = _info(router)
    probe = images[-1]
    answer = _classify(router, probe, skip_cache=True)

    def restart() -> None:
        for component in ("router", "tiny"):
            assert cluster.kill(cfg, component)  # SIGKILL: no chance to flush anything
        cluster.start(cfg)

    restart()
    again = _info(router)
    assert (again.learned_examples, again.exemplar_count) == (
        info.learned_examples,
        info.exemplar_count,
    )
    replayed = _classify(router, probe, skip_cache=True)
    assert [s.taxon.id for s in replayed.suggestions] == [s.taxon.id for s in answer.suggestions]
    for got, want in zip(replayed.suggestions, answer.suggestions, strict=True):
        assert got.probability == pytest.approx(want.probability, rel=1e-4, abs=1e-6)
    assert tid in _taxa(router)

    r = _forget(router, token, ids[2:])
    assert (r.forgotten, list(r.removed_taxa)) == (SHOTS - 2, [tid])
    restart()
    assert tid not in _taxa(router)
    assert _info(router).learned_examples == info.learned_examples - (SHOTS - 2)
    assert tid not in _named(_classify(router, images[2], skip_cache=True))
    # The same photo learned again after the restart: learned, not a duplicate.
    back = _learn(router, token, images[0], name, c["parent"])
    assert back.created_taxon and not back.duplicate
    assert list(_forget(router, token, taxon=tid).removed_taxa) == [tid]


def _still_serving(router, image: bytes) -> None:
    assert _info(router).model_set_version
    assert _classify(router, image).suggestions


@pytest.mark.parametrize(
    ("name", "source", "message"),
    [
        ("x" * 100_000, "", "100000 characters; at most 100"),
        ("snow\x00leopard", "", "non-printable character '\\x00'"),
        ("snow\nleopard", "", "non-printable character '\\n'"),
        ("snow leopard", "s" * (1 << 20), "1048576 bytes of UTF-8; at most 256"),
    ],
)
def test_learn_input_rules_over_grpc(cluster_up, token, photos, name, source, message):
    router = cluster_up.router
    c, images = photos[0]
    learned = _info(router).learned_examples
    with pytest.raises(grpc.RpcError) as err:
        _learn(router, token, images[0], name, c["parent"], source=source)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details() and len(err.value.details()) < 300
    assert _info(router).learned_examples == learned
    _still_serving(router, images[0])


def test_a_photo_learned_under_another_label_is_refused(cluster_up, token, photos):
    router = cluster_up.router
    c, images = photos[1]
    first = _learn(router, token, images[0], "forget e2e first label", c["parent"])
    with pytest.raises(grpc.RpcError) as err:
        _learn(router, token, images[0], "forget e2e second label", c["parent"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details()
    assert "'forget e2e first label'" in details and first.taxon.id in details
    assert "Forget" in details
    # The same rules per item in a stream, which goes on.
    label = router_pb2.NewTaxonLabel(name="forget e2e first label", parent_id=c["parent"])
    other = router_pb2.NewTaxonLabel(name="forget e2e second label", parent_id=c["parent"])
    bad = router_pb2.NewTaxonLabel(name="bad\nname", parent_id=c["parent"])
    reply = router.LearnStream(
        iter(
            [
                router_pb2.LearnRequest(image=images[0], new_taxon=other),
                router_pb2.LearnRequest(image=images[1], new_taxon=bad),
                router_pb2.LearnRequest(image=images[2], new_taxon=label, source="s" * 300),
                router_pb2.LearnRequest(image=images[1], new_taxon=label),
            ]
        ),
        timeout=60,
        metadata=token,
    )
    assert (reply.received, reply.learned, reply.rejected) == (4, 1, 3)
    assert "item 0: FAILED_PRECONDITION" in reply.errors[0]
    assert "'forget e2e first label'" in reply.errors[0]
    assert "item 1: INVALID_ARGUMENT" in reply.errors[1] and "non-printable" in reply.errors[1]
    assert "item 2: INVALID_ARGUMENT" in reply.errors[2] and "256" in reply.errors[2]
    # Relabel = Forget, then Learn.
    assert _forget(router, token, [first.exemplar_id]).forgotten == 1
    second = _learn(router, token, images[0], "forget e2e second label", c["parent"])
    assert second.created_taxon and not second.duplicate
    for taxon in (first.taxon.id, second.taxon.id):
        assert list(_forget(router, token, taxon=taxon).removed_taxa) == [taxon]
    _still_serving(router, images[0])
