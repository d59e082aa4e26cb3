"""The real tritonserver serving TorchScript nets through the generic Python-backend model."""

from __future__ import annotations

import asyncio
import json
import sys
import types
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pytest

from fieldlens.backends.triton_client import BROAD_LOGITS, EMBEDDING, TritonClient
from fieldlens.cluster import free_port
from fieldlens.common.errors import InvalidInput, Unavailable

if TYPE_CHECKING:
    from conftest import TritonProcess

# The I/O contract of the throwaway repository built in conftest.py.
N_BROAD = 20
EMBEDDING_DIM = 256
SPECIALIST_CLASSES = 7

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

T = TypeVar("T")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


def _run(addr: str, body: Callable[[TritonClient], Awaitable[T]]) -> T:
    # A grpc.aio channel belongs to one event loop, so each test builds its client inside.
    async def main() -> T:
        async with TritonClient(addr) as client:
            return await body(client)

    return asyncio.run(main())


def test_server_and_models_ready(tritonserver: TritonProcess) -> None:
    async def body(client: TritonClient) -> tuple[bool, bool, bool, bool]:
        return (
            await client.is_ready(),
            await client.model_ready("broad"),
            await client.model_ready("specialist_test"),
            await client.model_ready("no_such_model"),
        )

    assert _run(tritonserver.grpc_addr, body) == (True, True, True, False)


def test_broad_shapes_and_unit_norm_embeddings(tritonserver: TritonProcess) -> None:
    logits, emb = _run(tritonserver.grpc_addr, lambda c: c.infer_broad(_images(3)))
    assert logits.shape == (3, N_BROAD) and logits.dtype == np.float32
    assert emb.shape == (3, EMBEDDING_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1]), "different images should embed differently"


def test_batch_equals_single_calls(tritonserver: TritonProcess) -> None:
    images = _images(5, seed=1)

    async def body(client: TritonClient) -> tuple[list[np.ndarray], list[np.ndarray], list]:
        batched = await client.infer_broad(images)
        sequential = [await client.infer_broad(images[i : i + 1]) for i in range(5)]
        # Sent together, these are merged by the dynamic batcher and split back by the model.
        concurrent = await asyncio.gather(
            *(client.infer_broad(images[i : i + 1]) for i in range(5))
        )
        return list(batched), sequential, list(concurrent)

    (logits, emb), sequential, concurrent = _run(tritonserver.grpc_addr, body)
    for singles in (sequential, concurrent):
        np.testing.assert_allclose(np.concatenate([s[0] for s in singles]), logits, atol=1e-5)
        np.testing.assert_allclose(np.concatenate([s[1] for s in singles]), emb, atol=1e-5)


def test_more_than_max_batch_is_chunked(tritonserver: TritonProcess) -> None:
    images = _images(70, seed=2)

    async def body(client: TritonClient) -> tuple[np.ndarray, np.ndarray]:
        _, emb = await client.infer_broad(images)
        _, tail_emb = await client.infer_broad(images[64:])
        return emb, tail_emb

    emb, tail_emb = _run(tritonserver.grpc_addr, body)
    assert emb.shape == (70, EMBEDDING_DIM)
    np.testing.assert_allclose(emb[64:], tail_emb, atol=1e-5)


def test_specialist_outputs(tritonserver: TritonProcess) -> None:
    (logits,) = _run(
        tritonserver.grpc_addr, lambda c: c.infer("specialist_test", _images(4), ["LOGITS"])
    )
    assert logits.shape == (4, SPECIALIST_CLASSES)


def test_wrong_shape_is_invalid_input_and_server_keeps_serving(
    tritonserver: TritonProcess,
) -> None:
    wrong = np.zeros((2, 32, 32, 3), dtype=np.uint8)

    async def body(client: TritonClient) -> np.ndarray:
        with pytest.raises(InvalidInput, match="broad") as server_side:
            await client.infer("broad", wrong, [BROAD_LOGITS, EMBEDDING])
        assert "32" in str(server_side.value), "the error should name the offending shape"
        with pytest.raises(InvalidInput, match="shape"):
            await client.infer_broad(wrong)
        with pytest.raises(InvalidInput):
            await client.infer_broad(_images(1).astype(np.float32))  # type: ignore[arg-type]
        _, emb = await client.infer_broad(_images(2))
        return emb

    assert _run(tritonserver.grpc_addr, body).shape == (2, EMBEDDING_DIM)


def test_unknown_model_and_dead_server_are_unavailable(tritonserver: TritonProcess) -> None:
    with pytest.raises(Unavailable):
        _run(tritonserver.grpc_addr, lambda c: c.infer("no_such_model", _images(1), ["X"]))

    dead = f"127.0.0.1:{free_port()}"
    assert _run(dead, lambda c: c.is_ready(timeout_s=0.5)) is False
    with pytest.raises(Unavailable):
        _run(dead, lambda c: c.infer_broad(_images(1), timeout_s=0.5))


def test_metrics_endpoint_serves_inference_counters(tritonserver: TritonProcess) -> None:
    with urllib.request.urlopen(f"http://{tritonserver.metrics_addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'nv_inference_request_success{model="broad"' in text


class _FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _FakeError:
    INVALID_ARG = 3
    INTERNAL = 13

    def __init__(self, message: str, code: int = 0) -> None:
        self.message, self.code = message, code


class _FakeResponse:
    def __init__(self, output_tensors: list[_FakeTensor], error: _FakeError | None = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


def test_python_model_answers_every_request_of_a_mixed_batch(
    tiny_model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend model in-process, with a stand-in for the stub-only utils module."""
    fake_utils = types.SimpleNamespace(
        Tensor=_FakeTensor,
        TritonError=_FakeError,
        InferenceResponse=_FakeResponse,
        get_input_tensor_by_name=lambda request, name: request.get(name),
        triton_string_to_numpy=lambda t: {"TYPE_FP32": np.float32, "TYPE_UINT8": np.uint8}[t],
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_utils)
    from fieldlens.backends.triton_python_model import TritonPythonModel

    config = {
        "name": "broad",
        "output": [
            {"name": BROAD_LOGITS, "data_type": "TYPE_FP32"},
            {"name": EMBEDDING, "data_type": "TYPE_FP32"},
        ],
        "parameters": {"TORCH_NUM_THREADS": {"string_value": "1"}},
    }
    model = TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(tiny_model_repository / "broad"),
            "model_version": "1",
        }
    )
    images = _images(3, seed=5)
    requests = [
        {"IMAGE": _FakeTensor("IMAGE", images[:2])},
        {},
        {"IMAGE": _FakeTensor("IMAGE", images[:1].astype(np.float32))},
        {"IMAGE": _FakeTensor("IMAGE", np.zeros((1, 8, 8, 3), dtype=np.uint8))},
        {"IMAGE": _FakeTensor("IMAGE", images[2:])},
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    for i, needle in ((1, "missing"), (2, "uint8"), (3, "shape")):
        assert responses[i].error is not None and needle in responses[i].error.message
    whole = model.execute([{"IMAGE": _FakeTensor("IMAGE", images)}])[0]
    assert whole.error is None
    got = np.concatenate([responses[0].outputs[EMBEDDING], responses[4].outputs[EMBEDDING]])
    np.testing.assert_allclose(got, whole.outputs[EMBEDDING], atol=1e-6)
    assert responses[0].outputs[BROAD_LOGITS].shape == (2, N_BROAD)
