"""Recorded answers: a fixed set of photos must get the same responses, timings aside.

The guard for work on the router's hot path (proto building, the cache's binary form,
batching of backend calls): the responses of a fresh cluster with a fixed gallery, for fixed
photos and options, are compared field by field with `golden/answers.jsonl`, as a miss and again
as a cache hit. Strings, ids, order, flags and counts must match exactly. Probabilities and
similarities are float32 results of the nets and may differ in their last bits on another CPU
(other SIMD kernels); they must match to FLOAT_TOLERANCE, and on the machine that recorded them
they match exactly (the test prints the largest difference).

Answers change on purpose when the model set or the answer's arithmetic changes (a new
calibration, say). Record them again then, and say why in the commit:
    FIELDLENS_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/e2e/test_golden_answers.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_cluster import running
from google.protobuf.json_format import MessageToDict

from fieldlens import cluster, gallery
from fieldlens.v1 import router_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GOLDEN = Path(__file__).parent / "golden" / "answers.jsonl"  # one response per line
RECORD_ENV = "FIELDLENS_RECORD_GOLDEN"
PHOTOS = 12
GALLERY_PER_CLASS = 1
# (top_k, neighbours, threshold): the defaults, and a wider answer with a lower threshold.
OPTIONS = ((0, 0, 0.0), (10, 3, 0.3))
FLOAT_TOLERANCE = 2e-5


def _answer(r: router_pb2.ClassifyResponse) -> dict[str, Any]:
    d = MessageToDict(r, preserving_proto_field_name=True)
    d.pop("timings", None)
    d.pop("cached", None)
    return d


def _diff(got: Any, want: Any, where: str, out: list[str], worst: list[float]) -> None:
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            _diff(got.get(k), want.get(k), f"{where}.{k}", out, worst)
    elif isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            out.append(f"{where}: {len(got)} items, recorded {len(want)}")
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            _diff(g, w, f"{where}[{i}]", out, worst)
    elif isinstance(want, float) or isinstance(got, float):
        delta = abs(float(got or 0.0) - float(want or 0.0))
        worst.append(delta)
        if delta > FLOAT_TOLERANCE:
            out.append(f"{where}: {got} != recorded {want}")
    elif got != want:
        out.append(f"{where}: {got!r} != recorded {want!r}")


@pytest.fixture(scope="module")
def answers(tmp_path_factory, data_dir, validation_keys) -> list[dict[str, Any]]:
    cfg = cluster.ClusterConfig(run_dir=tmp_path_factory.mktemp("golden")).with_free_ports()
    photos = gallery.validation_samples(data_dir, validation_keys, PHOTOS)
    with running(cfg) as (_, router):
        taxa = router.GetTaxonomy(router_pb2.GetTaxonomyRequest(), timeout=10).taxa
        classes = {t.id for t in taxa if t.rank == "class"}
        items = list(gallery.gallery_items(data_dir, GALLERY_PER_CLASS, validation_keys, classes))
        gallery.upload(router, items, len(items), "golden", cfg.write_token())
        out = []
        for key, data, _ in photos:
            for top_k, neighbours, threshold in OPTIONS:
                request = router_pb2.ClassifyRequest(
                    image=data, top_k=top_k, neighbours=neighbours, threshold=threshold
                )
                miss = router.Classify(request, timeout=30)
                for _ in range(100):  # the cache write-back is off the response path
                    hit = router.Classify(request, timeout=30)
                    if hit.cached:
                        break
                    time.sleep(0.02)
                out.append(
                    {
                        "photo": key,
                        "options": [top_k, neighbours, threshold],
                        "miss": _answer(miss),
                        "miss_cached": miss.cached,
                        "hit": _answer(hit),
                        "hit_cached": hit.cached,
                    }
                )
    return out


def test_answers_match_the_recorded_ones(answers):
    if os.environ.get(RECORD_ENV):
        GOLDEN.parent.mkdir(exist_ok=True)
        recorded = [{k: a[k] for k in ("photo", "options", "miss")} for a in answers]
        GOLDEN.write_text(
            "".join(json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in recorded)
        )
    want = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    assert [(a["photo"], a["options"]) for a in answers] == [
        (w["photo"], w["options"]) for w in want
    ]
    problems: list[str] = []
    worst: list[float] = []
    for a, w in zip(answers, want, strict=True):
        assert not a["miss_cached"] and a["hit_cached"], a["photo"]
        label = f"{a['photo']} {a['options']}"
        _diff(a["miss"], w["miss"], f"{label} miss", problems, worst)
        _diff(a["hit"], w["miss"], f"{label} hit", problems, worst)
    print(f"largest float difference from the recording: {max(worst, default=0.0):.3g}")
    assert not problems, "\n".join(problems[:40])
