"""End-to-end: the started local cluster driven as a client would (tests run in file order)."""

from __future__ import annotations

import io
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

from fieldlens import cluster, gallery
from fieldlens.common.settings import DEFAULT_SPECIALIST_MIN_P
from fieldlens.v1 import classifier_pb2, router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GALLERY_PER_CLASS = 3
KNOWN_IMAGES = 12
TOP_K = 10


@pytest.fixture(scope="module")
def indexed(live_cluster, data_dir, validation_keys):
    taxa = live_cluster.router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa
    classes = {t.id for t in taxa if t.rank == "class"}
    items = list(gallery.gallery_items(data_dir, GALLERY_PER_CLASS, validation_keys, classes))
    summary = gallery.upload(live_cluster.router, items, len(items), "e2e", live_cluster.token)
    return items, summary


def _classify(live_cluster, data: bytes, **kw) -> router_pb2.ClassifyResponse:
    return live_cluster.router.Classify(router_pb2.ClassifyRequest(image=data, **kw), timeout=30)


def _until_cached(live_cluster, data: bytes) -> router_pb2.ClassifyResponse:
    """The answer once it is served from the cache: the write-back is off the response path,
    so it may land a moment after the first answer."""
    for _ in range(50):
        r = _classify(live_cluster, data)
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
    items, summary = indexed
    assert summary.indexed + summary.duplicates == len(items) > 0
    assert summary.rejected == 0
    info = live_cluster.router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert info.exemplar_count == summary.indexed
    assert info.broad_model == "broad"  # the boot set's net, from Triton's own repository
    # Re-indexing the same images is idempotent (id = content hash).
    again = gallery.upload(live_cluster.router, items[:20], 20, "e2e", live_cluster.token)
    assert again.indexed == 20
    info2 = live_cluster.router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert info2.exemplar_count == info.exemplar_count


def test_known_images_return_their_class(live_cluster, indexed):
    items, _ = indexed
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


def test_redis_down_still_answers_flagged_degraded(live_cluster, indexed):
    cluster.kill(live_cluster.cfg, "redis")
    _, data, wnid = indexed[0][30]
    r = _classify(live_cluster, data)
    kinds = {router_pb2.DegradationKind.Name(d.kind) for d in r.degradations}
    assert "CACHE_UNAVAILABLE" in kinds
    assert r.suggestions and not r.cached
    # Still serving, and quickly failing over: a second request is answered too.
    assert _classify(live_cluster, indexed[0][31][1]).suggestions


def test_specialist_down_falls_back_to_tiny(live_cluster, indexed, manifest):
    routed = [c for c, route in manifest["routing"].items() if route == "specialist"]
    assert routed, "the shipped model set routes insect and other_invertebrate to specialists"
    items, _ = indexed
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
    after = _classify(live_cluster, data, skip_cache=True)
    assert after.suggestions
    fell = [d for d in after.dispatch if d.category in routed]
    assert fell and all(d.fell_back and d.served_by == classifier_pb2.TINY for d in fell)
    kinds = {router_pb2.DegradationKind.Name(d.kind) for d in after.degradations}
    assert "SPECIALIST_FALLBACK" in kinds
