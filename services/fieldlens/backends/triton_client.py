"""Async client for the Triton nets (KServe v2 gRPC), mapping failures to fieldlens errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from fieldlens.common.errors import InvalidInput, Unavailable

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


def _map_error(model: str, exc: InferenceServerException | grpc.RpcError) -> Exception:
    if isinstance(exc, InferenceServerException):
        status, message = str(exc.status()), str(exc.message())
    else:
        status, message = str(exc.code()), str(exc.details())
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


class TritonClient:
    """Thin async facade over `tritonclient.grpc.aio` for the fieldlens nets.

    The underlying gRPC channel is created on first use, so the object may be built outside
    the event loop that later uses it (but then must stay on that loop).

    Args:
        addr: Triton gRPC endpoint, host:port.
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
        self._client: InferenceServerClient | None = None

    @property
    def addr(self) -> str:
        return self._addr

    def _get(self) -> InferenceServerClient:
        if self._client is None:
            # round_robin spreads calls over every address a headless Service resolves to.
            self._client = InferenceServerClient(
                url=self._addr, channel_args=[("grpc.lb_policy_name", "round_robin")]
            )
        return self._client

    async def is_ready(self, timeout_s: float | None = None) -> bool:
        """Server readiness; False (never an exception) when it cannot be reached."""
        try:
            return bool(
                await self._get().is_server_ready(client_timeout=timeout_s or self._timeout_s)
            )
        except (InferenceServerException, grpc.RpcError) as exc:
            logger.debug("triton %s not ready: %s", self._addr, exc)
            return False

    async def model_ready(self, name: str, timeout_s: float | None = None) -> bool:
        """Readiness of one model; False when it or the server cannot be reached."""
        try:
            return bool(
                await self._get().is_model_ready(name, client_timeout=timeout_s or self._timeout_s)
            )
        except (InferenceServerException, grpc.RpcError) as exc:
            logger.debug("triton model %s at %s not ready: %s", name, self._addr, exc)
            return False

    async def _infer_once(
        self, model: str, images: np.ndarray, output_names: Sequence[str], timeout_s: float
    ) -> list[np.ndarray]:
        infer_input = InferInput(INPUT_NAME, list(images.shape), "UINT8")
        infer_input.set_data_from_numpy(np.ascontiguousarray(images))
        outputs = [InferRequestedOutput(name) for name in output_names]
        try:
            result = await self._get().infer(
                model, [infer_input], outputs=outputs, client_timeout=timeout_s
            )
        except (InferenceServerException, grpc.RpcError) as exc:
            raise _map_error(model, exc) from exc
        arrays: list[np.ndarray] = []
        for name in output_names:
            array = result.as_numpy(name)
            if array is None:
                raise Unavailable(f"triton {model} returned no output {name}")
            arrays.append(array)
        return arrays

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
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> TritonClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
