"""Exemplar image bytes, kept so stored vectors can be re-embedded when the backbone changes.

Content-addressed: a blob's key is the SHA-256 of its bytes (the exemplar id), so writes are
idempotent and a reader can verify what it got. Locally a folder; in production the same layout
on a volume shared by the routers (an object store needs a client this build does not ship).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from fieldlens.common.errors import FailedPrecondition, NotFound

_KEY = re.compile(r"^[0-9a-f]{64}$")


class FolderBlobStore:
    """Blobs as files `<root>/<key[:2]>/<key>`, written atomically and fsynced."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return self.root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"blob key must be a lowercase SHA-256 hex digest, got {key!r}")
        return self.root / key[:2] / key

    def put(self, data: bytes) -> str:
        """Stores `data` durably; returns its key. Storing the same bytes again is a no-op."""
        key = hashlib.sha256(data).hexdigest()
        path = self._path(key)
        if path.exists():
            return key
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return key

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no blob {key} in {self.url}") from None
        if hashlib.sha256(data).hexdigest() != key:
            raise FailedPrecondition(f"blob {key} in {self.url} is corrupt")
        return data

    def delete(self, key: str) -> bool:
        """Removes a blob (Forget: its photo must not be re-embedded); False if it was not
        there. The removal is fsynced, like a put."""
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(_KEY.match(key)) and self._path(key).exists()


def open_blob_store(target: str, default_root: Path) -> FolderBlobStore:
    """A folder path or file:// URL; empty means `default_root`."""
    if not target:
        return FolderBlobStore(default_root)
    parsed = urlparse(target)
    if parsed.scheme in ("", "file"):
        return FolderBlobStore(Path(parsed.path if parsed.scheme else target))
    raise FailedPrecondition(
        f"blob store {target!r}: only folders and file:// URLs are supported; mount the "
        "object store as a volume"
    )
