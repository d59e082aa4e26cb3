"""Which precision a training run uses on the hardware it finds."""

from __future__ import annotations

import pytest
import torch

from fieldlens.trainer import loops

CPU = torch.device("cpu")


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_bf16_only_where_the_device_has_bf16_kernels(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: str
) -> None:
    monkeypatch.setattr(loops, "native_bf16", lambda device: native)
    assert loops.training_precision(CPU, "bf16") == expected


def test_fp32_is_kept_whatever_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "native_bf16", lambda device: True)
    assert loops.training_precision(CPU, "fp32") == "fp32"


def test_chosen_precision_is_what_autocast_runs() -> None:
    x = torch.randn(2, 4)
    layer = torch.nn.Linear(4, 3)
    with loops.autocast(CPU, "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with loops.autocast(CPU, "fp32"):
        assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        loops.autocast(CPU, "fp16")
