"""The model set: manifest, taxonomy and routing table, loaded together from the models dir."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldlens.common.errors import FailedPrecondition
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
