"""The model set: manifest, taxonomy and routing table, loaded together from the models dir."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldlens.common.errors import FailedPrecondition
from fieldlens.common.settings import DEFAULT_THRESHOLD
from fieldlens.common.taxonomy import Taxonomy

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TAXONOMY = "taxonomy.json"
TINY = "tiny.npz"
ROUTES = ("specialist", "tiny")


@dataclass(frozen=True)
class SpecialistModel:
    """A fine-tuned net on Triton for one broad category; `labels` orders its logits."""

    category: str
    model: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ModelSet:
    version: str
    embedding_version: str
    taxonomy: Taxonomy
    routing: Mapping[str, str]  # broad category id -> "specialist" | "tiny"
    specialists: Mapping[str, SpecialistModel]
    image_size: int
    embedding_dim: int
    manifest: Mapping[str, Any]
    # Name of the broad net on Triton: "broad" for the boot model set, which Triton loads from
    # its repository; "broad__<version>" for a set loaded later from the model store.
    broad_model: str = "broad"

    @property
    def tiny_path(self) -> Path:
        return Path(self.manifest["_dir"]) / TINY

    @property
    def calibration(self) -> Mapping[str, Any]:
        """The trainer's calibration (trainer/calibrate.py); empty for an uncalibrated set."""
        found: Mapping[str, Any] = self.manifest.get("calibration", {})
        return found

    @property
    def default_threshold(self) -> float:
        """The answer threshold a request gets by default: the calibrated one (targeting the
        set's `default_min_precision`), else DEFAULT_THRESHOLD."""
        return float(self.calibration.get("default_threshold", DEFAULT_THRESHOLD))

    def threshold_for(self, min_precision: float) -> float:
        """The threshold whose best-effort answers were right at least `min_precision` of the
        time on validation (FailedPrecondition for a set without a measured curve)."""
        curve = self.calibration.get("precision_curve")
        if not curve:
            raise FailedPrecondition(
                f"model set {self.version} has no measured precision curve (not calibrated: "
                "make calibrate); ask for a threshold instead"
            )
        return threshold_for(curve, min_precision)


def threshold_for(curve: Sequence[Mapping[str, float]], min_precision: float) -> float:
    """The lowest threshold from which the answer is right at least `min_precision` of the
    time (every higher threshold too); the highest one when none reaches it."""
    ok = [r["precision"] >= min_precision for r in curve]
    for i in range(len(curve)):
        if all(ok[i:]):
            return float(curve[i]["threshold"])
    return float(curve[-1]["threshold"])


def load_model_set(
    models_dir: Path, routing_override: Path | None = None, triton_suffix: str = ""
) -> ModelSet:
    """Reads manifest.json and taxonomy.json; fails fast if they disagree.

    `triton_suffix` is appended to every Triton model name (see `model_store.triton_suffix`).
    """
    manifest_path = models_dir / MANIFEST
    if not manifest_path.exists():
        raise FailedPrecondition(
            f"no model set at {models_dir}: {MANIFEST} is missing (run `make train`)"
        )
    manifest = json.loads(manifest_path.read_text())
    taxonomy = Taxonomy.load(models_dir / TAXONOMY)
    if manifest["taxonomy_version"] != taxonomy.version:
        raise FailedPrecondition(
            f"{manifest_path} names taxonomy {manifest['taxonomy_version']} but "
            f"{TAXONOMY} is {taxonomy.version}"
        )
    specialists = {
        cat: SpecialistModel(cat, spec["model"] + triton_suffix, tuple(spec["labels"]))
        for cat, spec in manifest.get("specialists", {}).items()
    }
    routing = {b: "tiny" for b in taxonomy.broad_ids}
    routing.update(manifest.get("routing", {}))
    if routing_override is not None:
        routing.update(json.loads(routing_override.read_text()))
    for cat, route in routing.items():
        if cat not in taxonomy.broad_ids or route not in ROUTES:
            raise FailedPrecondition(f"bad routing entry {cat!r}: {route!r}")
        if route == "specialist" and cat not in specialists:
            raise FailedPrecondition(f"routing sends {cat} to a specialist, but none is exported")
    return ModelSet(
        version=manifest["model_set_version"],
        embedding_version=manifest["embedding_version"],
        taxonomy=taxonomy,
        routing=routing,
        specialists=specialists,
        image_size=int(manifest.get("image_size", 64)),
        embedding_dim=int(manifest["broad"]["embedding_dim"]),
        manifest={**manifest, "_dir": str(models_dir)},
        broad_model="broad" + triton_suffix,
    )
