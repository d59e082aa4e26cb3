"""Exemplar vector store: one narrow interface, Qdrant Edge (local) and qdrant-client (server).

Both implementations are synchronous; the router calls them through `asyncio.to_thread`.

Thread safety and ownership:
- `EdgeVectorStore` runs the Qdrant engine in-process on a directory that exactly ONE process
  may own (enforced with an exclusive file lock). Within that process, searches may run from
  several threads at once; writes (`upsert`, `flush`, `optimize`, `close`) are serialised by
  the store. `optimize()` (HNSW build) holds the GIL for its whole run (seconds for tens of
  thousands of points), so call it after bulk loads or at start-up, not on the request path.
- `QdrantClientVectorStore` is safe to share between threads for a remote server; in local
  mode (`:memory:` or a path) every call is serialised, because that mode is plain Python.

Point ids: an exemplar's id is the hex content hash of its image; Qdrant needs an integer or
a UUID, so the first 128 bits become a UUID (`point_uuid`) and the full hash stays in the
payload. Upserting the same image twice therefore overwrites one point (idempotent Learn).
"""

from __future__ import annotations

import abc
import fcntl
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import urlparse

import numpy as np

from fieldlens.common.errors import FailedPrecondition, InvalidInput, Unavailable

logger = logging.getLogger(__name__)

BROAD_FIELD = "broad"
LABEL_FIELD = "label"
# Payload fields with a keyword index: searches filter on them.
INDEXED_FIELDS = (BROAD_FIELD, LABEL_FIELD)
DEFAULT_HNSW_M = 16
DEFAULT_HNSW_EF_CONSTRUCT = 100
# Segments below these sizes (KiB of vectors; 10 MiB = 10k 256-d float32 vectors) are
# searched exactly: brute force over that little data is about as fast as HNSW.
DEFAULT_INDEXING_THRESHOLD_KB = 10_000
DEFAULT_FULL_SCAN_THRESHOLD_KB = 10_000
# Threads of an Edge shard's search pool. The engine's default is one per CPU, and every search
# then wakes them all: on 2 cores 8 threads cost 0.36 ms of CPU per search against 0.14 for one.
DEFAULT_SEARCH_THREADS = 1
# Distinct filters an Edge store keeps built (dispatch picks a few groups of 20; a label filter
# per suggested taxon).
MAX_CACHED_FILTERS = 4096
LOCK_FILENAME = ".fieldlens-owner.lock"
_HEX_ID = re.compile(r"^[0-9a-f]{32,}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.-]+:[0-9]{1,5}$")


@dataclass(frozen=True, eq=False)
class Exemplar:
    """One labelled example image, as stored.

    Attributes:
        id: hex content hash of the image (at least 32 hex digits).
        vector: embedding, float32 [dim].
        label: taxon id of the leaf, e.g. WordNet "n02124075".
        broad: broad group id, e.g. "broad/cat".
        path: taxon ids from the root to the leaf.
        source: where the example came from (e.g. "train", "learn", a gallery name).
        embedding_version: version of the backbone that produced `vector`.
        client: who wrote it: the name of the write token of its Learn or IndexExemplars call
            (common/credentials.py); empty when unknown.
    """

    id: str
    vector: np.ndarray
    label: str
    broad: str
    path: list[str] = field(default_factory=list)
    source: str = ""
    embedding_version: str = ""
    client: str = ""


# What EdgeVectorStore keeps in memory about a point besides its id: label, broad, path, source.
_PointInfo = tuple[str, str, list[str], str]


class Neighbour(NamedTuple):
    """A stored exemplar found near a query; `similarity` is cosine similarity in [-1, 1].

    A named tuple rather than a dataclass: a search makes dozens per request, and a tuple is
    built several times faster.
    """

    id: str
    label: str
    broad: str
    similarity: float
    path: list[str]
    # Where the exemplar came from, as stored with it (Exemplar.source).
    source: str = ""


def point_uuid(content_hash: str) -> uuid.UUID:
    """Deterministic Qdrant point id of an exemplar: its hash's first 128 bits as a UUID."""
    normalised = content_hash.lower()
    if not _HEX_ID.match(normalised):
        raise InvalidInput(
            f"exemplar id must be a hex content hash (>=32 digits): {content_hash!r}"
        )
    return uuid.UUID(hex=normalised[:32])


@dataclass(frozen=True)
class StoredExemplar:
    """What a re-index needs of a stored exemplar: its id (the image's content hash, also its
    blob key), label and provenance; the vector is not needed, it is recomputed."""

    id: str
    label: str
    source: str
    embedding_version: str
    broad: str = ""
    client: str = ""


def _stored(point_id: Any, payload: dict[str, Any] | None) -> StoredExemplar:
    n = _neighbour(point_id, 0.0, payload)
    payload = payload or {}
    return StoredExemplar(
        n.id,
        n.label,
        str(payload.get("source", "")),
        str(payload.get("embedding_version", "")),
        n.broad,
        str(payload.get("client", "")),
    )


def _payload(ex: Exemplar) -> dict[str, Any]:
    return {
        "exemplar_id": ex.id.lower(),
        LABEL_FIELD: ex.label,
        BROAD_FIELD: ex.broad,
        "path": list(ex.path),
        "source": ex.source,
        "embedding_version": ex.embedding_version,
        "client": ex.client,
    }


def _neighbour(point_id: Any, score: float, payload: dict[str, Any] | None) -> Neighbour:
    payload = payload or {}
    fallback = point_id.hex if isinstance(point_id, uuid.UUID) else str(point_id)
    return Neighbour(
        id=str(payload.get("exemplar_id", fallback)),
        label=str(payload.get(LABEL_FIELD, "")),
        broad=str(payload.get(BROAD_FIELD, "")),
        similarity=float(score),
        path=[str(p) for p in payload.get("path", [])],
        source=str(payload.get("source", "")),
    )


def _as_vector(vector: np.ndarray | Sequence[float], dim: int) -> list[float]:
    array = np.asarray(vector, dtype=np.float32)
    if array.shape != (dim,):
        raise InvalidInput(f"vector must have shape [{dim}], got {list(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise InvalidInput("vector contains NaN or infinity")
    values: list[float] = array.tolist()
    return values


class VectorStore(abc.ABC):
    """Labelled exemplar vectors with taxonomy payload; k-NN filtered by broad group
    (`search`) or by label (`search_labels`, an answer's evidence).

    `broad_in=None` searches everything; an empty list allows no group and returns nothing.
    """

    # True when a search is a sub-millisecond call into this process (no I/O to wait on).
    in_process: bool = False
    # Set by every implementation's constructor (see `collection`).
    _collection: str

    @abc.abstractmethod
    def ensure_collection(self, dim: int) -> None:
        """Create the collection (cosine, HNSW, keyword index on `broad`) or open and check it."""

    @abc.abstractmethod
    def upsert(self, points: Sequence[Exemplar]) -> None:
        """Insert or overwrite exemplars (by id); returns once the write is applied."""

    @abc.abstractmethod
    def delete(self, ids: Sequence[str]) -> list[StoredExemplar]:
        """Removes exemplars by id (content hash); returns those that were there (ids not
        stored are skipped, so deleting twice is harmless) once the removal is applied."""

    @abc.abstractmethod
    def search(
        self, vector: np.ndarray, k: int, broad_in: Sequence[str] | None = None
    ) -> list[Neighbour]:
        """The `k` most similar exemplars, best first, optionally only in `broad_in` groups."""

    @abc.abstractmethod
    def search_labels(
        self, vector: np.ndarray, labels: Sequence[str], k: int
    ) -> list[list[Neighbour]]:
        """For each of `labels`: the `k` exemplars labelled with it most similar to `vector`,
        best first (one batched query; an unknown label finds nothing)."""

    @abc.abstractmethod
    def count(self) -> int:
        """Number of stored exemplars."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Force pending writes to disk."""

    @abc.abstractmethod
    def optimize(self) -> bool:
        """Build indexes / merge segments after bulk loads; True if anything changed."""

    @abc.abstractmethod
    def scroll(self, batch: int = 256) -> Iterator[list[StoredExemplar]]:
        """Every stored exemplar, `batch` at a time (for re-indexing)."""

    @abc.abstractmethod
    def publish_as(self, collection: str) -> None:
        """Makes this (fully built) collection the one named `collection`, atomically."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store; further calls fail."""

    @property
    def collection(self) -> str:
        """The collection this store reads and writes (after `publish_as`, its new name where
        the collection was renamed; a Qdrant server's alias keeps the built name)."""
        return self._collection

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EdgeVectorStore(VectorStore):
    """Qdrant Edge shard in `<root>/<collection>/`, owned by this process.

    Durability: with the shard's write-ahead log on, an upsert that returned survives a crash
    of this process; `flush()` persists segments (call it before a planned shutdown; `close()`
    does).

    Args:
        root: directory holding one sub-directory per collection.
        collection: collection name; include the embedding-space version in it.
        hnsw_m: HNSW graph degree.
        hnsw_ef_construct: HNSW build-time candidate list size.
        indexing_threshold_kb: segment size from which `optimize()` builds an HNSW index.
        full_scan_threshold_kb: below this size a search scans exactly.
        hnsw_ef: search-time candidate list size (None = engine default).
        search_threads: threads of the shard's search pool (the process's CPU thread setting).
    """

    in_process = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        collection: str,
        *,
        hnsw_m: int = DEFAULT_HNSW_M,
        hnsw_ef_construct: int = DEFAULT_HNSW_EF_CONSTRUCT,
        indexing_threshold_kb: int = DEFAULT_INDEXING_THRESHOLD_KB,
        full_scan_threshold_kb: int = DEFAULT_FULL_SCAN_THRESHOLD_KB,
        hnsw_ef: int | None = None,
        search_threads: int = DEFAULT_SEARCH_THREADS,
    ) -> None:
        if not collection or "/" in collection or collection.startswith("."):
            raise InvalidInput(f"bad collection name {collection!r}")
        self._path = Path(root) / collection
        self._collection = collection
        self._hnsw_m = hnsw_m
        self._hnsw_ef_construct = hnsw_ef_construct
        self._indexing_threshold_kb = indexing_threshold_kb
        self._full_scan_threshold_kb = full_scan_threshold_kb
        self._hnsw_ef = hnsw_ef
        self._search_threads = search_threads
        self._filters: dict[tuple[str, ...], Any] = {}  # (field, values...) -> filter
        self._params: Any = None  # search parameters (hnsw_ef), built at open
        self._shard: Any = None
        self._dim = 0
        self._lock_fd: int | None = None
        self._write_lock = threading.Lock()
        # What a search returns about each point, kept in memory: reading it back from the
        # engine's payloads cost more than the search itself (0.6 of 0.8 ms for 64 hits among
        # 1k points). Exact, because every write goes through this object: the process owns
        # the shard (see `_acquire_ownership`).
        # point id (its UUID's int: hashed in C) -> (exemplar id, (label, broad, path,
        # source)); that tuple is shared by every point with the same label and source.
        self._points: dict[int, tuple[str, _PointInfo]] = {}
        self._labels: dict[tuple[str, str, tuple[str, ...], str], _PointInfo] = {}

    @property
    def path(self) -> Path:
        return self._path

    def _config(self, dim: int) -> Any:
        import qdrant_edge as qe

        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine),
            hnsw_config=qe.HnswIndexConfig(
                m=self._hnsw_m,
                ef_construct=self._hnsw_ef_construct,
                full_scan_threshold=self._full_scan_threshold_kb,
            ),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=self._indexing_threshold_kb),
            max_search_threads=self._search_threads,
        )

    def _acquire_ownership(self) -> None:
        self._path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise FailedPrecondition(
                f"vector store {self._path} is owned by another process; an Edge shard has "
                "one owner (write through the router)"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _release_ownership(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def ensure_collection(self, dim: int) -> None:
        import qdrant_edge as qe

        if dim <= 0:
            raise InvalidInput("dim must be positive")
        with self._write_lock:
            if self._shard is not None:
                if dim != self._dim:
                    raise FailedPrecondition(f"{self._collection} is open with dim {self._dim}")
                return
            self._acquire_ownership()
            config = self._config(dim)
            try:
                if (self._path / "edge_config.json").exists():
                    shard = qe.EdgeShard.load(str(self._path), config)
                else:
                    shard = qe.EdgeShard.create(str(self._path), config)
            except Exception as exc:  # the bindings raise bare Exception for every failure
                self._release_ownership()
                raise FailedPrecondition(
                    f"cannot open vector store {self._path} (dim {dim}): {exc}"
                ) from exc
            schema = shard.info().payload_schema
            for name in INDEXED_FIELDS:  # a store made before a field was indexed gets it now
                if name not in schema:
                    shard.update(
                        qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword)
                    )
            self._shard = shard
            self._dim = dim
            self._params = qe.SearchParams(hnsw_ef=self._hnsw_ef) if self._hnsw_ef else None
            self._remember_all()
            logger.info(
                "opened edge vector store %s (dim %d, %d points)", self._path, dim, self.count()
            )

    def _require(self) -> Any:
        shard = self._shard
        if shard is None:
            raise FailedPrecondition(f"vector store {self._collection} is not open")
        return shard

    def upsert(self, points: Sequence[Exemplar]) -> None:
        import qdrant_edge as qe

        if not points:
            return
        ids = [point_uuid(p.id) for p in points]
        batch = [
            qe.Point(id=i, vector=_as_vector(p.vector, self._dim), payload=_payload(p))
            for i, p in zip(ids, points, strict=True)
        ]
        with self._write_lock:
            self._require().update(qe.UpdateOperation.upsert_points(batch))
            for i, p in zip(ids, points, strict=True):
                self._remember(i, p.id.lower(), p.label, p.broad, list(p.path), p.source)

    def delete(self, ids: Sequence[str]) -> list[StoredExemplar]:
        import qdrant_edge as qe

        if not ids:
            return []
        point_ids = list(dict.fromkeys(point_uuid(i) for i in ids))
        with self._write_lock:
            shard = self._require()
            found = shard.retrieve(point_ids, True, False)
            if found:
                shard.update(qe.UpdateOperation.delete_points([r.id for r in found]))
            for r in found:
                self._points.pop(r.id.int, None)
        return [_stored(r.id, r.payload) for r in found]

    def _remember(
        self,
        point_id: uuid.UUID,
        exemplar_id: str,
        label: str,
        broad: str,
        path: list[str],
        source: str,
    ) -> None:
        key = (label, broad, tuple(path), source)
        info = self._labels.get(key)
        if info is None:
            info = self._labels[key] = (label, broad, path, source)
        self._points[point_id.int] = (exemplar_id, info)

    def _remember_all(self) -> None:
        """Reads what searches return about every stored point (at open)."""
        import qdrant_edge as qe

        self._points.clear()
        shard, offset = self._require(), None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(limit=1024, offset=offset, with_payload=True, with_vector=False)
            )
            for r in records:
                n = _neighbour(r.id, 0.0, r.payload)
                self._remember(r.id, n.id, n.label, n.broad, n.path, n.source)
            if offset is None or not records:
                return

    def _neighbours(self, hits: Sequence[Any]) -> list[Neighbour]:
        """Neighbours of payload-less hits, from what `_points` knows."""
        out = []
        points = self._points
        for h in hits:
            point_id = h.id
            known = points.get(point_id.int)
            if known is None:  # cannot happen while this object owns the shard; be safe
                (r,) = self._require().retrieve([point_id], True, False)
                out.append(_neighbour(point_id, h.score, r.payload))
                continue
            exemplar_id, (label, broad, path, source) = known
            out.append(Neighbour(exemplar_id, label, broad, h.score, path, source))
        return out

    def _request(self, query: Any, k: int, where: Any) -> Any:
        """A query for the `k` nearest to `query` (a built `Query`) that pass `where` (a
        filter, or None)."""
        import qdrant_edge as qe

        return qe.QueryRequest(
            limit=k,
            query=query,
            filter=where,
            params=self._params,
            with_payload=False,  # see `_points`
        )

    def _filter(self, values: tuple[str, ...], field: str = BROAD_FIELD) -> Any:
        """The filter on these values of `field` (broad groups, or labels), built once: a
        search's groups and a suggestion's taxa repeat."""
        key = (field, *values)
        found = self._filters.get(key)
        if found is None:
            import qdrant_edge as qe

            if len(self._filters) >= MAX_CACHED_FILTERS:
                self._filters.clear()
            found = self._filters[key] = qe.Filter(
                must=[qe.FieldCondition(key=field, match=qe.MatchAny(any=list(values)))]
            )
        return found

    def search(
        self, vector: np.ndarray, k: int, broad_in: Sequence[str] | None = None
    ) -> list[Neighbour]:
        import qdrant_edge as qe

        if k <= 0 or (broad_in is not None and not broad_in):
            return []
        shard = self._require()
        return self._neighbours(
            shard.query(
                self._request(
                    qe.Query.Nearest(_as_vector(vector, self._dim)),
                    k,
                    None if broad_in is None else self._filter(tuple(broad_in)),
                )
            )
        )

    def search_labels(
        self, vector: np.ndarray, labels: Sequence[str], k: int
    ) -> list[list[Neighbour]]:
        import qdrant_edge as qe

        if k <= 0 or not labels:
            return [[] for _ in labels]
        shard = self._require()
        query = qe.Query.Nearest(_as_vector(vector, self._dim))  # one for every label
        requests = [self._request(query, k, self._filter((lb,), LABEL_FIELD)) for lb in labels]
        found = shard.query_batch(qe.QueryBatchRequest(requests))
        return [self._neighbours(hits) for hits in found]

    def count(self) -> int:
        import qdrant_edge as qe

        return int(self._require().count(qe.CountRequest(exact=True)))

    def flush(self) -> None:
        with self._write_lock:
            self._require().flush()

    def optimize(self) -> bool:
        with self._write_lock:
            changed = bool(self._require().optimize())
        logger.info("optimized edge vector store %s (changed=%s)", self._path, changed)
        return changed

    def scroll(self, batch: int = 256) -> Iterator[list[StoredExemplar]]:
        import qdrant_edge as qe

        offset = None
        while True:
            records, offset = self._require().scroll(
                qe.ScrollRequest(limit=batch, offset=offset, with_payload=True, with_vector=False)
            )
            if records:
                yield [_stored(r.id, r.payload) for r in records]
            if offset is None or not records:
                return

    def publish_as(self, collection: str) -> None:
        """Renames the shard directory (atomic on one filesystem) and reopens it there."""
        final = self._path.parent / collection
        if final.exists():
            raise FailedPrecondition(f"{final} exists already")
        dim = self._dim
        self.close()
        os.rename(self._path, final)
        self._path, self._collection = final, collection
        self.ensure_collection(dim)

    def close(self) -> None:
        with self._write_lock:
            shard, self._shard = self._shard, None
            if shard is not None:
                shard.flush()
                shard.close()
            self._release_ownership()
            self._points.clear()
            self._labels.clear()


class QdrantClientVectorStore(VectorStore):
    """A collection behind `qdrant-client`: a Qdrant server, or its local mode as a reference.

    Args:
        collection: collection name; include the embedding-space version in it.
        url: Qdrant server URL (http(s)://host:6333, or grpc://host:6334 to use gRPC).
        location: ":memory:" for the in-process reference mode.
        path: directory for the on-disk local mode.
        api_key: server API key, if any.
        timeout_s: per-request timeout for a server.
        hnsw_ef: search-time candidate list size (None = server default).
    """

    def __init__(
        self,
        collection: str,
        *,
        url: str | None = None,
        location: str | None = None,
        path: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        timeout_s: int = 5,
        hnsw_ef: int | None = None,
    ) -> None:
        from qdrant_client import QdrantClient

        if sum(x is not None for x in (url, location, path)) != 1:
            raise InvalidInput("give exactly one of url, location, path")
        self._collection = collection
        self._hnsw_ef = hnsw_ef
        self._dim = 0
        self._remote = url is not None
        if url is not None:
            parsed = urlparse(url)
            if parsed.scheme == "grpc":
                self._client = QdrantClient(
                    host=parsed.hostname,
                    grpc_port=parsed.port or 6334,
                    prefer_grpc=True,
                    api_key=api_key,
                    timeout=timeout_s,
                    check_compatibility=False,
                )
            else:
                self._client = QdrantClient(
                    url=url, api_key=api_key, timeout=timeout_s, check_compatibility=False
                )
        elif location is not None:
            self._client = QdrantClient(location=location)
        else:
            # Calls arrive from asyncio.to_thread workers; the lock below serialises them.
            self._client = QdrantClient(path=str(path), force_disable_check_same_thread=True)
        self._lock = threading.RLock()

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        import grpc
        from qdrant_client.http.exceptions import ApiException

        with nullcontext() if self._remote else self._lock:
            try:
                yield
            except (ApiException, grpc.RpcError, OSError) as exc:
                raise Unavailable(f"qdrant {what} on {self._collection} failed: {exc}") from exc

    def ensure_collection(self, dim: int) -> None:
        from qdrant_client import models

        if dim <= 0:
            raise InvalidInput("dim must be positive")
        with self._call("ensure_collection"):
            if self._client.collection_exists(self._collection):
                info = self._client.get_collection(self._collection)
                vectors = info.config.params.vectors
                size = vectors.size if isinstance(vectors, models.VectorParams) else None
                if size != dim:
                    raise FailedPrecondition(
                        f"collection {self._collection} has vector size {size}, wanted {dim}"
                    )
            else:
                self._client.create_collection(
                    self._collection,
                    vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                    hnsw_config=models.HnswConfigDiff(
                        m=DEFAULT_HNSW_M, ef_construct=DEFAULT_HNSW_EF_CONSTRUCT
                    ),
                )
            if self._remote:
                # Local mode has no payload indexes (and warns); the server needs one on
                # the filter field for fast filtered HNSW search.
                for name in INDEXED_FIELDS:
                    self._client.create_payload_index(
                        self._collection, name, models.PayloadSchemaType.KEYWORD, wait=True
                    )
        self._dim = dim

    def _require_dim(self) -> int:
        if self._dim == 0:
            raise FailedPrecondition(f"vector store {self._collection} is not open")
        return self._dim

    def upsert(self, points: Sequence[Exemplar]) -> None:
        from qdrant_client import models

        if not points:
            return
        dim = self._require_dim()
        batch = [
            models.PointStruct(
                id=str(point_uuid(p.id)), vector=_as_vector(p.vector, dim), payload=_payload(p)
            )
            for p in points
        ]
        with self._call("upsert"):
            self._client.upsert(self._collection, points=batch, wait=True)

    def delete(self, ids: Sequence[str]) -> list[StoredExemplar]:
        from qdrant_client import models

        if not ids:
            return []
        self._require_dim()
        point_ids = list(dict.fromkeys(str(point_uuid(i)) for i in ids))
        with self._call("delete"):
            found = self._client.retrieve(
                self._collection, point_ids, with_payload=True, with_vectors=False
            )
            if found:
                self._client.delete(
                    self._collection,
                    points_selector=models.PointIdsList(points=[r.id for r in found]),
                    wait=True,
                )
        return [_stored(r.id, r.payload) for r in found]

    def _filter(self, values: Sequence[str] | None, field: str = BROAD_FIELD) -> Any:
        from qdrant_client import models

        if values is None:
            return None
        return models.Filter(
            must=[models.FieldCondition(key=field, match=models.MatchAny(any=list(values)))]
        )

    def _params(self) -> Any:
        from qdrant_client import models

        return models.SearchParams(hnsw_ef=self._hnsw_ef) if self._hnsw_ef else None

    def search(
        self, vector: np.ndarray, k: int, broad_in: Sequence[str] | None = None
    ) -> list[Neighbour]:
        if k <= 0 or (broad_in is not None and not broad_in):
            return []
        query = _as_vector(vector, self._require_dim())
        with self._call("search"):
            response = self._client.query_points(
                self._collection,
                query=query,
                query_filter=self._filter(broad_in),
                search_params=self._params(),
                limit=k,
                with_payload=True,
            )
        return [_neighbour(p.id, p.score, p.payload) for p in response.points]

    def search_labels(
        self, vector: np.ndarray, labels: Sequence[str], k: int
    ) -> list[list[Neighbour]]:
        from qdrant_client import models

        if k <= 0 or not labels:
            return [[] for _ in labels]
        query = _as_vector(vector, self._require_dim())
        requests = [
            models.QueryRequest(
                query=query,
                filter=self._filter([label], LABEL_FIELD),
                params=self._params(),
                limit=k,
                with_payload=True,
            )
            for label in labels
        ]
        with self._call("search_labels"):
            responses = self._client.query_batch_points(self._collection, requests=requests)
        return [[_neighbour(p.id, p.score, p.payload) for p in r.points] for r in responses]

    def count(self) -> int:
        self._require_dim()
        with self._call("count"):
            return int(self._client.count(self._collection, exact=True).count)

    def flush(self) -> None:
        # Upserts use wait=True: the server has applied and logged them when they return.
        self._require_dim()

    def optimize(self) -> bool:
        # A Qdrant server runs its optimizers itself; local mode has nothing to optimise.
        self._require_dim()
        return False

    def scroll(self, batch: int = 256) -> Iterator[list[StoredExemplar]]:
        self._require_dim()
        offset = None
        while True:
            with self._call("scroll"):
                records, offset = self._client.scroll(
                    self._collection,
                    limit=batch,
                    offset=offset,
                    with_payload=True,
                    with_vectors=False,
                )
            if records:
                yield [_stored(r.id, r.payload) for r in records]
            if offset is None or not records:
                return

    def publish_as(self, collection: str) -> None:
        """Points the alias `collection` at this collection (one atomic alias update)."""
        from qdrant_client import models

        with self._call("publish"):
            self._client.update_collection_aliases(
                change_aliases_operations=[
                    models.CreateAliasOperation(
                        create_alias=models.CreateAlias(
                            collection_name=self._collection, alias_name=collection
                        )
                    )
                ]
            )

    def close(self) -> None:
        with self._lock:
            self._client.close()
        self._dim = 0


def list_collections(url_or_path: str) -> list[str]:
    """Collections (and, on a server, aliases) at a Qdrant URL or an Edge directory."""
    scheme = urlparse(url_or_path).scheme
    if scheme in ("http", "https", "grpc") or _HOST_PORT.match(url_or_path):
        url = url_or_path if scheme else f"http://{url_or_path}"
        probe = QdrantClientVectorStore("_", url=url)
        try:
            with probe._call("list collections"):
                names = [c.name for c in probe._client.get_collections().collections]
                names += [a.alias_name for a in probe._client.get_aliases().aliases]
        finally:
            probe.close()
        return sorted(set(names))
    root = Path(url_or_path)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / "edge_config.json").exists())


def open_vector_store(
    url_or_path: str, collection: str, dim: int, search_threads: int = DEFAULT_SEARCH_THREADS
) -> VectorStore:
    """Open (creating if needed) `collection` at a Qdrant URL or a local directory.

    `http(s)://...`, `grpc://host:port` or a bare `host:port` (REST) -> a Qdrant server via
    qdrant-client; `:memory:` -> qdrant-client's in-process reference mode; anything else is
    a directory for Qdrant Edge (with `search_threads` in its search pool).
    """
    store: VectorStore
    scheme = urlparse(url_or_path).scheme
    if scheme in ("http", "https", "grpc"):
        store = QdrantClientVectorStore(collection, url=url_or_path)
    elif _HOST_PORT.match(url_or_path):
        store = QdrantClientVectorStore(collection, url=f"http://{url_or_path}")
    elif url_or_path == ":memory:":
        store = QdrantClientVectorStore(collection, location=":memory:")
    else:
        store = EdgeVectorStore(url_or_path, collection, search_threads=search_threads)
    try:
        store.ensure_collection(dim)
    except Exception:
        store.close()
        raise
    return store
