"""End-to-end rollout of a candidate model set under continuous traffic: shadow comparisons that
match an offline comparison, a canary chosen by content hash, abort, a kill -9 of every
service, and promotion, none of them failing a request."""

from __future__ import annotations

import hashlib
import io
import time
import urllib.request
from collections import Counter

import grpc
import pytest
from e2e_cluster import Traffic, publish_rerouted, running
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fieldlens import cluster, gallery
from fieldlens.common import model_store
from fieldlens.common.credentials import bearer
from fieldlens.common.model_set import load_model_set
from fieldlens.router.rollout import canary_serves
from fieldlens.v1 import router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

INSECTS = "broad/insect"  # the group the candidate routes to tiny instead of its specialist
CANARY_IMAGES = 400  # distinct photos for the canary share (binomial sd 1.5 points at 10%)


def _variants(images: list[bytes], n: int) -> list[bytes]:
    """`n` distinct photos (distinct content hashes) made from `images`: each re-encoded with
    one pixel nudged, so that the canary share is measured over many hashes."""
    out = []
    for i in range(n):
        img = Image.open(io.BytesIO(images[i % len(images)])).convert("RGB")
        x, y = i // len(images) % img.width, 0
        r, g, b = img.getpixel((x, y))  # type: ignore[misc]
        img.putpixel((x, y), ((r + 1 + i // (len(images) * img.width)) % 256, g, b))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    assert len({hashlib.sha256(d).digest() for d in out}) == n
    return out


@pytest.fixture(scope="module")
def rollout_cluster(tmp_path_factory, data_dir):
    """A throwaway cluster on the shipped model set, and a candidate published in its store:
    the same nets, with the insect group moved from its specialist to tiny (so the two sets
    disagree on some insects only)."""
    boot = cluster.ClusterConfig()
    cfg = cluster.ClusterConfig(run_dir=tmp_path_factory.mktemp("rollout")).with_free_ports()
    current, candidate = publish_rerouted(cfg, tmp_path_factory.mktemp("next"), "next", INSECTS)
    taxonomy = load_model_set(boot.models_dir).taxonomy
    insects = [c for c in taxonomy.class_ids if taxonomy.broad_of(c) == INSECTS]
    others = [c for c in taxonomy.class_ids if taxonomy.broad_of(c) != INSECTS]
    wnids = insects[:12] + others[::12][:12]
    samples = gallery.class_samples(data_dir, wnids, 3)
    images = [data for w in wnids for data in samples[w]]
    with running(cfg) as (_, router):
        yield cfg, router, current, candidate, images


@pytest.fixture(autouse=True)
def from_the_current_set(rollout_cluster) -> None:
    """Each test starts where the module does, whichever ran before it: the shipped set
    serving, no rollout (a promote leaves the candidate current; others leave a rollout)."""
    cfg, router, current, _, _ = rollout_cluster
    router.AbortCandidate(
        router_pb2.AbortCandidateRequest(), timeout=60, metadata=bearer(cfg.write_token())
    )
    if _info(router).model_set_version != current:
        router.SwitchModelSet(
            router_pb2.SwitchModelSetRequest(version=current),
            timeout=600,
            metadata=bearer(cfg.write_token()),
        )
    info = _info(router)
    assert info.model_set_version == current and not info.HasField("rollout")


def _metrics(cfg) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The router's /metrics as {(sample name, sorted labels): value}."""
    url = f"http://127.0.0.1:{cfg.router_metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def _value(samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def _set(router, cfg, version: str, weight: float, fraction: float):
    return router.SetRollout(
        router_pb2.SetRolloutRequest(
            candidate_version=version, canary_weight=weight, shadow_fraction=fraction
        ),
        timeout=600,
        metadata=bearer(cfg.write_token()),
    )


def _info(router) -> router_pb2.GetInfoResponse:
    return router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)


def _answers(router, images: list[bytes]) -> list[router_pb2.ClassifyResponse]:
    return [
        router.Classify(router_pb2.ClassifyRequest(image=d, skip_cache=True), timeout=30)
        for d in images
    ]


def _depth(a, b) -> int:
    """Deepest level two answers' root-first paths share."""
    depth = -1
    for x, y in zip(a, b, strict=False):
        if x.id != y.id:
            break
        depth += 1
    return depth


def test_a_rollout_needs_the_admin_token_and_a_published_other_set(rollout_cluster):
    cfg, router, current, candidate, _ = rollout_cluster
    with pytest.raises(grpc.RpcError) as err:
        router.SetRollout(router_pb2.SetRolloutRequest(candidate_version=candidate), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        _set(router, cfg, "ms-not-published", 0.1, 0.0)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        _set(router, cfg, current, 0.1, 0.0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        _set(router, cfg, candidate, 1.5, 0.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not _info(router).HasField("rollout")


def test_shadow_agreement_matches_an_offline_comparison(rollout_cluster):
    cfg, router, current, candidate, images = rollout_cluster
    # Offline: every image through both sets (canary at 100%, then at 0%).
    # (Loaded now, or still from an earlier test's rollout: aborting does not unload it.)
    loaded = _set(router, cfg, candidate, 1.0, 0.0)
    assert loaded.rollout.candidate_version == candidate
    theirs = _answers(router, images)
    assert {r.model_set_version for r in theirs} == {candidate}
    _set(router, cfg, candidate, 0.0, 0.0)
    ours = _answers(router, images)
    assert {r.model_set_version for r in ours} == {current}
    pairs = list(zip(ours, theirs, strict=True))
    offline = {
        "top1": [a.suggestions[0].taxon.id == b.suggestions[0].taxon.id for a, b in pairs],
        "best_effort": [a.answer.taxon.id == b.answer.taxon.id for a, b in pairs],
        "broad": [a.dispatch[0].category == b.dispatch[0].category for a, b in pairs],
    }
    offline_depths = [_depth(a.suggestions[0].path, b.suggestions[0].path) for a, b in pairs]

    # Live: shadow 20% of continuous traffic over the same images.
    before = _metrics(cfg)
    reply = _set(router, cfg, candidate, 0.0, 0.2)
    assert reply.seconds == 0.0  # already loaded: only the shares changed
    with Traffic(router, images, threads=2) as traffic:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(2)
            seen = _value(_metrics(cfg), "fieldlens_rollout_shadow_comparisons_total")
            if seen - _value(before, "fieldlens_rollout_shadow_comparisons_total") >= 150:
                break
    time.sleep(1)  # the last shadow calls finish
    after = _metrics(cfg)
    assert traffic.errors == []
    assert {a.version for a in traffic.answers} == {current}  # shadow answers are never returned

    def delta(name: str, **labels: str) -> float:
        labels["candidate"] = candidate
        return _value(after, name, **labels) - _value(before, name, **labels)

    compared = delta("fieldlens_rollout_shadow_comparisons_total")
    dropped = delta("fieldlens_rollout_shadow_dropped_total")
    served = delta("fieldlens_rollout_requests_total", arm="current")
    shadow_errors = served_shadow = 0.0
    for (n, ls), v in after.items():
        labels = dict(ls)
        if n == "fieldlens_rollout_requests_total" and labels.get("arm") == "shadow":
            served_shadow += v - before.get((n, ls), 0.0)
            if labels["code"] != "OK":
                shadow_errors += v - before.get((n, ls), 0.0)
    share = (compared + dropped) / served
    live = {
        a: delta("fieldlens_rollout_shadow_agreements_total", answer=a) / compared for a in offline
    }
    want = {a: sum(v) / len(v) for a, v in offline.items()}
    depths = {
        d: delta("fieldlens_rollout_shadow_agreement_depth_total", answer="top1", depth=str(d))
        / compared
        for d in range(9)
    }
    offline_depth = {d: offline_depths.count(d) / len(offline_depths) for d in range(9)}
    print(
        f"shadowed {compared:.0f} of {served:.0f} requests ({share:.1%}; {dropped:.0f} dropped, "
        f"{shadow_errors:.0f} shadow errors); agreement live vs offline: "
        + ", ".join(f"{a} {live[a]:.1%} vs {want[a]:.1%}" for a in offline)
        + "; top-1 agreement depth live "
        + str({d: round(v, 3) for d, v in depths.items() if v})
        + " offline "
        + str({d: round(v, 3) for d, v in offline_depth.items() if v})
    )
    assert compared >= 100 and shadow_errors == 0 and served_shadow == compared
    assert 0.12 <= share <= 0.28
    assert want["top1"] < 1.0  # the candidate does answer some insects differently
    for a in offline:  # a random 20% of a round-robin over the images: a sampling error only
        sd = (want[a] * (1 - want[a]) / compared) ** 0.5
        assert abs(live[a] - want[a]) <= max(4 * sd, 0.03), (a, live[a], want[a])
    for d, p in offline_depth.items():
        sd = (p * (1 - p) / compared) ** 0.5
        assert abs(depths[d] - p) <= max(4 * sd, 0.03), (d, depths[d], p)
    info = _info(router)
    assert info.rollout.candidate_version == candidate
    assert (info.rollout.canary_weight, info.rollout.shadow_fraction) == (0.0, 0.2)


def test_a_ten_percent_canary_serves_ten_percent_by_content_hash(rollout_cluster):
    cfg, router, current, candidate, images = rollout_cluster
    photos = _variants(images, CANARY_IMAGES)
    expected = [canary_serves(hashlib.sha256(d).hexdigest(), 0.1) for d in photos]
    _set(router, cfg, candidate, 0.1, 0.0)
    with Traffic(router, photos, threads=2) as traffic:
        while traffic.rounds < 1.5 and not traffic.errors:
            time.sleep(1)
    assert traffic.errors == []
    versions = Counter(a.version for a in traffic.answers)
    share = versions[candidate] / len(traffic.answers)
    print(
        f"canary at 10%: {share:.1%} of {len(traffic.answers)} answers from the candidate "
        f"({sum(expected)} of {len(photos)} photos by hash), {len(traffic.errors)} failed"
    )
    assert abs(share - 0.1) <= 0.03
    # One photo, one set: every answer came from the set its content hash names.
    for a in traffic.answers:
        assert a.version == (candidate if expected[a.image] else current)


def test_abort_under_traffic(rollout_cluster):
    cfg, router, current, candidate, images = rollout_cluster
    _set(router, cfg, candidate, 0.5, 0.2)
    with Traffic(router, images, threads=2) as traffic:
        time.sleep(2)
        started = time.monotonic()
        reply = router.AbortCandidate(
            router_pb2.AbortCandidateRequest(), timeout=60, metadata=bearer(cfg.write_token())
        )
        ended = time.monotonic()
        time.sleep(2)
    assert reply.aborted_version == candidate
    assert traffic.errors == []
    assert {a.version for a in traffic.answers if a.sent < started} == {current, candidate}
    assert {a.version for a in traffic.answers if a.sent > ended} == {current}
    assert not _info(router).HasField("rollout")
    assert model_store.rollout(cfg.model_store) is None
    again = router.AbortCandidate(
        router_pb2.AbortCandidateRequest(), timeout=60, metadata=bearer(cfg.write_token())
    )
    assert again.aborted_version == ""


def test_the_rollout_survives_a_kill_of_every_service(rollout_cluster):
    cfg, router, current, candidate, images = rollout_cluster
    _set(router, cfg, candidate, 0.5, 0.2)
    for name in ("router", "tiny", "specialist", "triton"):
        cluster.kill(cfg, name)
    cluster.start(cfg)
    deadline = time.monotonic() + 120
    while not _info(router).HasField("rollout") and time.monotonic() < deadline:
        time.sleep(1)
    info = _info(router)
    assert info.model_set_version == current
    assert (info.rollout.candidate_version, info.rollout.canary_weight) == (candidate, 0.5)
    for d in images[:8]:
        r = router.Classify(router_pb2.ClassifyRequest(image=d, skip_cache=True), timeout=60)
        want = candidate if canary_serves(hashlib.sha256(d).hexdigest(), 0.5) else current
        assert r.model_set_version == want


def test_promote_under_traffic(rollout_cluster):
    cfg, router, current, candidate, images = rollout_cluster
    _set(router, cfg, candidate, 0.1, 0.2)
    with Traffic(router, images, threads=2) as traffic:
        time.sleep(2)
        started = time.monotonic()
        reply = router.PromoteCandidate(
            router_pb2.PromoteCandidateRequest(), timeout=600, metadata=bearer(cfg.write_token())
        )
        ended = time.monotonic()
        time.sleep(2)
    assert traffic.errors == []
    assert (reply.model_set_version, reply.previous_model_set_version) == (candidate, current)
    assert {a.version for a in traffic.answers if a.sent > ended} == {candidate}
    print(
        f"promoted in {reply.seconds:.2f} s; {len(traffic.answers)} answers, "
        f"{sum(1 for a in traffic.answers if started <= a.sent <= ended)} during it, none failed"
    )
    info = _info(router)
    assert info.model_set_version == candidate and not info.HasField("rollout")
    assert model_store.current(cfg.model_store) == candidate
    assert model_store.rollout(cfg.model_store) is None
    with pytest.raises(grpc.RpcError) as err:
        router.PromoteCandidate(
            router_pb2.PromoteCandidateRequest(), timeout=60, metadata=bearer(cfg.write_token())
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
