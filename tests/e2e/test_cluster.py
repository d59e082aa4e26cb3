"""End-to-end: the started local cluster driven as a client would.

The cluster is the session's, shared with other modules and run in any order: a test that kills
a component starts it again before it ends, and counts are deltas against what a test found.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import time
import urllib.request

import grpc
import pytest
from e2e_cluster import metric_value
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

from fieldlens import cluster, gallery
from fieldlens.backends.vector_store import LOCK_FILENAME
from fieldlens.common import runtime
from fieldlens.common.settings import DEFAULT_MAX_PIXELS, DEFAULT_SPECIALIST_MIN_P
from fieldlens.router.model_sets import collection_name
from fieldlens.v1 import classifier_pb2, router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GALLERY_PER_CLASS = 3
KNOWN_IMAGES = 12
TOP_K = 10
# How long the router may take to use a restarted component again.
RESTORED_S = 60.0


@pytest.fixture(scope="module")
def indexed(live_cluster, data_dir, validation_keys):
    taxa = live_cluster.router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa
    classes = {t.id for t in taxa if t.rank == "class"}
    items = list(gallery.gallery_items(data_dir, GALLERY_PER_CLASS, validation_keys, classes))
    before = live_cluster.router.GetInfo(router_pb2.GetInfoRequest(), timeout=10).exemplar_count
    summary = gallery.upload(live_cluster.router, items, len(items), "e2e", live_cluster.token)
    return items, summary, before


def _classify(live_cluster, data: bytes, **kw) -> router_pb2.ClassifyResponse:
    return live_cluster.router.Classify(router_pb2.ClassifyRequest(image=data, **kw), timeout=30)


def _until_cached(live_cluster, data: bytes, **kw) -> router_pb2.ClassifyResponse:
    """The answer once it is served from the cache: the write-back is off the response path,
    so it may land a moment after the first answer."""
    for _ in range(50):
        r = _classify(live_cluster, data, **kw)
        if r.cached:
            break
        time.sleep(0.02)
    return r


def test_every_service_reports_serving(live_cluster):
    cfg = live_cluster.cfg
    for name in ("router", "specialist", "tiny"):
        with grpc.insecure_channel(cfg.addr(cfg.service_port(name))) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_the_router(live_cluster):
    services = ProtoReflectionDescriptorDatabase(live_cluster.channel).get_services()
    assert "fieldlens.v1.Router" in services
    assert "grpc.health.v1.Health" in services


def test_gallery_is_indexed_and_counted(live_cluster, indexed):
    items, summary, before = indexed
    assert summary.indexed + summary.duplicates == len(items) > 0
    assert summary.rejected == 0
    info = live_cluster.router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert info.exemplar_count == before + summary.indexed
    assert info.broad_model == "broad"  # the boot set's net, from Triton's own repository
    # Re-indexing the same images is idempotent (id = content hash).
    again = gallery.upload(live_cluster.router, items[:20], 20, "e2e", live_cluster.token)
    assert again.indexed == 20
    info2 = live_cluster.router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert info2.exemplar_count == info.exemplar_count


def test_known_images_return_their_class(live_cluster, indexed):
    items, *_ = indexed
    # One image each from KNOWN_IMAGES different classes, spread over the class list.
    by_class = {}
    for key, data, wnid in items:
        by_class.setdefault(wnid, (key, data))
    classes = sorted(by_class)[:: max(1, len(by_class) // KNOWN_IMAGES)][:KNOWN_IMAGES]
    found, self_exemplars = 0, 0
    for wnid in classes:
        _, data = by_class[wnid]
        r = _classify(live_cluster, data, top_k=TOP_K, skip_cache=True)
        labels = [s.taxon.id for s in r.suggestions]
        assert r.answer.taxon.id and r.answer.path[0].id == "root"
        assert [s.probability for s in r.suggestions] == sorted(
            (s.probability for s in r.suggestions), reverse=True
        )
        if wnid in labels:
            found += 1
            hit = r.suggestions[labels.index(wnid)]
            # The image itself is in the gallery, so it is its own nearest exemplar.
            if hit.exemplars and hit.exemplars[0].similarity > 0.999:
                self_exemplars += 1
    assert found >= 0.6 * len(classes), f"true class in top-{TOP_K} for {found}/{len(classes)}"
    assert self_exemplars >= found - 1


def test_specialists_run_only_for_likely_groups(live_cluster, indexed, manifest):
    """A specialist-routed group below FIELDLENS_SPECIALIST_MIN_P is scored by tiny instead."""
    routed = {c for c, route in manifest["routing"].items() if route == "specialist"}
    assert routed, "the shipped model set routes insect and other_invertebrate to specialists"
    seen = {"specialist": 0, "tiny": 0}
    for _, data, _ in indexed[0][:60]:
        r = _classify(live_cluster, data, skip_cache=True)
        for d in r.dispatch:
            if d.category not in routed:
                continue
            if d.served_by == classifier_pb2.SPECIALIST:
                assert d.probability >= DEFAULT_SPECIALIST_MIN_P, d
                seen["specialist"] += 1
            else:
                assert d.probability < DEFAULT_SPECIALIST_MIN_P and not d.fell_back, d
                seen["tiny"] += 1
    assert seen["specialist"] and seen["tiny"], seen


def test_repeat_is_a_cache_hit(live_cluster, indexed):
    _, data, _ = indexed[0][5]
    first = _classify(live_cluster, data)
    second = _until_cached(live_cluster, data)
    assert second.cached
    assert second.answer.taxon.id == first.answer.taxon.id
    assert [s.taxon.id for s in second.suggestions] == [s.taxon.id for s in first.suggestions]
    stages = {t.stage for t in second.timings}
    assert "broad" not in stages  # a hit never reaches Triton


def test_corrupt_image_is_rejected_and_server_keeps_serving(live_cluster, indexed):
    _, data, _ = indexed[0][0]
    for bad in (b"not an image", data[: len(data) // 3], b""):
        with pytest.raises(grpc.RpcError) as err:
            _classify(live_cluster, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(grpc.RpcError) as err:
        _classify(live_cluster, gif.getvalue())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "JPEG" in err.value.details()
    # Over the image limit (4 MiB) but under the message limit: rejected by the router.
    with pytest.raises(grpc.RpcError) as err:
        _classify(live_cluster, data + b"\0" * (5 << 20))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in err.value.details()
    # Over the message limit (8 MiB): refused by gRPC before any handler runs.
    with pytest.raises(grpc.RpcError) as err:
        _classify(live_cluster, b"\0" * (9 << 20))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for options in ({"top_k": -1}, {"top_k": 1000}, {"threshold": 1.5}, {"neighbours": 99}):
        with pytest.raises(grpc.RpcError) as err:
            _classify(live_cluster, data, **options)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _classify(live_cluster, data).suggestions


def test_min_precision_is_read_off_the_served_precision_curve(live_cluster, indexed, manifest):
    info = live_cluster.router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    cal = manifest["calibration"]
    assert info.calibration_power == pytest.approx(cal["power"])
    assert info.default_threshold == pytest.approx(cal["default_threshold"])
    curve = [(p.threshold, p.precision) for p in info.precision_curve]
    assert len(curve) == len(cal["precision_curve"]) > 10

    def lowest(target: float) -> float:
        ok = [t for i, (t, _) in enumerate(curve) if all(p >= target for _, p in curve[i:])]
        return ok[0] if ok else curve[-1][0]

    _, data, _ = indexed[0][7]
    default = _classify(live_cluster, data, skip_cache=True)
    assert default.threshold == pytest.approx(info.default_threshold)
    depth = default.answer.taxon.depth
    for target in (0.8, 0.95, 0.99):
        r = _classify(live_cluster, data, min_precision=target, skip_cache=True)
        assert r.threshold == pytest.approx(lowest(target))
        assert r.answer.probability >= r.threshold - 1e-6
        # A stricter target never answers deeper than a looser one.
        if target > 0.9:
            assert r.answer.taxon.depth <= depth
    for options in ({"min_precision": 0.9, "threshold": 0.5}, {"min_precision": 1.5}):
        with pytest.raises(grpc.RpcError) as err:
            _classify(live_cluster, data, **options)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_reports_bad_items_without_ending(live_cluster, indexed):
    good = [d for _, d, _ in indexed[0][10:13]]
    requests = [
        router_pb2.ClassifyRequest(image=good[0], request_id="a"),
        router_pb2.ClassifyRequest(image=b"junk", request_id="b"),
        router_pb2.ClassifyRequest(image=good[1], request_id="c"),
    ]
    replies = list(live_cluster.router.ClassifyStream(iter(requests), timeout=60))
    assert [r.request_id for r in replies] == ["a", "b", "c"]
    assert replies[1].HasField("error")
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not replies[0].HasField("error") and replies[0].suggestions
    assert not replies[2].HasField("error") and replies[2].suggestions


def test_metrics_are_exported(live_cluster, indexed):
    cfg = live_cluster.cfg
    # Traffic of its own (a miss, then a hit, and a refused image): the router may have been
    # restarted by another test, its counters with it.
    _, data, _ = indexed[0][8]
    assert _until_cached(live_cluster, data).cached
    with pytest.raises(grpc.RpcError, match="not a decodable image") as err:
        _classify(live_cluster, b"not an image")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{cfg.router_metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    requests = [
        line for line in body.splitlines() if line.startswith("fieldlens_grpc_requests_total{")
    ]
    assert any('method="Classify"' in line and 'code="OK"' in line for line in requests)
    assert any('code="INVALID_ARGUMENT"' in line for line in requests)
    assert "fieldlens_stage_duration_seconds_bucket" in body and 'stage="broad"' in body
    assert 'fieldlens_cache_requests_total{result="hit"}' in body
    assert "fieldlens_dispatch_total" in body
    # Each service says how it runs (common/runtime.py): uvloop, gRPC's core doing its own
    # I/O, start-up objects frozen out of the collector.
    for name in ("router", "tiny", "specialist"):
        url = f"http://127.0.0.1:{cfg.metrics_port(name)}/metrics"
        runtime_lines = [
            line
            for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines()
            if line.startswith("fieldlens_runtime{")
        ]
        assert len(runtime_lines) == 1, (name, runtime_lines)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', runtime_lines[0]))
        assert labels["event_loop"] == "uvloop", (name, labels)
        assert labels["grpc_experiments"] == runtime.GRPC_EXPERIMENTS, (name, labels)
        assert int(labels["gc_frozen"]) > 10_000, (name, labels)


def _restored(live_cluster, name: str, data: bytes, degradation: str) -> None:
    """Starts `name` again and waits until the router uses it again: `data`'s answer no
    longer carries `degradation` (the router's client reconnects with a backoff, and the
    cache's circuit stays open for a cool-down), so later tests find the cluster whole."""
    cluster.start(live_cluster.cfg, [name])
    deadline = time.monotonic() + RESTORED_S
    while degradation in _degradation_kinds(_classify(live_cluster, data, skip_cache=True)):
        assert time.monotonic() < deadline, f"the router does not use {name} again"
        time.sleep(0.2)


def test_redis_down_still_answers_flagged_degraded(live_cluster, indexed):
    cluster.kill(live_cluster.cfg, "redis")
    _, data, wnid = indexed[0][30]
    try:
        r = _classify(live_cluster, data)
        kinds = {router_pb2.DegradationKind.Name(d.kind) for d in r.degradations}
        assert "CACHE_UNAVAILABLE" in kinds
        assert r.suggestions and not r.cached
        # Still serving, and quickly failing over: a second request is answered too.
        assert _classify(live_cluster, indexed[0][31][1]).suggestions
    finally:
        _restored(live_cluster, "redis", data, "CACHE_UNAVAILABLE")


def test_specialist_down_falls_back_to_tiny(live_cluster, indexed, manifest):
    routed = [c for c, route in manifest["routing"].items() if route == "specialist"]
    assert routed, "the shipped model set routes insect and other_invertebrate to specialists"
    items, *_ = indexed
    labels = {t for b in routed for t in manifest["specialists"][b]["labels"]}
    for _, data, wnid in items:
        if wnid not in labels:
            continue
        before = _classify(live_cluster, data, skip_cache=True)
        if any(
            d.category in routed and d.served_by == classifier_pb2.SPECIALIST
            for d in before.dispatch
        ):
            break
    else:
        pytest.fail("no gallery image of a specialist-routed class was dispatched to it")
    cluster.kill(live_cluster.cfg, "specialist")
    try:
        after = _classify(live_cluster, data, skip_cache=True)
    finally:
        _restored(live_cluster, "specialist", data, "SPECIALIST_FALLBACK")
    assert after.suggestions
    fell = [d for d in after.dispatch if d.category in routed]
    assert fell and all(d.fell_back and d.served_by == classifier_pb2.TINY for d in fell)
    kinds = {router_pb2.DegradationKind.Name(d.kind) for d in after.degradations}
    assert "SPECIALIST_FALLBACK" in kinds


def _bomb(fmt: str, width: int, height: int) -> bytes:
    """A photo of `width` x `height` pixels that is small in bytes (one colour compresses)."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 60)).save(out, format=fmt)
    return out.getvalue()


def test_images_over_the_pixel_limit_are_refused_and_the_router_keeps_serving(
    live_cluster, indexed
):
    """The decompression-bomb guard over gRPC: more than FIELDLENS_MAX_PIXELS declared in the
    header is INVALID_ARGUMENT, saying so, however few bytes the file has; the limit itself
    is served."""
    side = 4000
    assert side * side == DEFAULT_MAX_PIXELS
    for fmt in ("PNG", "JPEG"):
        over = _bomb(fmt, side + 1, side)
        assert len(over) < 1 << 20  # far under the byte limit: only the pixel count refuses it
        with pytest.raises(grpc.RpcError) as err:
            _classify(live_cluster, over, skip_cache=True)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fmt
        details = err.value.details()
        assert f"{side + 1}x{side} = {(side + 1) * side} pixels" in details, details
        assert f"the limit is {DEFAULT_MAX_PIXELS}" in details, details
        assert "decompression-bomb" in details, details
    at_limit = _classify(live_cluster, _bomb("JPEG", side, side), skip_cache=True)
    assert at_limit.suggestions
    # Still serving: a photo is answered, and the health service says so.
    _, data, _ = indexed[0][9]
    assert _classify(live_cluster, data, skip_cache=True).suggestions
    with grpc.insecure_channel(live_cluster.router_addr) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _degradation_kinds(r: router_pb2.ClassifyResponse) -> set[str]:
    return {router_pb2.DegradationKind.Name(d.kind) for d in r.degradations}


def _neighbour_messages(r: router_pb2.ClassifyResponse) -> list[str]:
    kind = router_pb2.DegradationKind.Value("NEIGHBOURS_UNAVAILABLE")
    return [d.message for d in r.degradations if d.kind == kind]


def _restart_router(cfg: cluster.ClusterConfig) -> None:
    assert cluster.kill(cfg, "router")  # SIGKILL: the Edge shard's owner lock goes with it
    cluster.start(cfg, ["router"])


def test_a_vector_store_it_cannot_open_degrades_answers_which_are_not_cached(live_cluster, indexed):
    """NEIGHBOURS_UNAVAILABLE: a router whose exemplar store will not open (here another
    process owns the Qdrant Edge shard) answers without exemplars, flags it, and does not cache
    those answers though Redis is up; with the store back, answers have exemplars again."""
    cfg, router = live_cluster.cfg, live_cluster.router
    info = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert info.exemplar_count > 0
    shard = cfg.qdrant_dir / collection_name(info.embedding_version)
    # Options of its own: no other test has cached an answer under this key.
    options = {"top_k": 7, "neighbours": 3}
    _, data, _ = indexed[0][40]
    metrics = cfg.router_metrics_port
    assert cluster.kill(cfg, "router")
    fd = os.open(shard / LOCK_FILENAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cluster.start(cfg, ["router"])
        assert router.GetInfo(router_pb2.GetInfoRequest(), timeout=10).exemplar_count == 0
        for _ in range(10):  # the write-back of an answer is off the response path: wait
            r = _classify(live_cluster, data, **options)
            assert r.suggestions and not r.cached
            assert _neighbour_messages(r) == ["no vector store"]
            assert not [e for s in r.suggestions for e in s.exemplars]
            time.sleep(0.05)
        flagged = metric_value(
            metrics, "fieldlens_degradations_total", kind="neighbours_unavailable"
        )
        assert flagged >= 10
    finally:
        os.close(fd)
        _restart_router(cfg)
    assert router.GetInfo(router_pb2.GetInfoRequest(), timeout=10).exemplar_count == (
        info.exemplar_count
    )
    back = _until_cached(live_cluster, data, **options)
    assert back.cached and not back.degradations
    assert [e for s in back.suggestions for e in s.exemplars]
