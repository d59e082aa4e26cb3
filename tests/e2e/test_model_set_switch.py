"""End-to-end model-set switch: a new model set is loaded next to the serving one (Triton
explicit model control, classifier services holding both) and served without a failed request,
learned knowledge carried over, and the choice surviving restarts."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request

import grpc
import pytest
from e2e_cluster import running
from prometheus_client.parser import text_string_to_metric_families

from fieldlens import cluster, gallery
from fieldlens.backends.triton_server import is_ready
from fieldlens.backends.vector_store import list_collections
from fieldlens.common import model_store
from fieldlens.common.credentials import bearer
from fieldlens.common.model_set import load_model_set
from fieldlens.router.model_sets import STAGING_SUFFIX, collection_name
from fieldlens.v1 import router_pb2, router_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPECIALIST_GROUP = "broad/insect"


@pytest.fixture(scope="module")
def switch_cluster(tmp_path_factory, data_dir):
    """A throwaway cluster on the shipped model set, and a second set published in its store:
    the same nets, released again with the insect group moved from its specialist to tiny."""
    boot = cluster.ClusterConfig()
    cfg = cluster.ClusterConfig(run_dir=tmp_path_factory.mktemp("switch")).with_free_ports()
    models = tmp_path_factory.mktemp("next") / "models"
    shutil.copytree(boot.models_dir, models)
    manifest = json.loads((models / "manifest.json").read_text())
    old_version = manifest["model_set_version"]
    manifest["model_set_version"] = f"{old_version}-next"
    manifest["routing"] = {**manifest.get("routing", {}), SPECIALIST_GROUP: "tiny"}
    (models / "manifest.json").write_text(json.dumps(manifest))
    new_version = model_store.publish(cfg.model_store, models, boot.model_repository)
    images = [
        data
        for imgs in gallery.class_samples(
            data_dir, load_model_set(boot.models_dir).taxonomy.class_ids[:4], 3
        ).values()
        for data in imgs
    ]
    with running(cfg) as (_, router):
        yield cfg, router, old_version, new_version, images


class Traffic:
    """Classify calls in a loop on another thread; records (time sent, version) or the error."""

    def __init__(self, router: router_pb2_grpc.RouterStub, images: list[bytes]) -> None:
        self.router, self.images = router, images
        self.answers: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.computed = 0  # answers computed by the nets rather than read from the cache
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            # Every other call skips the cache: the nets themselves answer during the switch.
            request = router_pb2.ClassifyRequest(
                image=self.images[n % len(self.images)], skip_cache=n % 2 == 1
            )
            n += 1
            sent = time.monotonic()
            try:
                r = self.router.Classify(request, timeout=30)
                # When it was sent: a request in flight at the swap finishes on the old set.
                self.answers.append((sent, r.model_set_version))
                self.computed += not r.cached
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _router_samples(cfg) -> dict[str, list]:
    """The router's /metrics, as {sample name: [samples]}."""
    url = f"http://127.0.0.1:{cfg.router_metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _switch(router, cfg, version: str) -> router_pb2.SwitchModelSetResponse:
    return router.SwitchModelSet(
        router_pb2.SwitchModelSetRequest(version=version),
        timeout=600,
        metadata=bearer(cfg.write_token()),
    )


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
    info = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert info.model_set_version == old
    assert info.routing[SPECIALIST_GROUP] == "specialist"
    learned = router.Learn(
        router_pb2.LearnRequest(image=images[0], taxon_id=_leaf(router)),
        timeout=30,
        metadata=bearer(cfg.write_token()),
    )
    assert learned.learned_total == 1
    with Traffic(router, images) as traffic:
        time.sleep(1.0)
        started = time.monotonic()
        reply = _switch(router, cfg, new)
        ended = time.monotonic()
        time.sleep(1.0)
    assert traffic.errors == []
    assert (reply.model_set_version, reply.previous_model_set_version) == (new, old)
    assert reply.relearned == 1 and reply.reindexed == 0  # same embedding space
    during = [v for t, v in traffic.answers if started <= t <= ended]
    print(
        f"switch took {reply.seconds:.2f} s; {len(during)} answers during it "
        f"({traffic.computed} computed by the nets in the whole run), none failed"
    )
    assert traffic.computed > 0
    assert during and set(during) <= {old, new}  # answered all along, from the old set
    assert {v for t, v in traffic.answers if t < started} == {old}
    assert {v for t, v in traffic.answers if t > ended} == {new}
    info = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert (info.model_set_version, info.learned_examples) == (new, 1)
    assert info.routing[SPECIALIST_GROUP] == "tiny"
    assert info.writes_blocked == ""  # writes are accepted again
    # Triton serves the new set's nets under their own names, next to the boot set's.
    suffix = model_store.triton_suffix(new)
    triton_http = cfg.addr(cfg.triton_http_port)
    assert is_ready(triton_http, ["broad" + suffix, "specialist_insect" + suffix])
    assert info.broad_model == "broad" + suffix
    assert model_store.current(cfg.model_store) == new
    # SREs see which set serves, and how the switches went (the NOT_FOUND one failed).
    samples = _router_samples(cfg)
    serving = [(m.labels["version"], m.value) for m in samples["fieldlens_model_set"]]
    assert serving == [(new, 1.0)]
    switches = {m.labels["result"]: m.value for m in samples["fieldlens_model_set_switches_total"]}
    assert switches.get("ok") == 1.0
    (count,) = samples["fieldlens_model_set_switch_seconds_count"]
    (total,) = samples["fieldlens_model_set_switch_seconds_sum"]
    assert count.value == 1.0 and total.value == pytest.approx(reply.seconds, rel=0.05, abs=0.05)


def test_the_switch_survives_restarts(switch_cluster):
    cfg, router, _, new, images = switch_cluster
    for name in ("router", "tiny", "specialist", "triton"):
        cluster.kill(cfg, name)
    cluster.start(cfg)
    r = router.Classify(router_pb2.ClassifyRequest(image=images[1]), timeout=60)
    assert r.model_set_version == new
    info = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert (info.model_set_version, info.learned_examples) == (new, 1)


def test_switching_back_to_the_boot_set(switch_cluster):
    cfg, router, old, new, images = switch_cluster
    reply = _switch(router, cfg, old)
    assert (reply.model_set_version, reply.previous_model_set_version) == (old, new)
    r = router.Classify(router_pb2.ClassifyRequest(image=images[2], skip_cache=True), timeout=30)
    assert r.model_set_version == old
    assert router.GetInfo(router_pb2.GetInfoRequest(), timeout=10).learned_examples == 1
    assert _switch(router, cfg, old).seconds == 0.0  # already current: a no-op


def test_a_forgotten_example_stays_forgotten_across_switches(switch_cluster):
    cfg, router, old, new, images = switch_cluster
    token = bearer(cfg.write_token())
    label = router_pb2.NewTaxonLabel(name="switch forget probe", parent_id="broad/cat")
    learned = router.Learn(
        router_pb2.LearnRequest(image=images[1], new_taxon=label), timeout=30, metadata=token
    )
    tid = learned.taxon.id
    assert _switch(router, cfg, new).relearned == 2  # the earlier example and this one

    def state() -> tuple[int, bool]:
        info = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
        taxa = router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa
        return info.learned_examples, tid in {t.id for t in taxa}

    assert state() == (2, True)
    forgot = router.Forget(
        router_pb2.ForgetRequest(exemplar_ids=[learned.exemplar_id]), timeout=60, metadata=token
    )
    assert (forgot.forgotten, list(forgot.removed_taxa)) == (1, [tid])
    # The boot set learned it first, in its own journal: switching back does not restore it,
    # and re-learning what the newer set learned does not bring it back either.
    reply = _switch(router, cfg, old)
    assert reply.model_set_version == old
    assert state() == (1, False)
    r = router.Classify(router_pb2.ClassifyRequest(image=images[1], skip_cache=True), timeout=30)
    assert tid not in {s.taxon.id for s in r.suggestions}


@pytest.fixture(scope="module")
def new_space(switch_cluster, tmp_path_factory, data_dir) -> str:
    """A model set with another backbone (the trainer's smoke profile), published."""
    import torch

    from fieldlens.trainer.config import config_for
    from fieldlens.trainer.train import run

    cfg = switch_cluster[0]
    root = tmp_path_factory.mktemp("smoke")
    torch.set_num_threads(2)
    run(config_for("smoke"), data_dir, root / "work", root / "models", root / "repo")
    return model_store.publish(cfg.model_store, root / "models", root / "repo")


def test_a_new_embedding_space_is_re_embedded_before_it_serves(switch_cluster, new_space):
    cfg, router, old, _, images = switch_cluster
    before = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert before.model_set_version == old
    labels = load_model_set(cluster.ClusterConfig().models_dir).taxonomy.class_ids[:4]
    gallery_images = images[3:]
    indexed = router.IndexExemplars(
        iter(
            router_pb2.IndexExemplarsRequest(image=img, label=labels[i // 3], source="test")
            for i, img in enumerate(gallery_images, start=3)
        ),
        timeout=60,
        metadata=bearer(cfg.write_token()),
    )
    assert indexed.indexed + indexed.duplicates == len(gallery_images)
    with Traffic(router, images) as traffic:
        reply = _switch(router, cfg, new_space)
    assert traffic.errors == []
    assert reply.embedding_version != before.embedding_version
    print(f"switch with re-index took {reply.seconds:.2f} s over {len(traffic.answers)} answers")
    # Every stored exemplar with kept bytes (the gallery and the learned one) is re-embedded.
    assert reply.reindexed >= len(gallery_images)
    assert reply.relearned == 1
    info = router.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    assert (info.model_set_version, info.embedding_version) == (new_space, reply.embedding_version)
    assert info.exemplar_count >= len(gallery_images) and info.learned_examples == 1
    r = router.Classify(router_pb2.ClassifyRequest(image=gallery_images[0]), timeout=30)
    assert r.embedding_version == reply.embedding_version
    # Published under the new space's name, staging gone; the old collection stays.
    collections = list_collections(str(cfg.qdrant_dir))
    assert collection_name(reply.embedding_version) in collections
    assert collection_name(before.embedding_version) in collections
    assert not [c for c in collections if c.endswith(STAGING_SUFFIX)]


def _leaf(router) -> str:
    taxa = router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa
    return next(t.id for t in taxa if t.rank == "class")
