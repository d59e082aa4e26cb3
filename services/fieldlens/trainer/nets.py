"""Network definitions: the backbone, its heads, and the exported Triton modules."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet channel statistics, baked into the exported modules so clients send plain RGB bytes.
MEAN = (0.480, 0.448, 0.398)
STD = (0.277, 0.269, 0.282)


@dataclass(frozen=True)
class BackboneSpec:
    """Shape of the backbone; part of the embedding-space version."""

    stem: int = 32
    widths: tuple[int, ...] = (48, 96, 192, 256)
    blocks: tuple[int, ...] = (1, 1, 2, 1)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def dim(self) -> int:
        return self.widths[-1]


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.b1(self.c1(x)), inplace=True)
        out = self.b2(self.c2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class Backbone(nn.Module):
    """A small ResNet: stride-2 stem, one stage per width, global average pool -> features."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, spec.stem, 3, 2, 1, bias=False),
            nn.BatchNorm2d(spec.stem),
            nn.ReLU(inplace=True),
        ]
        cin = spec.stem
        for i, (width, n) in enumerate(zip(spec.widths, spec.blocks, strict=True)):
            for j in range(n):
                layers.append(_Residual(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width
        self.features = nn.Sequential(*layers)
        self.dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


class Classifier(nn.Module):
    """Backbone plus a linear head (used for the fine net and for specialists)."""

    def __init__(self, spec: BackboneSpec, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = Backbone(spec)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.backbone.dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.backbone(x)))


class EmbedAndLogits(nn.Module):
    """Normalised input -> [L2-normalised embedding | fine logits] (one pass, for evaluation)."""

    def __init__(self, net: Classifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.backbone(x)
        return torch.cat([F.normalize(f, dim=1), self.net.head(f)], dim=1)


def round_to_fp16(module: nn.Module) -> nn.Module:
    """Rounds every floating-point weight and buffer to fp16 precision, in place (kept fp32).

    The exported nets store their weights in fp16 (half the file) and compute in fp32; rounding
    the trained nets first makes every later stage and the evaluation see the served weights.
    """
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return module


def normalise_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC RGB -> float NCHW normalised with the dataset statistics."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class BroadExport(nn.Module):
    """One pass: uint8 images -> (broad log-probabilities, L2-normalised embedding, fine logits,
    feature norm).

    The broad score is an ensemble of the broad head on the embedding and the fine head's
    probabilities summed per broad group (`fine_to_broad`), weighted by `mix` (0 = head only).
    With `flip_tta` the fine logits are averaged over the image and its mirror image.
    """

    def __init__(
        self,
        backbone: Backbone,
        broad_head: nn.Linear,
        fine_head: nn.Linear,
        fine_to_broad: torch.Tensor,
        mix: float,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        self.flip_tta = flip_tta
        self.backbone = backbone
        self.broad_head = broad_head
        self.fine_head = fine_head
        self.register_buffer("fine_to_broad", fine_to_broad.float())
        self.mix = float(mix)

    def forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = normalise_uint8(images)
        feats = self.backbone(x)
        emb = F.normalize(feats, dim=1)
        fine = self.fine_head(feats)
        if self.flip_tta:  # a trace-time constant: one of the two graphs is exported
            fine = (fine + self.fine_head(self.backbone(x.flip(3)))) / 2
        p_head = torch.softmax(self.broad_head(emb), dim=1)
        p_roll = torch.softmax(fine, dim=1) @ self.fine_to_broad
        p = (1.0 - self.mix) * p_head + self.mix * p_roll
        # The fine logits and the feature norm let a client put learned classes into the same
        # softmax as the trained ones (imprinted weights, see the manifest's "imprint").
        norm = feats.norm(dim=1, keepdim=True)
        return torch.log(p.clamp_min(1e-12)), emb, fine, norm


class SpecialistExport(nn.Module):
    """uint8 images -> logits over one broad group's classes."""

    def __init__(self, net: Classifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.net(normalise_uint8(images)),)
