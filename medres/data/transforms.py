"""Chest-X-ray-safe augmentation, batched on the training device.

Small rotation/scale/translation (one `affine_grid` + `grid_sample` for the whole batch), then
brightness, contrast and gamma. No horizontal flip by default: the heart is on the patient's left,
and a flipped chest is not a plausible radiograph. MONAI's `RandAffine`/`RandAdjustContrast` do the
same per sample; doing it per batch on tensors keeps the data path off the critical path on 2 cores
(measured in bench/train.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    rotate_deg: float = 7.0
    scale: float = 0.08
    translate: float = 0.06
    brightness: float = 0.08
    contrast: float = 0.12
    gamma: float = 0.15
    hflip: bool = False


# Stronger views: self-supervised pretraining's two views and semi-supervised training's strong view
# (zoom crop, larger rotation and tone changes; still no flips and no colour jitter).
STRONG = AugmentSpec(rotate_deg=10.0, scale=0.25, translate=0.08, brightness=0.15, contrast=0.25, gamma=0.25)


def augment(x: torch.Tensor, gen: torch.Generator, spec: AugmentSpec = AugmentSpec()) -> torch.Tensor:
    """x: (B, H, W) in [0, 1] → same shape, augmented. Randomness comes only from `gen`."""
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=gen) * (hi - lo) + lo

    angle = u(-spec.rotate_deg, spec.rotate_deg) * math.pi / 180
    scale = u(1 - spec.scale, 1 + spec.scale)
    tx, ty = u(-spec.translate, spec.translate) * 2, u(-spec.translate, spec.translate) * 2
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if spec.hflip else torch.ones(b)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, (b, 1, *x.shape[1:]), align_corners=False)
    out = F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(1)
    shape = (b, 1, 1)
    bright = u(-spec.brightness, spec.brightness).view(shape).to(x.device)
    contrast = u(1 - spec.contrast, 1 + spec.contrast).view(shape).to(x.device)
    gamma = torch.exp(u(-spec.gamma, spec.gamma)).view(shape).to(x.device)
    mean = out.mean(dim=(1, 2), keepdim=True)
    out = ((out - mean) * contrast + mean + bright).clamp(0, 1)
    return out.pow(gamma).clamp(0, 1)
