"""Exemplar gallery: labelled training images embedded through the router into Qdrant."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from fieldlens.common import tls
from fieldlens.common.credentials import bearer
from fieldlens.common.tls import TlsFiles
from fieldlens.trainer.data import iter_folder_samples, iter_shard_samples, list_shards
from fieldlens.v1 import router_pb2, router_pb2_grpc

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
NOVEL_FILE = "novel.json"
UPLOAD_CHUNK = 256


def validation_keys(models_dir: Path) -> set[str]:
    """Keys of the trainer's validation split: never exemplars, so evaluation stays honest."""
    path = models_dir / SPLIT_FILE
    if not path.exists():
        return set()
    return set(json.loads(path.read_text())["val_keys"])


def _samples(data_dir: Path) -> Iterator[tuple[str, bytes, str]]:
    if (data_dir / "train").is_dir() and not list(data_dir.glob("train-*.tar.gz")):
        return iter_folder_samples(data_dir)
    shards = list_shards(data_dir)
    if not shards:
        raise FileNotFoundError(f"no Tiny ImageNet shards or train/ folder under {data_dir}")
    return iter_shard_samples(data_dir, shards)


def gallery_items(
    data_dir: Path,
    per_class: int,
    exclude: set[str],
    classes: set[str] | None = None,
) -> Iterator[tuple[str, bytes, str]]:
    """(key, image bytes, class id): up to `per_class` images per class, skipping `exclude`,
    only of `classes` when given (the model set's own: held-out novel classes stay out)."""
    taken: Counter[str] = Counter()
    for key, data, wnid in _samples(data_dir):
        if key in exclude or taken[wnid] >= per_class:
            continue
        if classes is not None and wnid not in classes:
            continue
        taken[wnid] += 1
        yield key, data, wnid


def class_samples(data_dir: Path, wnids: Iterable[str], per_class: int) -> dict[str, list[bytes]]:
    """Up to `per_class` images of each class in `wnids`, in shard order (e.g. novel classes)."""
    want = set(wnids)
    out: dict[str, list[bytes]] = {w: [] for w in want}
    for _, data, wnid in _samples(data_dir):
        if wnid in want and len(out[wnid]) < per_class:
            out[wnid].append(data)
            if all(len(v) >= per_class for v in out.values()):
                break
    return out


def novel_classes(models_dir: Path) -> list[dict[str, str]]:
    """Classes the model set never saw in training, with the parent to learn them under."""
    path = models_dir / NOVEL_FILE
    return json.loads(path.read_text())["classes"] if path.exists() else []


def validation_samples(
    data_dir: Path, keys: set[str], limit: int, accept: Iterable[str] | None = None
) -> list[tuple[str, bytes, str]]:
    """The first `limit` validation images, one per class, from the classes in `accept`."""
    allowed = set(accept) if accept is not None else None
    out, seen = [], set()
    for key, data, wnid in _samples(data_dir):
        if key in keys and wnid not in seen and (allowed is None or wnid in allowed):
            out.append((key, data, wnid))
            seen.add(wnid)
            if len(out) >= limit:
                break
    return out


def validation_split(data_dir: Path, keys: set[str]) -> list[tuple[str, bytes, str]]:
    """Every photo of the trainer's validation split, (key, bytes, class id), in data order."""
    return [(key, data, wnid) for key, data, wnid in _samples(data_dir) if key in keys]


def upload(
    stub: router_pb2_grpc.RouterStub,
    items: Iterable[tuple[str, bytes, str]],
    total: int,
    source: str,
    token: str,
) -> router_pb2.IndexExemplarsResponse:
    """Streams items to Router.IndexExemplars in chunks, with a progress bar."""
    summary = router_pb2.IndexExemplarsResponse()
    chunk: list[router_pb2.IndexExemplarsRequest] = []
    with tqdm(total=total, desc="index gallery", unit="img") as bar:

        def flush() -> None:
            if not chunk:
                return
            reply = stub.IndexExemplars(iter(chunk), timeout=300, metadata=bearer(token))
            for field in ("received", "indexed", "duplicates", "rejected"):
                setattr(summary, field, getattr(summary, field) + getattr(reply, field))
            summary.errors.extend(reply.errors[: max(0, 10 - len(summary.errors))])
            bar.update(len(chunk))
            chunk.clear()

        for _, data, wnid in items:
            chunk.append(router_pb2.IndexExemplarsRequest(image=data, label=wnid, source=source))
            if len(chunk) >= UPLOAD_CHUNK:
                flush()
        flush()
    return summary


def index_gallery(
    addr: str,
    data_dir: Path,
    models_dir: Path,
    per_class: int,
    classes: set[str],
    token: str,
    tls_files: TlsFiles | None = None,
) -> router_pb2.IndexExemplarsResponse:
    options = [("grpc.max_send_message_length", 64 << 20)]
    with tls.channel(addr, tls_files, options) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        items = gallery_items(data_dir, per_class, validation_keys(models_dir), classes)
        total = per_class * len(classes)
        return upload(stub, items, total, source=f"gallery:{data_dir.name}", token=token)
