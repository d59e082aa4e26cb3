"""Writes the served artefacts: Triton model repository, tiny ensemble, taxonomy, manifest."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from fieldlens.backends.triton_python_model import write_config
from fieldlens.common.model_set import MANIFEST, TAXONOMY, TINY
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.tiny.ensemble import TinyEnsemble
from fieldlens.trainer import metrics
from fieldlens.trainer.nets import Backbone, BroadExport, Classifier, SpecialistExport

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
# CPU threads of each net instance, written into every config.pbtxt (TORCH_NUM_THREADS): one,
# because Triton scales a net by instances and dynamic batching, and a torch/BLAS pool per
# instance as wide as the machine oversubscribes it. A deployment that grants an instance
# more CPU says so with FIELDLENS_CPU_THREADS (backends/triton_python_model.py).
SERVING_CPU_THREADS = 1


def _weights_digest(module: torch.nn.Module, h: hashlib._Hash | None = None) -> hashlib._Hash:
    # Weights, not serialized bytes: TorchScript mangles class names per process.
    h = h or hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h


def embedding_version(backbone: Backbone) -> str:
    """Content hash of the frozen backbone weights: vectors are comparable iff this matches."""
    return "emb-" + _weights_digest(backbone).hexdigest()[:12]


def _trace(module: torch.nn.Module, path: Path) -> None:
    """Traces in fp32 and saves the weights in fp16; the server upcasts them at load
    (`load_torchscript`). The trained nets were rounded to fp16 already, so nothing changes."""
    # A copy: the trace shares the module's tensors, and .half() below must not touch them.
    module = copy.deepcopy(module).cpu().eval()
    example = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced.half(), str(path))


def export_all(
    taxonomy: Taxonomy,
    model: Classifier,
    broad_head: torch.nn.Linear,
    mix: float,
    specialists: dict[str, Classifier],
    routing: dict[str, str],
    ens: TinyEnsemble,
    models_dir: Path,
    model_repository: Path,
    manifest_extra: dict[str, object],
    embedding_mean: np.ndarray,
    flip_tta: bool = False,
) -> dict[str, object]:
    """Writes every artefact, then the manifest whose model-set version hashes them all."""
    models_dir.mkdir(parents=True, exist_ok=True)
    if model_repository.exists():
        shutil.rmtree(model_repository)
    g = torch.from_numpy(metrics.group_matrix(taxonomy))
    broad = BroadExport(model.backbone, broad_head, model.head, g, mix, flip_tta)
    _trace(broad, model_repository / "broad" / "1" / "model.pt")
    write_config(
        model_repository / "broad",
        "broad",
        [
            ("BROAD_LOGITS", len(taxonomy.broad_ids)),
            ("EMBEDDING", model.backbone.dim),
            ("FINE_LOGITS", len(taxonomy.class_ids)),
            ("FEATURE_NORM", 1),
        ],
        cpu_threads=SERVING_CPU_THREADS,
    )
    spec_meta = {}
    for group, net in specialists.items():
        name = f"specialist_{group}"
        labels: list[str] = net.labels  # type: ignore[assignment]
        _trace(SpecialistExport(net), model_repository / name / "1" / "model.pt")
        write_config(
            model_repository / name,
            name,
            [("LOGITS", len(labels))],
            cpu_threads=SERVING_CPU_THREADS,
        )
        spec_meta[f"broad/{group}"] = {"model": name, "labels": labels}
    taxonomy.save(models_dir / TAXONOMY)
    ens.save(models_dir / TINY)
    digest = _weights_digest(broad)
    # What the nets compute besides their weights: another arithmetic is another model set.
    digest.update(json.dumps({"rollup_mix": mix, "flip_tta": flip_tta}).encode())
    for net in specialists.values():
        _weights_digest(net, digest)
    for p in sorted(
        [*model_repository.rglob("config.pbtxt"), models_dir / TAXONOMY, models_dir / TINY]
    ):
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    manifest = {
        "model_set_version": "ms-" + digest.hexdigest()[:12],
        "embedding_version": ens.embedding_version,
        "taxonomy_version": taxonomy.version,
        "image_size": IMAGE_SIZE,
        "broad": {
            "model": "broad",
            "outputs": ["BROAD_LOGITS", "EMBEDDING", "FINE_LOGITS", "FEATURE_NORM"],
            "labels": list(taxonomy.broad_ids),
            "embedding_dim": model.backbone.dim,
            "rollup_mix": mix,
            "flip_tta": flip_tta,
            # Weight imprinting of learned classes into the fine softmax: a new class's row is
            # row_norm x unit(mean of its examples' embeddings - embedding_mean), its bias
            # `bias`; its logit is feature_norm x (row . embedding) + bias.
            "imprint": {
                "row_norm": float(model.head.weight.detach().norm(dim=1).median()),
                "bias": float(model.head.bias.detach().median()),
                "embedding_mean": [round(float(v), 6) for v in embedding_mean],
            },
        },
        "specialists": spec_meta,
        "routing": routing,
        "machine": machine_description(),
        **manifest_extra,
    }
    (models_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json) + "\n")
    return manifest


def machine_description() -> str:
    """What trained the set, for the manifest: the GPU, or the CPU model and its core count."""
    if torch.cuda.is_available():
        hardware = torch.cuda.get_device_name(0)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        hardware = f"{names[0] if names else platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    return f"{hardware}, {platform.machine()}, torch {torch.__version__}"


def _json(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")
