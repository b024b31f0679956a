"""Grad-CAM and Grad-CAM++ maths, batched, with hooks that are always removed.

The gradient only has to reach the target layer: a forward hook detaches the layer's output and
makes it the start of the autograd graph, and parameters are frozen for the call, so nothing before
the layer records a graph. Batch norm is in eval mode, so images in a batch are independent and a
batched call equals one call per image. Maps are returned on their raw (absolute) scale — units of
class logit per unit area — so that they can be compared across images; scaling is the report's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medres.model import CAM_LAYER

METHODS = ("gradcam", "gradcam++")


def find_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        valid = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Sequential, nn.Conv2d)) and "." not in n] + [
            n for n, m in model.named_modules() if n.count(".") == 1 and n.split(".")[0].startswith("layer")
        ]
        raise ValueError(f"no layer named {name!r}; valid names include: {', '.join(valid)}")
    return modules[name]


@dataclass
class CamResult:
    maps: torch.Tensor  # (B, K, h, w) raw, non-negative; K target slots
    targets: torch.Tensor  # (B, K) class index per slot, -1 where unused
    logits: torch.Tensor  # (B, C)


def _weights(acts: torch.Tensor, grads: torch.Tensor, method: str) -> torch.Tensor:
    if method == "gradcam":
        return grads.mean(dim=(2, 3))  # (B, C')
    # Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential score): pixel weights
    # alpha = g² / (2 g² + Σ_ab A · g³), channel weight = Σ alpha · relu(g).
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    return (alpha * F.relu(grads)).sum(dim=(2, 3))


def compute_cam(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    layer: str = CAM_LAYER,
    method: str = "gradcam",
    score: str = "logit",
    autocast_dtype: torch.dtype | None = None,
) -> CamResult:
    """x: normalised (B, C, H, W); targets: (B, K) class indices (-1 = none). One forward pass,
    one backward pass per target slot.

    `score="logit"` differentiates the raw class logit (the original Grad-CAM); `score="log_softmax"`
    differentiates log p(class) = z_c - logsumexp(z), which removes evidence shared by all classes
    (softmax ignores it) — the class-discriminative choice for multiclass models.
    `autocast_dtype` (e.g. torch.bfloat16) runs the forward pass under autocast; maps are float32."""
    from medres.inference import autocast
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(METHODS)}")
    module = find_layer(model, layer)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _inp, out):
        out = out.detach().requires_grad_(True)
        store["acts"] = out
        return out

    flags = [p.requires_grad for p in model.parameters()]
    handle = module.register_forward_hook(hook)
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            with autocast(x.device, autocast_dtype):
                logits = model(x).float()
            acts = store["acts"]
            scores = torch.log_softmax(logits, dim=1) if score == "log_softmax" else logits
            maps = []
            for k in range(targets.shape[1]):
                t = targets[:, k]
                used = t >= 0
                chosen = scores.gather(1, t.clamp(min=0).view(-1, 1)).squeeze(1)
                total = (chosen * used.to(chosen.dtype)).sum()
                if acts.grad is not None:
                    acts.grad = None
                (grads,) = torch.autograd.grad(total, acts, retain_graph=k < targets.shape[1] - 1)
                a, g = acts.float(), grads.float()
                w = _weights(a, g, method)
                cam = F.relu((w[:, :, None, None] * a).sum(1))
                maps.append(cam * used.view(-1, 1, 1).to(cam.dtype))
        return CamResult(torch.stack(maps, 1).detach(), targets, logits.detach())
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, h, w) → (B, K, size, size), bilinear."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
