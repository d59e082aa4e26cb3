"""The trainer's data readers: WebDataset shards and the official folder layout agree."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fieldlens.trainer.data import (
    ClassInfo,
    iter_folder_samples,
    iter_shard_samples,
    load_dataset,
    split,
)

CLASSES = [
    ClassInfo("n001", "alpha", "g", "animal", ("entity", "alpha")),
    ClassInfo("n002", "beta", "g", "animal", ("entity", "beta")),
]


def _jpeg(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def samples() -> list[tuple[str, bytes, str]]:
    out = []
    for c, colour in (("n001", (200, 10, 10)), ("n002", (10, 10, 200))):
        for i in range(10):
            out.append((f"{c}_{i}", _jpeg((colour[0], colour[1] + i, colour[2])), c))
    return out


def _write_shard(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for key, data, wnid in samples:
            for ext, blob in (("jpg", data), ("cls", wnid.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def _write_folder(root: Path, samples: list[tuple[str, bytes, str]]) -> None:
    for key, data, wnid in samples:
        d = root / "train" / wnid / "images"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.JPEG").write_bytes(data)


def test_shards_and_folder_layout_yield_the_same_samples(tmp_path, samples):
    _write_shard(tmp_path / "train-00000.tar.gz", samples)
    _write_folder(tmp_path / "official", samples)
    from_shards = sorted(iter_shard_samples(tmp_path, ["train-00000.tar.gz"]))
    from_folder = sorted(iter_folder_samples(tmp_path / "official"))
    assert from_shards == from_folder == sorted(samples)


def test_load_dataset_decodes_caches_and_splits(tmp_path, samples):
    _write_shard(tmp_path / "train-00000.tar.gz", samples)
    (tmp_path / "classes.csv").write_text("wnid\n")
    ds = load_dataset(tmp_path, CLASSES, tmp_path / "cache")
    assert ds.images.shape == (20, 64, 64, 3) and ds.images.dtype == np.uint8
    assert list(np.bincount(ds.labels)) == [10, 10]
    # Red images are class 0, blue class 1: labels follow the decoded pixels.
    assert (ds.images[ds.labels == 0][..., 0].mean() > 150) and (
        ds.images[ds.labels == 1][..., 2].mean() > 150
    )
    assert list((tmp_path / "cache").glob("decoded-*.npz"))
    again = load_dataset(tmp_path, CLASSES, tmp_path / "cache")
    assert again.keys == ds.keys and np.array_equal(again.images, ds.images)
    train, val = split(ds, per_class=1, seed=3)
    assert len(val) == 2 and sorted(val.labels.tolist()) == [0, 1]
    assert not set(train.keys) & set(val.keys) and len(train) + len(val) == len(ds)
    train2, val2 = split(ds, per_class=1, seed=3)
    assert val2.keys == val.keys  # seeded


def test_unknown_class_is_a_clear_error(tmp_path, samples):
    _write_shard(tmp_path / "train-00000.tar.gz", [("x_1", samples[0][1], "n999")])
    (tmp_path / "classes.csv").write_text("wnid\n")
    with pytest.raises(ValueError, match="n999"):
        load_dataset(tmp_path, CLASSES, tmp_path / "cache")
