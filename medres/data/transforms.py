"""Chest-X-ray-safe augmentation, batched on the training device.

Small rotation/scale/translation (one `affine_grid` + `grid_sample` for the whole batch), then
brightness, contrast and gamma, then optional Gaussian noise. No flips by default: the heart is on the
patient's left, and a flipped chest is not a plausible radiograph. MONAI's `RandAffine`/`RandAdjustContrast`
do the same per sample; doing it per batch on tensors keeps the data path off the critical path on 2
cores (measured in bench/train.py). The strengths come from `train.augment` (config.py, `AugmentConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    """Strengths of each transform; the defaults are `train.augment: true`. A zero (scale (1, 1), flips
    off) switches that transform off. Random numbers are drawn in a fixed order whatever is off, except
    for flips and noise, which draw only when on, so a spec's output is a function of `gen` alone."""

    rotation: float = 7.0  # degrees, ±
    scale: tuple[float, float] = (1 - 0.08, 1 + 0.08)  # zoom factor range
    translate: float = 0.06  # fraction of the image side, ±
    brightness: float = 0.08
    contrast: float = 0.12
    gamma: float = 0.15  # log-gamma, ±
    noise: float = 0.0  # Gaussian std
    hflip: bool = False
    vflip: bool = False

    @property
    def geometric(self) -> bool:
        return bool(self.rotation or self.scale != (1.0, 1.0) or self.translate or self.hflip or self.vflip)

    @property
    def tonal(self) -> bool:
        return bool(self.brightness or self.contrast or self.gamma)

    @classmethod
    def from_config(cls, settings) -> "AugmentSpec":
        """From `config.AugmentConfig` (or any object with the same fields)."""
        return cls(**{f: getattr(settings, f) for f in cls.__dataclass_fields__} | {"scale": tuple(settings.scale)})


# Stronger views: self-supervised pretraining's two views and semi-supervised training's strong view
# (zoom crop, larger rotation and tone changes; still no flips and no colour jitter).
STRONG = AugmentSpec(rotation=10.0, scale=(1 - 0.25, 1 + 0.25), translate=0.08, brightness=0.15, contrast=0.25, gamma=0.25)


def augment(x: torch.Tensor, gen: torch.Generator, spec: AugmentSpec = AugmentSpec()) -> torch.Tensor:
    """x: (B, H, W) in [0, 1] → same shape, augmented. Randomness comes only from `gen`."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=gen) * (hi - lo) + lo

    angle = u(-spec.rotation, spec.rotation) * math.pi / 180
    scale = u(*spec.scale)
    tx, ty = u(-spec.translate, spec.translate) * 2, u(-spec.translate, spec.translate) * 2
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if spec.hflip else torch.ones(b)
    vflip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if spec.vflip else torch.ones(b)
    out = x
    if spec.geometric:  # skipped when off: resampling on the identity grid is not bit-exact
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos * flip, -sin * vflip, tx], 1), torch.stack([sin * flip, cos * vflip, ty], 1)], 1)
        theta = theta.to(x.device, x.dtype)
        grid = F.affine_grid(theta, (b, 1, *x.shape[1:]), align_corners=False)
        out = F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(1)
    shape = (b, 1, 1)
    bright = u(-spec.brightness, spec.brightness).view(shape).to(x.device)
    contrast = u(1 - spec.contrast, 1 + spec.contrast).view(shape).to(x.device)
    gamma = torch.exp(u(-spec.gamma, spec.gamma)).view(shape).to(x.device)
    if spec.tonal:
        mean = out.mean(dim=(1, 2), keepdim=True)
        out = ((out - mean) * contrast + mean + bright).clamp(0, 1)
        out = out.pow(gamma).clamp(0, 1)
    if spec.noise:
        out = (out + spec.noise * torch.randn(out.shape, generator=gen).to(out.device)).clamp(0, 1)
    return out
