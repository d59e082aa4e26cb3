"""The trainer's smoke profile end to end, and its export served by the real tritonserver."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fieldlens.backends.triton_client import TritonClient
from fieldlens.backends.triton_python_model import load_torchscript
from fieldlens.common.model_set import load_model_set
from fieldlens.tiny.ensemble import TinyEnsemble
from fieldlens.trainer.calibrate import POWERS, THRESHOLDS, calibrated_version
from fieldlens.trainer.config import config_for
from fieldlens.trainer.data import load_dataset, read_classes, split
from fieldlens.trainer.loops import pick_device, training_precision
from fieldlens.trainer.train import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smoke")
    paths = {
        "work": root / "build" / "train",
        "models": root / "models",
        "repo": root / "model_repository",
    }
    torch.set_num_threads(2)
    run(config_for("smoke"), data_dir, paths["work"], paths["models"], paths["repo"])
    return paths


def test_artefacts_and_manifest(smoke: dict[str, Path]) -> None:
    models, repo = smoke["models"], smoke["repo"]
    for f in (
        "manifest.json",
        "taxonomy.json",
        "tiny.npz",
        "split.json",
        "report/README.md",
        "report/confusion_broad.png",
        "report/top_losses.png",
        "report/curation.csv",
        "report/curation.png",
        "report/precision_depth.png",
        "report/reliability.png",
        "report/imprint_bias.png",
    ):
        assert (models / f).stat().st_size > 0, f
    for m in ("broad", "specialist_insect", "specialist_other_invertebrate"):
        assert (repo / m / "config.pbtxt").exists() and (repo / m / "1" / "model.pt").exists()
    ms = load_model_set(models)
    manifest = json.loads((models / "manifest.json").read_text())
    val = manifest["metrics"]["validation"]
    for key in ("fine_top1", "fine_top5", "broad_top1", "served_fine_top1", "precision_vs_depth"):
        assert key in val
    assert 0.0 <= val["fine_top1"] <= val["fine_top5"] <= 1.0
    # The report shows the manifest's figures, not figures of its own.
    report = (models / "report" / "README.md").read_text()
    assert f"{val['fine_top1']:.2%}" in report and f"{val['broad_top1']:.2%}" in report
    # The run says what trained it: the precision this machine trains in, and the hardware.
    cfg = config_for("smoke")
    assert manifest["training_precision"] == training_precision(pick_device(), cfg.precision)
    assert manifest["training_precision"] in report and manifest["machine"] in report
    assert set(ms.routing) == set(ms.taxonomy.broad_ids)
    # Calibrated last: its figures in the manifest and the report, and a version of its own.
    cal = manifest["calibration"]
    assert cal["power"] in POWERS and cal["default_threshold"] in THRESHOLDS
    assert ms.version == calibrated_version(manifest) != manifest["export_version"]
    assert ms.default_threshold == cal["default_threshold"]
    assert f"| {cal['before']['nll']:.3f} | {cal['after']['nll']:.3f} |" in report
    assert cal["after"]["nll"] <= cal["before"]["nll"] + 0.05  # fitted on the other half
    assert len(cal["imprint_bias"]["hidden_classes"]) > 0
    offsets = [r["bias_offset"] for r in cal["imprint_bias"]["sweep"]]
    assert cal["imprint_bias"]["offset"] in offsets
    imprint = manifest["broad"]["imprint"]
    assert imprint["bias"] == pytest.approx(
        imprint["trained_median_bias"] + cal["imprint_bias"]["offset"]
    )
    assert imprint["example_bias"] == pytest.approx(
        imprint["trained_median_bias"] + cal["imprint_bias"]["example_offset"]
    )
    assert set(val["specialists"]) == {"insect", "other_invertebrate"}
    split = json.loads((models / "split.json").read_text())
    assert len(split["val_keys"]) == len(set(split["val_keys"])) > 0
    TinyEnsemble.load(models / "tiny.npz", ms.taxonomy)


def test_rerun_resumes_and_reproduces(smoke: dict[str, Path], data_dir: Path) -> None:
    """A second run finds every stage's checkpoint and writes the same model set."""
    first = json.loads((smoke["models"] / "manifest.json").read_text())
    again = run(config_for("smoke"), data_dir, smoke["work"], smoke["models"], smoke["repo"])
    assert again["model_set_version"] == first["model_set_version"]
    assert again["embedding_version"] == first["embedding_version"]


def test_curation_finds_byte_identical_conflicts(smoke: dict[str, Path], data_dir: Path) -> None:
    rows = (smoke["models"] / "report" / "curation.csv").read_text().splitlines()
    header = rows[0].split(",")
    conflicts = [r.split(",") for r in rows[1:] if r.startswith("duplicate_conflict")]
    # Verify independently over the same training split the trainer curated.
    cfg = config_for("smoke")
    classes = read_classes(data_dir)
    ds = load_dataset(data_dir, classes, smoke["work"].parent / "cache", cfg.shard_limit)
    train, _ = split(ds, cfg.val_per_class, cfg.seed)
    labels_by_hash: dict[str, set[int]] = {}
    for h, y in zip(train.sha256, train.labels, strict=True):
        labels_by_hash.setdefault(h, set()).add(int(y))
    expected = {h for h, ls in labels_by_hash.items() if len(ls) > 1}
    assert {r[header.index("sha256")] for r in conflicts} == expected


def test_triton_serves_the_export_like_torch(
    smoke: dict[str, Path], tmp_path: Path, launch_tritonserver
) -> None:  # type: ignore[no-untyped-def]
    """The exported repository on the real tritonserver gives the in-process module's outputs."""
    repo = smoke["repo"]
    server = launch_tritonserver(repo, tmp_path)
    try:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)

        async def infer() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            async with TritonClient(server.grpc_addr) as client:
                logits, emb, fine, norm = await client.infer_broad_full(images)
                (spec,) = await client.infer("specialist_insect", images, ("LOGITS",))
                return logits, emb, fine, norm, spec

        logits, emb, fine, norm, spec = asyncio.run(infer())
        broad = load_torchscript(repo / "broad" / "1" / "model.pt")
        specialist = load_torchscript(repo / "specialist_insect" / "1" / "model.pt")
        with torch.no_grad():
            ref_logits, ref_emb, ref_fine, ref_norm = broad(torch.from_numpy(images))
            (ref_spec,) = specialist(torch.from_numpy(images))
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(emb, ref_emb.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(spec, ref_spec.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(fine, ref_fine.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(norm, ref_norm.numpy(), rtol=1e-4, atol=1e-4)
        # Broad outputs are log-probabilities: they exponentiate to a distribution.
        np.testing.assert_allclose(np.exp(logits).sum(axis=1), 1.0, atol=1e-4)
    finally:
        server.stop()


def test_exported_broad_net_computes_what_was_evaluated(smoke: dict[str, Path]) -> None:
    """The broad export's fine logits are the evaluation's (flip TTA when configured), so the
    manifest's broad top-1 is the served net's."""
    from fieldlens.trainer.loops import predict
    from fieldlens.trainer.nets import Classifier

    cfg = config_for("smoke")
    manifest = json.loads((smoke["models"] / "manifest.json").read_text())
    assert manifest["broad"]["flip_tta"] == cfg.broad_flip_tta
    ms = load_model_set(smoke["models"])
    model = Classifier(cfg.backbone, len(ms.taxonomy.class_ids))
    state = smoke["work"] / cfg.backbone_fingerprint() / "backbone.pt"
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    images = np.random.default_rng(1).integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)
    evaluated = predict(model, images, 64, flip_tta=cfg.broad_flip_tta)
    broad = load_torchscript(smoke["repo"] / "broad" / "1" / "model.pt")
    with torch.no_grad():
        _, _, fine, _ = broad(torch.from_numpy(images))
    np.testing.assert_allclose(fine.numpy(), evaluated, rtol=1e-3, atol=1e-3)
    plain = predict(model, images, 64)
    assert cfg.broad_flip_tta == (not np.allclose(fine.numpy(), plain, atol=1e-3))


def test_exported_nets_store_fp16_weights(smoke: dict[str, Path]) -> None:
    """The files hold fp16 weights (half the size in git); the loader computes in fp32."""
    for name in ("broad", "specialist_insect"):
        path = smoke["repo"] / name / "1" / "model.pt"
        stored = torch.jit.load(str(path)).state_dict()
        floats = [t.dtype for t in stored.values() if t.is_floating_point()]
        assert floats and set(floats) == {torch.float16}, name
        loaded = load_torchscript(path).state_dict()
        assert {t.dtype for t in loaded.values() if t.is_floating_point()} == {torch.float32}
