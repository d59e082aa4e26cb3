"""Async client for the Triton nets (KServe v2 gRPC), mapping failures to fieldlens errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from fieldlens.common import targets
from fieldlens.common.errors import FieldlensError, InvalidInput, Unavailable

logger = logging.getLogger(__name__)

BROAD_MODEL = "broad"
INPUT_NAME = "IMAGE"
BROAD_LOGITS = "BROAD_LOGITS"
EMBEDDING = "EMBEDDING"
FINE_LOGITS = "FINE_LOGITS"
FEATURE_NORM = "FEATURE_NORM"
IMAGE_SHAPE = (64, 64, 3)
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_BATCH_SIZE = 64
_INVALID_STATUSES = frozenset({"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE"})
# A call another server may answer: this one is down, or lacks the net.
_TRY_ANOTHER = frozenset({"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND"})


def _status(exc: InferenceServerException | grpc.RpcError) -> str:
    return str(exc.status()) if isinstance(exc, InferenceServerException) else str(exc.code())


def _map_error(model: str, exc: InferenceServerException | grpc.RpcError) -> FieldlensError:
    status = _status(exc)
    if isinstance(exc, InferenceServerException):
        message = str(exc.message())
    else:
        message = str(exc.details())
    if status in _INVALID_STATUSES:
        return InvalidInput(f"triton rejected input for {model}: {message}")
    return Unavailable(f"triton {model} unavailable ({status}): {message}")


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidInput("images must be a uint8 numpy array")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE or len(images) == 0:
        raise InvalidInput(
            f"images must have shape [B>0,{','.join(map(str, IMAGE_SHAPE))}], "
            f"got {list(images.shape)}"
        )


@dataclass
class _Server:
    """One Triton server behind the target, and the nets it was last seen to lack."""

    addr: str
    client: InferenceServerClient
    lacks: set[str] = field(default_factory=set)


class TritonClient:
    """Async facade over `tritonclient.grpc.aio` for the fieldlens nets, on every server behind
    one target.

    The target may stand for several servers (a headless Service's pods, a local list; see
    common/targets.py). Calls go round the servers, skipping one that lacks the net asked for
    (seen by `refresh`, or by a call it answered NOT_FOUND, as a restarted pod that came back
    with only its image's nets does); a call a server cannot answer is tried once on another.
    `refresh`, run periodically by the owner, re-resolves the target (pods come and go) and
    re-reads which server serves which net.

    Clients are created on first use, so the object may be built outside the event loop that
    later uses it (but then must stay on that loop).

    Args:
        addr: gRPC target of the Triton servers.
        timeout_s: default per-call deadline.
        max_batch_size: the models' max_batch_size; larger inputs are split into chunks
            sent concurrently (Triton's dynamic batcher regroups them).
    """

    def __init__(
        self,
        addr: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> None:
        self._addr = addr
        self._timeout_s = timeout_s
        self._max_batch_size = max_batch_size
        self._servers: list[_Server] = []
        self._next = 0

    @property
    def addr(self) -> str:
        return self._addr

    def servers(self) -> list[str]:
        """The servers calls go to now (resolved on first use, then by `refresh`)."""
        return [s.addr for s in self._known()]

    def _known(self) -> list[_Server]:
        if not self._servers:
            self._adopt(targets.servers(self._addr))
        return self._servers

    def _adopt(self, addrs: Sequence[str]) -> list[InferenceServerClient]:
        """Serves `addrs` from now on; returns the clients of servers no longer among them."""
        old = {s.addr: s for s in self._servers}
        self._servers = [old.pop(a, None) or _Server(a, InferenceServerClient(a)) for a in addrs]
        return [s.client for s in old.values()]

    def _pick(self, model: str, tried: Sequence[_Server] = ()) -> _Server | None:
        """The next server, round the list, that is not known to lack `model` (else any)."""
        servers = [s for s in self._known() if s not in tried]
        if not servers:
            return None
        self._next += 1
        ordered = servers[self._next % len(servers) :] + servers[: self._next % len(servers)]
        return next((s for s in ordered if model not in s.lacks), ordered[0])

    async def refresh(self, models: Sequence[str]) -> dict[str, list[str]]:
        """Re-resolves the target and re-reads which of `models` each server serves; returns
        {server: the models it lacks} (unreachable servers lack them all).

        Raises:
            Unavailable: the target does not resolve (the servers known so far are kept).
        """
        addrs = await asyncio.to_thread(targets.servers, self._addr)
        for gone in self._adopt(addrs):
            await gone.close()
        lacking: dict[str, list[str]] = {}
        for server in self._servers:
            ready = await asyncio.gather(*(_ready(server.client, m) for m in models))
            server.lacks = {m for m, ok in zip(models, ready, strict=True) if not ok}
            if server.lacks:
                lacking[server.addr] = sorted(server.lacks)
        return lacking

    async def is_ready(self, timeout_s: float | None = None) -> bool:
        """Whether any server is ready; False (never an exception) when none can be reached."""
        for server in self._known_or_none():
            try:
                if await server.client.is_server_ready(client_timeout=timeout_s or self._timeout_s):
                    return True
            except (InferenceServerException, grpc.RpcError) as exc:
                logger.debug("triton %s not ready: %s", server.addr, exc)
        return False

    async def model_ready(self, name: str, timeout_s: float | None = None) -> bool:
        """Whether any server has `name` ready; False when none has or can be reached."""
        for server in self._known_or_none():
            if await _ready(server.client, name, timeout_s or self._timeout_s):
                return True
        return False

    def _known_or_none(self) -> list[_Server]:
        try:
            return self._known()
        except FieldlensError as exc:
            logger.debug("triton %s: %s", self._addr, exc)
            return []

    async def _infer_once(
        self, model: str, images: np.ndarray, output_names: Sequence[str], timeout_s: float
    ) -> list[np.ndarray]:
        infer_input = InferInput(INPUT_NAME, list(images.shape), "UINT8")
        infer_input.set_data_from_numpy(np.ascontiguousarray(images))
        outputs = [InferRequestedOutput(name) for name in output_names]
        tried: list[_Server] = []
        error: FieldlensError = Unavailable(f"triton {model}: no server behind {self._addr}")
        while len(tried) < 2 and (server := self._pick(model, tried)) is not None:
            tried.append(server)
            try:
                result = await server.client.infer(
                    model, [infer_input], outputs=outputs, client_timeout=timeout_s
                )
            except (InferenceServerException, grpc.RpcError) as exc:
                error, status = _map_error(model, exc), _status(exc)
                if status not in _TRY_ANOTHER:  # bad input, or a deadline already spent
                    raise error from exc
                if status == "StatusCode.NOT_FOUND":  # a server that lost the net (restarted)
                    server.lacks.add(model)
                logger.debug("triton %s: %s", server.addr, error)
                continue
            return _outputs(model, result, output_names)
        raise error

    async def infer(
        self,
        model: str,
        images: np.ndarray,
        output_names: Sequence[str],
        timeout_s: float | None = None,
    ) -> list[np.ndarray]:
        """Run `model` on uint8 `images`; one array per name in `output_names`, rows aligned.

        The server validates the shape against the model config.

        Raises:
            InvalidInput: the server (or this client) rejected the input.
            Unavailable: the server or model cannot serve (down, not loaded, deadline, crash).
        """
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim < 1:
            raise InvalidInput("images must be a uint8 numpy array with a batch dimension")
        if not output_names:
            raise InvalidInput("at least one output name is required")
        deadline = timeout_s or self._timeout_s
        if len(images) <= self._max_batch_size:
            return await self._infer_once(model, images, output_names, deadline)
        chunks = [
            images[i : i + self._max_batch_size]
            for i in range(0, len(images), self._max_batch_size)
        ]
        parts = await asyncio.gather(
            *(self._infer_once(model, c, output_names, deadline) for c in chunks)
        )
        return [np.concatenate([p[j] for p in parts]) for j in range(len(output_names))]

    async def infer_broad(
        self, images: np.ndarray, timeout_s: float | None = None, model: str = BROAD_MODEL
    ) -> tuple[np.ndarray, np.ndarray]:
        """One pass of the broad net `model`: (logits [B,20], L2-normalised embedding [B,256])."""
        _check_images(images)
        logits, embedding = await self.infer(
            model, images, (BROAD_LOGITS, EMBEDDING), timeout_s=timeout_s
        )
        return logits, embedding

    async def infer_broad_full(
        self, images: np.ndarray, timeout_s: float | None = None, model: str = BROAD_MODEL
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`infer_broad` plus the fine logits [B,classes] and feature norms [B,1] (same pass)."""
        _check_images(images)
        logits, embedding, fine, norm = await self.infer(
            model,
            images,
            (BROAD_LOGITS, EMBEDDING, FINE_LOGITS, FEATURE_NORM),
            timeout_s=timeout_s,
        )
        return logits, embedding, fine, norm

    async def close(self) -> None:
        for client in self._adopt([]):
            await client.close()

    async def __aenter__(self) -> TritonClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


async def _ready(client: InferenceServerClient, name: str, timeout_s: float = 1.0) -> bool:
    """Whether `name` is ready on that server; False when it is not or cannot be reached."""
    try:
        return bool(await client.is_model_ready(name, client_timeout=timeout_s))
    except (InferenceServerException, grpc.RpcError):
        return False


def _outputs(model: str, result: Any, output_names: Sequence[str]) -> list[np.ndarray]:
    arrays: list[np.ndarray] = []
    for name in output_names:
        array = result.as_numpy(name)
        if array is None:
            raise Unavailable(f"triton {model} returned no output {name}")
        arrays.append(array)
    return arrays
