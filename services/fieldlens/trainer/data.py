"""Training data: Tiny ImageNet shards (or the official folder layout) decoded into arrays."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
VAL_PER_CLASS = 50


@dataclass(frozen=True)
class ClassInfo:
    """One fine class with its WordNet hypernym chain."""

    wnid: str
    name: str
    broad: str
    domain: str
    wordnet_path: tuple[str, ...]


@dataclass
class Dataset:
    """Decoded images (N, 64, 64, 3) uint8 with fine-class indices and content hashes."""

    images: np.ndarray
    labels: np.ndarray
    keys: list[str]
    sha256: list[str]

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(
            self.images[idx],
            self.labels[idx],
            [self.keys[i] for i in idx],
            [self.sha256[i] for i in idx],
        )

    def __len__(self) -> int:
        return len(self.labels)


def read_classes(data_dir: Path) -> list[ClassInfo]:
    """Reads classes.csv (one row per class with its WordNet path), sorted by WordNet id."""
    path = data_dir / "classes.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: point --data at the folder holding classes.csv and the shards"
        )
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [
        ClassInfo(
            wnid=r["wnid"],
            name=r["fine"],
            broad=r["broad"],
            domain=r["domain"],
            wordnet_path=tuple(p.strip() for p in r["wordnet_path"].split(">")),
        )
        for r in rows
    ]
    return sorted(classes, key=lambda c: c.wnid)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def iter_shard_samples(data_dir: Path, shards: list[str]) -> Iterator[tuple[str, bytes, str]]:
    """Yields (key, jpeg bytes, wnid) from WebDataset tar shards."""
    for name in shards:
        with tarfile.open(data_dir / name, "r:gz") as tar:
            pending: dict[str, dict[str, bytes]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                f = tar.extractfile(member)
                assert f is not None
                pending.setdefault(key, {})[ext] = f.read()
                sample = pending[key]
                if "jpg" in sample and "cls" in sample:
                    del pending[key]
                    yield key, sample["jpg"], sample["cls"].decode().strip()


def iter_folder_samples(root: Path) -> Iterator[tuple[str, bytes, str]]:
    """Yields (key, jpeg bytes, wnid) from the official tiny-imagenet-200 `train/` layout."""
    for cls_dir in sorted((root / "train").iterdir()):
        for img in sorted((cls_dir / "images").glob("*.JPEG")):
            yield img.stem, img.read_bytes(), cls_dir.name


def list_shards(data_dir: Path, limit: int | None = None) -> list[str]:
    manifest = data_dir / "shards.json"
    if manifest.exists():
        entries = json.loads(manifest.read_text())
        names = [e["file"] if isinstance(e, dict) else e for e in _shard_entries(entries)]
    else:
        names = sorted(p.name for p in data_dir.glob("train-*.tar.gz"))
    return names[:limit] if limit else names


def _shard_entries(entries: object) -> list[object]:
    if isinstance(entries, dict):
        for k in ("shards", "files"):
            if k in entries:
                return list(entries[k])
    return list(entries)  # type: ignore[call-overload]


def data_digest(data_dir: Path, shards: list[str]) -> str:
    """A digest of the exact inputs: classes.csv plus the shard checksums from shards.json."""
    h = hashlib.sha256((data_dir / "classes.csv").read_bytes())
    manifest = data_dir / "shards.json"
    if manifest.exists():
        for e in _shard_entries(json.loads(manifest.read_text())):
            if isinstance(e, dict) and e.get("file") in shards:
                h.update(str(e.get("sha256")).encode())
    h.update(",".join(shards).encode())
    return h.hexdigest()[:16]


def load_dataset(
    data_dir: Path, classes: list[ClassInfo], cache_dir: Path, shard_limit: int | None = None
) -> Dataset:
    """Decodes every sample once into a cached .npz keyed by the inputs' digest."""
    folder_layout = (data_dir / "train").is_dir() and not list(data_dir.glob("train-*.tar.gz"))
    shards = [] if folder_layout else list_shards(data_dir, shard_limit)
    if not folder_layout and not shards:
        raise FileNotFoundError(f"no train-*.tar.gz shards or train/ folder under {data_dir}")
    digest = data_digest(data_dir, shards) if shards else "folder"
    cache = cache_dir / f"decoded-{digest}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return Dataset(z["images"], z["labels"], list(z["keys"]), list(z["sha256"]))
    index = {c.wnid: i for i, c in enumerate(classes)}
    samples = (
        iter_folder_samples(data_dir) if folder_layout else iter_shard_samples(data_dir, shards)
    )
    images, labels, keys, hashes = [], [], [], []
    for key, jpg, wnid in tqdm(samples, desc="decode", unit="img", mininterval=2):
        if wnid not in index:
            raise ValueError(f"sample {key} has class {wnid} missing from classes.csv")
        images.append(_decode(jpg))
        labels.append(index[wnid])
        keys.append(key)
        hashes.append(hashlib.sha256(jpg).hexdigest())
    ds = Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), keys, hashes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(
        tmp, images=ds.images, labels=ds.labels, keys=np.asarray(keys), sha256=np.asarray(hashes)
    )
    tmp.rename(cache)
    return ds


def hold_out(
    ds: Dataset, classes: list[ClassInfo], held: tuple[str, ...]
) -> tuple[Dataset, list[ClassInfo], Dataset, list[ClassInfo]]:
    """Separates the images of the `held` classes: (kept data, kept classes, held data, held).

    Labels of both parts are re-indexed into their own class lists.
    """
    unknown = set(held) - {c.wnid for c in classes}
    if unknown:
        raise ValueError(f"held-out classes not in classes.csv: {sorted(unknown)}")
    keep = [c for c in classes if c.wnid not in held]
    out = [c for c in classes if c.wnid in held]
    parts = []
    for part in (keep, out):
        old = np.asarray([classes.index(c) for c in part], dtype=np.int64)
        remap = np.full(len(classes), -1, dtype=np.int64)
        remap[old] = np.arange(len(part))
        sub = ds.subset(np.flatnonzero(np.isin(ds.labels, old)))
        sub.labels = remap[sub.labels]
        parts.append(sub)
    return parts[0], keep, parts[1], out


def split(ds: Dataset, per_class: int, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded validation split of `per_class` images per class; the rest is for training."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(ds.labels):
        idx = np.flatnonzero(ds.labels == c)
        take = min(per_class, max(1, len(idx) // 10))
        val_idx.extend(rng.choice(idx, size=take, replace=False).tolist())
    val = np.zeros(len(ds), dtype=bool)
    val[np.asarray(val_idx)] = True
    return ds.subset(np.flatnonzero(~val)), ds.subset(np.flatnonzero(val))
