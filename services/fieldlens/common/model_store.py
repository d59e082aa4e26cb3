"""The model store: published model sets side by side, and which one is current.

A model set is published once, immutable, under its version; the services load it from there
while they go on serving the previous one, so a new model set needs no downtime:

    <store>/<version>/models/   manifest.json, taxonomy.json, tiny.npz, ... (as `make train`)
    <store>/<version>/triton/   <net>/config.pbtxt and <net>/1/* for every Triton net
    <store>/current             the version the routers serve (replaced atomically)
    <store>/rollout             the candidate set being shadowed or canaried, with its canary
                                weight and shadow fraction (JSON; absent when none)

Locally the store is a folder in the state dir; on Kubernetes it is a volume every router,
classifier and specialist pod mounts. The boot model set (FIELDLENS_MODELS_DIR and the Triton
repository) is what a service serves until `current` names another.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fieldlens.common.errors import FailedPrecondition, InvalidInput, NotFound
from fieldlens.common.model_set import MANIFEST, ModelSet, load_model_set

CURRENT = "current"
ROLLOUT = "rollout"
MODELS = "models"
TRITON = "triton"


def triton_suffix(version: str) -> str:
    """Suffix of a stored set's Triton model names: its nets live next to the boot set's."""
    return "__" + version


def set_dir(store: Path, version: str) -> Path:
    if not version or "/" in version or version.startswith("."):
        raise FailedPrecondition(f"bad model-set version {version!r}")
    return store / version


def published(store: Path) -> list[str]:
    """Versions published in the store, oldest first."""
    if not store.is_dir():
        return []
    sets = [p for p in store.iterdir() if (p / MODELS / MANIFEST).is_file()]
    return [p.name for p in sorted(sets, key=lambda p: p.stat().st_mtime)]


def publish(store: Path, models_dir: Path, model_repository: Path) -> str:
    """Copies a trained model set into the store under its version; returns the version.

    Idempotent: a version already published is left as it is (versions are content hashes of
    the training configuration, so the same version means the same artefacts).
    """
    manifest_path = models_dir / MANIFEST
    if not manifest_path.is_file():
        raise NotFound(f"no model set at {models_dir}: {MANIFEST} is missing")
    version = json.loads(manifest_path.read_text())["model_set_version"]
    load_model_set(models_dir)  # refuse a set that does not load
    target = set_dir(store, version)
    if (target / MODELS / MANIFEST).is_file():
        return version
    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=store))
    try:
        shutil.copytree(models_dir, staging / MODELS)
        shutil.copytree(
            model_repository, staging / TRITON, ignore=shutil.ignore_patterns("__pycache__")
        )
        staging.rename(target)  # atomic: a reader sees the whole set or none of it
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return version


def load(store: Path, version: str, routing_override: Path | None = None) -> ModelSet:
    """A published model set, with its Triton model names suffixed by its version."""
    models = set_dir(store, version) / MODELS
    if not (models / MANIFEST).is_file():
        raise NotFound(
            f"model set {version} is not published in {store} "
            "(publish it with `fieldlens model-set publish`)"
        )
    ms = load_model_set(models, routing_override, triton_suffix(version))
    if ms.version != version:
        raise FailedPrecondition(f"{models} holds model set {ms.version}, not {version}")
    return ms


def triton_dir(store: Path, version: str) -> Path:
    return set_dir(store, version) / TRITON


def current(store: Path) -> str | None:
    """The version the routers serve, or None while the boot model set is served."""
    try:
        version = (store / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return version or None


def _write_atomically(store: Path, name: str, text: str) -> None:
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".{name}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(store / name)


def set_current(store: Path, version: str) -> None:
    """Names `version` current, atomically and durably."""
    set_dir(store, version)
    _write_atomically(store, CURRENT, version + "\n")


@dataclass(frozen=True)
class RolloutState:
    """A candidate model set next to the current one, and how much traffic it sees.

    Args:
        candidate: A published model-set version, not the current one.
        canary_weight: Share of images, in [0, 1], the candidate answers instead of the current
            set (chosen by content hash, so one photo always gets the same set).
        shadow_fraction: Share of the other Classify requests, in [0, 1], the candidate also
            answers off the response path, for comparison only.
    """

    candidate: str
    canary_weight: float = 0.0
    shadow_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not self.candidate:
            raise InvalidInput("a rollout needs a candidate model-set version")
        for name in ("canary_weight", "shadow_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # NaN fails too
                raise InvalidInput(f"{name} must be in [0, 1], got {value}")


def rollout(store: Path) -> RolloutState | None:
    """The rollout the routers run, or None when the current set serves alone."""
    try:
        text = (store / ROLLOUT).read_text()
    except FileNotFoundError:
        return None
    try:
        raw = json.loads(text)
        return RolloutState(
            str(raw["candidate"]), float(raw["canary_weight"]), float(raw["shadow_fraction"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FailedPrecondition(f"{store / ROLLOUT} is malformed: {exc}") from exc


def set_rollout(store: Path, state: RolloutState | None) -> None:
    """Records `state` as the routers' rollout, atomically and durably; None ends it."""
    if state is None:
        (store / ROLLOUT).unlink(missing_ok=True)
        return
    set_dir(store, state.candidate)
    _write_atomically(store, ROLLOUT, json.dumps(asdict(state)) + "\n")


def load_version(
    store: Path, boot_dir: Path, version: str, routing_override: Path | None = None
) -> ModelSet:
    """Model set `version`: the boot set when it is that version (its nets keep their plain
    Triton names), else the published one."""
    boot = load_model_set(boot_dir, routing_override)
    if version == boot.version:
        return boot
    return load(store, version, routing_override)


def load_served(store: Path, boot_dir: Path, routing_override: Path | None = None) -> ModelSet:
    """The model set a starting service serves: the store's current one, else the boot set."""
    version = current(store)
    if version is None:
        return load_model_set(boot_dir, routing_override)
    return load_version(store, boot_dir, version, routing_override)
