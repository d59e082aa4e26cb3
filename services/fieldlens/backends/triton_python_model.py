"""Generic Triton Python-backend model serving a TorchScript net, plus its config writer."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fieldlens.common.settings import (
    CPU_THREADS_ENV,
    DEFAULT_CPU_THREADS,
    SettingsError,
    cpu_threads_from_env,
)
from fieldlens.common.threads import set_cpu_threads

logger = logging.getLogger(__name__)

INPUT_NAME = "IMAGE"
IMAGE_DIMS = (64, 64, 3)
MODEL_FILENAME = "model.pt"
SHIM_SOURCE = "from fieldlens.backends.triton_python_model import TritonPythonModel  # noqa: F401\n"
# The config parameter holding a net's CPU threads (torch, BLAS, OpenMP) per instance. Its
# name predates FIELDLENS_CPU_THREADS; it is kept because every exported config.pbtxt carries
# it and a config's bytes are part of its model set's version.
THREADS_PARAMETER = "TORCH_NUM_THREADS"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_PREFERRED_BATCH_SIZES = (8, 16, 32, 64)
DEFAULT_MAX_QUEUE_DELAY_US = 2000


def instance_threads(model_config: dict[str, Any], env: Mapping[str, str] | None = None) -> int:
    """Threads of one instance's stub process: FIELDLENS_CPU_THREADS where the deployment
    sets it (it knows the CPU it grants), else the config's TORCH_NUM_THREADS (the model
    set's choice), else 1. A malformed value raises SettingsError, failing the model's load.
    """
    raw = model_config.get("parameters", {}).get(THREADS_PARAMETER, {}).get("string_value")
    default = DEFAULT_CPU_THREADS
    if raw:
        try:
            default = int(raw)
        except ValueError:
            default = 0
        if default < 1:
            raise SettingsError(THREADS_PARAMETER, raw, "expected an integer > 0")
    return cpu_threads_from_env(os.environ if env is None else env, default)


def load_torchscript(path: Path | str, device: str = "cpu") -> Any:
    """Loads an exported net for inference: weights stored in fp16 are computed in fp32."""
    import torch

    with warnings.catch_warnings():
        # torch 2.13 marks TorchScript deprecated; it is still the export contract here.
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location=device)
    return module.float().eval()


class TritonPythonModel:
    """Serves `<model_dir>/<version>/model.pt`: uint8 [B,64,64,3] in, config outputs out.

    The TorchScript module returns a tuple of tensors in the order of the config's outputs.
    Requests gathered by the dynamic batcher are run as one batch and split back.
    """

    def initialize(self, args: dict[str, str]) -> None:
        # The utils module exists only inside the Python-backend stub.
        import torch
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        self._torch = torch
        config = json.loads(args["model_config"])
        self._name = config.get("name", args.get("model_name", "?"))
        self._outputs: list[tuple[str, np.dtype[Any]]] = [
            (out["name"], np.dtype(pb_utils.triton_string_to_numpy(out["data_type"])))
            for out in config["output"]
        ]
        # Each instance is its own stub process: its torch, OpenMP and BLAS pools (numpy's
        # OpenBLAS, loaded by the stub) are this process's alone.
        threads = instance_threads(config)
        source = CPU_THREADS_ENV if CPU_THREADS_ENV in os.environ else THREADS_PARAMETER
        self._log_info(set_cpu_threads(threads, source=f"{self._name}: {source}"))
        model_path = Path(args["model_repository"]) / args["model_version"] / MODEL_FILENAME
        # instance_group KIND_GPU gives each instance its device; KIND_CPU stays on the CPU.
        self._device = (
            f"cuda:{args.get('model_instance_device_id', '0')}"
            if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
            else "cpu"
        )
        self._module = load_torchscript(model_path, self._device)
        self._log_info(
            f"loaded {self._name} from {model_path} "
            f"(outputs={[name for name, _ in self._outputs]}, threads={threads})"
        )

    def _log_info(self, message: str) -> None:
        # The stub configures no Python logging; Triton's own log is where its lines go.
        triton_logger = getattr(self._pb, "Logger", None)
        if triton_logger is not None:
            triton_logger.log_info(message)
        else:
            logger.info("%s", message)

    def _error(self, message: str, invalid: bool = True) -> Any:
        pb = self._pb
        code_name = "INVALID_ARG" if invalid else "INTERNAL"
        code = getattr(pb.TritonError, code_name, None)
        error = pb.TritonError(message) if code is None else pb.TritonError(message, code)
        return pb.InferenceResponse(output_tensors=[], error=error)

    def _read_images(self, request: Any) -> np.ndarray:
        tensor = self._pb.get_input_tensor_by_name(request, INPUT_NAME)
        if tensor is None:
            raise ValueError(f"missing input {INPUT_NAME}")
        images = tensor.as_numpy()
        if images.dtype != np.uint8:
            raise ValueError(f"{INPUT_NAME} must be uint8, got {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_DIMS:
            raise ValueError(
                f"{INPUT_NAME} must have shape [B,{','.join(map(str, IMAGE_DIMS))}], "
                f"got {list(images.shape)}"
            )
        return images

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batches: list[np.ndarray] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            try:
                batches.append(self._read_images(request))
                owners.append(i)
            except ValueError as exc:
                responses[i] = self._error(f"{self._name}: {exc}")
        if batches:
            self._run(batches, owners, responses)
        return responses

    def _run(self, batches: list[np.ndarray], owners: list[int], responses: list[Any]) -> None:
        torch = self._torch
        pb = self._pb
        batch = batches[0] if len(batches) == 1 else np.concatenate(batches, axis=0)
        try:
            with torch.inference_mode():
                result = self._module(
                    torch.from_numpy(np.ascontiguousarray(batch)).to(self._device)
                )
            tensors = result if isinstance(result, tuple | list) else (result,)
            if len(tensors) != len(self._outputs):
                raise RuntimeError(
                    f"module returned {len(tensors)} outputs, config declares {len(self._outputs)}"
                )
            arrays = [
                t.detach().cpu().numpy().astype(dtype, copy=False)
                for t, (_, dtype) in zip(tensors, self._outputs, strict=True)
            ]
        except Exception as exc:  # any model failure must become per-request errors, not a crash
            logger.exception("%s: execution failed for batch of %d", self._name, len(batch))
            for i in owners:
                responses[i] = self._error(f"{self._name}: execution failed: {exc}", invalid=False)
            return
        start = 0
        for i, images in zip(owners, batches, strict=True):
            end = start + len(images)
            responses[i] = pb.InferenceResponse(
                output_tensors=[
                    pb.Tensor(name, np.ascontiguousarray(array[start:end]))
                    for (name, _), array in zip(self._outputs, arrays, strict=True)
                ]
            )
            start = end

    def finalize(self) -> None:
        logger.info("unloading %s", self._name)


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def render_config(
    name: str,
    outputs: Sequence[tuple[str, int]],
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    kind: str = "KIND_CPU",
    instance_count: int = 1,
    preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED_BATCH_SIZES,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    cpu_threads: int = DEFAULT_CPU_THREADS,
) -> str:
    """Text of a config.pbtxt for a TorchScript net with the IMAGE -> FP32 outputs contract."""
    if not outputs:
        raise ValueError("a model needs at least one output")
    preferred = sorted({b for b in preferred_batch_sizes if 0 < b <= max_batch_size})
    output_blocks = ",\n".join(
        f'  {{\n    name: "{out_name}"\n    data_type: TYPE_FP32\n    dims: {_dims([size])}\n  }}'
        for out_name, size in outputs
    )
    batching = f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
    if preferred:
        batching = f"  preferred_batch_size: {_dims(preferred)}\n" + batching
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        f'  {{\n    name: "{INPUT_NAME}"\n    data_type: TYPE_UINT8\n'
        f"    dims: {_dims(IMAGE_DIMS)}\n  }}\n"
        "]\n"
        f"output [\n{output_blocks}\n]\n"
        f"dynamic_batching {{\n{batching}}}\n"
        f"instance_group [\n  {{\n    kind: {kind}\n    count: {instance_count}\n  }}\n]\n"
        "parameters {\n"
        f'  key: "{THREADS_PARAMETER}"\n'
        f'  value: {{ string_value: "{cpu_threads}" }}\n'
        "}\n"
    )


def write_config(
    model_dir: str | os.PathLike[str],
    name: str,
    outputs: list[tuple[str, int]],
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    kind: str = "KIND_CPU",
    instance_count: int = 1,
    preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED_BATCH_SIZES,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    cpu_threads: int = DEFAULT_CPU_THREADS,
    version: int = 1,
) -> Path:
    """Write `<model_dir>/config.pbtxt` and the `<model_dir>/<version>/model.py` shim.

    The caller saves `<model_dir>/<version>/model.pt` itself. Returns the config path.
    """
    root = Path(model_dir)
    version_dir = root / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    config_path = root / "config.pbtxt"
    config_path.write_text(
        render_config(
            name,
            outputs,
            max_batch_size=max_batch_size,
            kind=kind,
            instance_count=instance_count,
            preferred_batch_sizes=preferred_batch_sizes,
            max_queue_delay_us=max_queue_delay_us,
            cpu_threads=cpu_threads,
        )
    )
    (version_dir / "model.py").write_text(SHIM_SOURCE)
    return config_path
