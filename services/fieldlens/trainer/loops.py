"""Training loops: augmentation, LR range test, one-cycle with progressive resizing, checkpoints."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fieldlens.trainer.nets import normalise_uint8

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs trained at one input resolution (progressive resizing)."""

    resolution: int
    epochs: int


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_precision(device: torch.device, requested: str) -> str:
    """The precision a run trains in: bf16 only where the device has bf16 kernels.

    Elsewhere bf16 is emulated and far slower than fp32 (on an AVX2-only CPU a backbone step at
    32 px took 1.57 s in bf16 and 0.15 s in fp32), so such a run trains in fp32.
    """
    if requested != "bf16":
        return requested
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether the device has bf16 kernels (a CPU with AVX512-BF16 or AMX, or a recent GPU)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for the forward pass: 'bf16' (oneDNN bf16 kernels on CPU) or 'fp32'."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r} (use 'bf16' or 'fp32')")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def group_log_probs(logits: torch.Tensor, group_log_mask: torch.Tensor) -> torch.Tensor:
    """Fine logits (B, C) -> log P(group) (B, G): log of the summed class probabilities.

    `group_log_mask` is (G, C) with 0 where the class belongs to the group and -inf elsewhere.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    return torch.logsumexp(logp.unsqueeze(1) + group_log_mask.unsqueeze(0), dim=2)


def augment(images: torch.Tensor, gen: torch.Generator, resolution: int) -> torch.Tensor:
    """uint8 NHWC batch -> normalised NCHW: random crop (pad 4, reflect), flip, resize."""
    x = normalise_uint8(images)
    n, _, h, w = x.shape
    pad = 4
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    # Gather every crop at once with an index grid rather than a Python loop over the batch.
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    x = x[
        torch.arange(n, device=x.device).view(n, 1, 1, 1),
        torch.arange(3, device=x.device).view(1, 3, 1, 1),
        rows.view(n, 1, h, 1),
        cols.view(n, 1, 1, w),
    ]
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return resize(x, resolution)


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    if x.shape[-1] == resolution:
        return x
    return F.interpolate(
        x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
    )


def batches(
    n: int, batch_size: int, rng: np.random.Generator, shuffle: bool = True, drop_last: bool = True
) -> Iterator[np.ndarray]:
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - batch_size + 1 if drop_last else n
    for i in range(0, max(stop, 0), batch_size):
        yield order[i : i + batch_size]


def mixup(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    alpha: float,
    rng: np.random.Generator,
    smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns inputs and soft targets; alpha 0 disables mixing (label smoothing only)."""
    target = F.one_hot(y, n_classes).float() * (1 - smoothing) + smoothing / n_classes
    if alpha <= 0:
        return x, target
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(y))).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]


def lr_range_test(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    resolution: int,
    batch_size: int,
    seed: int,
    steps: int = 150,
    lo: float = 1e-3,
    hi: float = 2.0,
    divisor: float = 10.0,
) -> tuple[float, list[tuple[float, float]]]:
    """Leslie Smith's LR finder on a throwaway copy: returns (suggested max LR, curve)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lo, momentum=0.9, nesterov=True)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    curve: list[tuple[float, float]] = []
    smooth, best = 0.0, math.inf
    model.train()
    it = batches(len(labels), batch_size, rng)
    for step in tqdm(range(steps), desc="lr-finder", leave=False):
        lr = lo * (hi / lo) ** (step / (steps - 1))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = next(it)
        x = augment(torch.from_numpy(images[idx]).to(device), gen, resolution)
        loss = F.cross_entropy(model(x), torch.from_numpy(labels[idx]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        smooth = loss.item() if step == 0 else 0.8 * smooth + 0.2 * loss.item()
        curve.append((lr, smooth))
        best = min(best, smooth)
        if smooth > 4 * best and step > 10:
            break
    model.load_state_dict(state)
    # The steepest-descent rule is noisy on short runs; the LR at the smoothed loss minimum
    # divided by `divisor` is a robust peak for one-cycle, clamped to a sane band.
    lr_min = min(curve, key=lambda p: p[1])[0]
    return float(min(max(lr_min / divisor, 0.05), 0.5)), curve


def train_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    phases: list[Phase],
    max_lr: float,
    batch_size: int,
    seed: int,
    ckpt: Path,
    desc: str,
    weight_decay: float = 5e-4,
    smoothing: float = 0.1,
    mixup_alpha: float = 0.0,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    precision: str = "fp32",
    class_groups: np.ndarray | None = None,
    group_weight: float = 0.0,
) -> list[dict[str, float]]:
    """One-cycle SGD across all phases, resumable from `ckpt` at epoch granularity.

    With `class_groups` (class -> group index) and `group_weight` > 0 the loss adds the
    cross-entropy of the group probabilities rolled up from the fine softmax, which is what the
    served broad score uses; mixed inputs mix the group targets the same way.
    """
    device = next(model.parameters()).device
    group_mask = None
    if class_groups is not None and group_weight > 0:
        n_groups = int(class_groups.max()) + 1
        member = torch.zeros(n_groups, n_classes, dtype=torch.bool)
        member[torch.from_numpy(class_groups), torch.arange(n_classes)] = True
        group_mask = torch.zeros(member.shape).masked_fill(~member, -math.inf).to(device)
        to_group = member.T.float().to(device)
    steps_per_epoch = len(labels) // batch_size
    total_epochs = sum(p.epochs for p in phases)
    opt = torch.optim.SGD(
        model.parameters(), lr=max_lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=max_lr,
        total_steps=steps_per_epoch * total_epochs,
        pct_start=0.25,
        div_factor=20,
        final_div_factor=200,
    )
    history: list[dict[str, float]] = []
    start_epoch = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch, history = state["epoch"], state["history"]
        logger.info("%s: resuming from %s at epoch %d", desc, ckpt, start_epoch)
    schedule = [p.resolution for p in phases for _ in range(p.epochs)]
    for epoch in range(start_epoch, total_epochs):
        res = schedule[epoch]
        rng = np.random.default_rng(seed + epoch)
        gen = torch.Generator().manual_seed(seed + epoch)
        model.train()
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        bar = tqdm(
            batches(len(labels), batch_size, rng),
            total=steps_per_epoch,
            desc=f"{desc} {epoch + 1}/{total_epochs} @{res}px",
            mininterval=5,
        )
        for idx in bar:
            y = torch.from_numpy(labels[idx]).to(device)
            x = augment(torch.from_numpy(images[idx]).to(device), gen, res)
            x = x.contiguous(memory_format=torch.channels_last)
            xm, target = mixup(x, y, n_classes, mixup_alpha, rng, smoothing)
            with autocast(device, precision):
                logits = model(xm)
            logits = logits.float()
            loss = torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
            if group_mask is not None:
                group_target = target @ to_group
                group_logp = group_log_probs(logits, group_mask)
                loss = loss + group_weight * torch.sum(-group_target * group_logp, dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{correct / seen:.3f}",
                lr=f"{sched.get_last_lr()[0]:.3f}",
            )
        record = {
            "epoch": epoch + 1,
            "resolution": res,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "seconds": time.time() - t0,
        }
        if evaluate is not None:
            t_eval = time.time()
            record.update(evaluate(model, res))
            record["eval_seconds"] = time.time() - t_eval
        history.append(record)
        logger.info("%s epoch %d: %s", desc, epoch + 1, record)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "epoch": epoch + 1,
                "history": history,
            },
            tmp,
        )
        tmp.replace(ckpt)
    return history


@torch.inference_mode()
def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    resolution: int,
    batch_size: int = 256,
    flip_tta: bool = False,
    desc: str | None = None,
) -> np.ndarray:
    """Runs `model` over uint8 images in batches and returns stacked outputs as numpy."""
    device = next(iter(model.parameters())).device if isinstance(model, nn.Module) else "cpu"
    outs = []
    rng = range(0, len(images), batch_size)
    for i in tqdm(rng, desc=desc, leave=False, disable=desc is None, mininterval=5):
        x = resize(
            normalise_uint8(torch.from_numpy(images[i : i + batch_size]).to(device)), resolution
        ).contiguous(memory_format=torch.channels_last)
        out = model(x)
        if flip_tta:
            out = (out + model(x.flip(3))) / 2
        outs.append(out.float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0,))
