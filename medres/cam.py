"""Grad-CAM, Grad-CAM++ and occlusion maths, batched, with hooks that are always removed.

The methods are one table, `METHODS` (at the end): one `CamMethod` entry per method carries how its
maps are computed and what the report needs to run and label it; adding a method is adding an entry.

The gradient only has to reach the target layer: a forward hook detaches the layer's output and
makes it the start of the autograd graph, and parameters are frozen for the call, so nothing before
the layer records a graph. Batch norm is in eval mode, so images in a batch are independent and a
batched call equals one call per image. Maps are returned on their raw (absolute) scale — units of
class logit per unit area — so that they can be compared across images; scaling is the report's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medres.model import CAM_LAYER


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
    features: torch.Tensor | None = None  # (B, 2048) pooled features of the same pass (the OOD gate's input)


SCORES = ("logit", "log_odds", "log_softmax")


def _score(logits: torch.Tensor, t: torch.Tensor, score: str) -> torch.Tensor:
    """The scalar per image whose gradient drives the map, for class t of each row."""
    z = logits.gather(1, t.view(-1, 1)).squeeze(1)
    if score == "logit":
        return z
    if score == "log_softmax":
        return z - torch.logsumexp(logits, dim=1)
    # log-odds of class t against all others: log p_t / (1 - p_t) = z_t - logsumexp_{k != t} z_k
    others = logits.masked_fill(F.one_hot(t, logits.shape[1]).bool(), float("-inf"))
    return z - torch.logsumexp(others, dim=1)


def _gradcam_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    return grads.mean(dim=(2, 3))  # (B, C')


def _gradcam_pp_weights(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    # Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential score): pixel weights
    # alpha = g² / (2 g² + Σ_ab A · g³), channel weight = Σ alpha · relu(g).
    g2, g3 = grads.pow(2), grads.pow(3)
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    return (alpha * F.relu(grads)).sum(dim=(2, 3))


def compute_cam(
    model: nn.Module,
    x: torch.Tensor,
    targets: "torch.Tensor | Callable[[torch.Tensor], torch.Tensor]",
    *,
    layer: str = CAM_LAYER,
    method: str = "gradcam",
    score: str = "logit",
    autocast_dtype: torch.dtype | None = None,
) -> CamResult:
    """x: normalised (B, C, H, W); targets: (B, K) class indices (-1 = none). One forward pass,
    one backward pass per target slot.

    `score` is what is differentiated: "logit" the raw class logit z_c (the original Grad-CAM; for a
    sigmoid output it is the class log-odds); "log_odds" log p_c/(1 - p_c) = z_c - logsumexp_{k≠c} z_k,
    the choice for softmax models: evidence shared by all classes cancels (softmax ignores it) and,
    unlike "log_softmax" (log p_c, whose gradient is scaled by 1 - p_c), it does not vanish for
    confident predictions — with log p_c a case predicted at 0.999 gets a map ~1000× colder than one
    at 0.5, the opposite of what a shared scale should show.
    `autocast_dtype` (e.g. torch.bfloat16) runs the forward pass under autocast; maps are float32.
    `targets` may be a function of the pass's logits (`report` chooses the explained classes from the
    probabilities of this same pass, so scoring and explaining need one forward pass, not two). The
    pooled features of the pass come back too when the model has an `avgpool`."""
    from medres.inference import autocast
    if not getattr(METHODS.get(method), "gradient", False):
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(gradient_methods())}")
    if score not in SCORES:
        raise ValueError(f"unknown CAM score {score!r}; choose from {', '.join(SCORES)}")
    module = find_layer(model, layer)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _inp, out):
        out = out.detach().requires_grad_(True)
        store["acts"] = out
        return out

    def keep_pooled(_m, _inp, out):
        store["pooled"] = out.detach()

    flags = [p.requires_grad for p in model.parameters()]
    handle = module.register_forward_hook(hook)
    pool = getattr(model, "avgpool", None)
    pool_handle = pool.register_forward_hook(keep_pooled) if isinstance(pool, nn.Module) else None
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            with autocast(x.device, autocast_dtype):
                logits = model(x).float()
            if callable(targets):
                targets = targets(logits.detach())
            maps = _maps_from(store["acts"], logits, targets, method, score)
        pooled = store.get("pooled")
        return CamResult(maps, targets, logits.detach(), None if pooled is None else torch.flatten(pooled, 1).float())
    finally:
        handle.remove()
        if pool_handle is not None:
            pool_handle.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def _maps_from(acts: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, method: str, score: str) -> torch.Tensor:
    """(B, K, h, w) maps: one backward pass per target slot from the score to `acts` (which requires grad)."""
    maps = []
    for k in range(targets.shape[1]):
        t = targets[:, k]
        used = t >= 0
        chosen = _score(logits, t.clamp(min=0), score)
        total = (chosen * used.to(chosen.dtype)).sum()
        (grads,) = torch.autograd.grad(total, acts, retain_graph=k < targets.shape[1] - 1)
        a, g = acts.float(), grads.float()
        w = METHODS[method].weights(a, g)
        cam = F.relu((w[:, :, None, None] * a).sum(1))
        maps.append(cam * used.view(-1, 1, 1).to(cam.dtype))
    return torch.stack(maps, 1).detach()


def cam_from_features(model: nn.Module, acts: torch.Tensor, targets, *, method: str = "gradcam", score: str = "logit") -> CamResult:
    """Grad-CAM on `layer4` from feature maps computed elsewhere (the int8 ONNX model's `maps`
    output): only the head (pooling + classifier, fp32) runs here, with autograd — the same gradient
    `compute_cam` takes at layer4, whose backward pass is the head's too. `targets` as in compute_cam."""
    if not getattr(METHODS.get(method), "gradient", False):
        raise ValueError(f"CAM from precomputed features supports {' and '.join(gradient_methods())}, not {method!r}")
    head = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            acts = acts.detach().float().requires_grad_(True)
            pooled = model.pooled(acts)
            logits = model.classify(pooled).float()
            if callable(targets):
                targets = targets(logits.detach())
            maps = _maps_from(acts, logits, targets, method, score)
        return CamResult(maps, targets, logits.detach(), pooled.detach())
    finally:
        for p, f in zip(model.parameters(), head):
            p.requires_grad_(f)


def upsample(maps: torch.Tensor, size: int, *, anchor: float | None = 0.0) -> torch.Tensor:
    """(B, K, h, w) → (B, K, size, size), bilinear, aligned with the receptive fields.

    In a ResNet every downsampling step is an odd kernel with symmetric padding (7×7/2 + 3, 3×3/2 + 1,
    1×1/2 + 0), so cell n of a stride-S map is centred on input pixel S·n (checked by back-propagating
    from single cells in tests/test_cam.py). The usual "resize the map to the image" (OpenCV's resize,
    `F.interpolate(align_corners=False)`, as in pytorch-grad-cam and MONAI) puts cell n at S·n + S/2 - ½
    instead: half a cell down and right, 15.5 px at layer4 — the size of a small lesion. `anchor` is the
    pixel on which cell 0 is centred (0 for ResNets); `anchor=None` gives the conventional resize."""
    if anchor is None:
        return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    b, k, h, w = maps.shape
    pix = torch.arange(size, dtype=torch.float32, device=maps.device)

    def axis(n: int) -> torch.Tensor:  # feature coordinate of each pixel, as grid_sample's [-1, 1]
        if n == 1:
            return torch.zeros(size, device=maps.device)
        # The stride is a power of two and each stride-2 step rounds up (n = ceil(size / S)), so a
        # 200 px input gives 7 layer4 cells with S = 32, not 200 / 7.
        stride = 1
        while -(-size // stride) > n:
            stride *= 2
        return (pix - anchor) / stride / (n - 1) * 2 - 1

    gy, gx = torch.meshgrid(axis(h), axis(w), indexing="ij")
    grid = torch.stack((gx, gy), dim=-1).unsqueeze(0).expand(b, -1, -1, -1).to(maps.dtype)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=True)


class _ClassScores(nn.Module):
    """The model's per-class target scores (log-odds or logits), for occlusion."""

    def __init__(self, model: nn.Module, score: str):
        super().__init__()
        self.model, self.score = model, score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x).float()
        if self.score == "logit":
            return z
        n = z.shape[1]
        return torch.stack([_score(z, torch.full((z.shape[0],), k, dtype=torch.long, device=z.device), self.score) for k in range(n)], 1)


def occlusion_maps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, *, score: str = "log_odds", cells: int = 14) -> tuple[torch.Tensor, tuple[int, int]]:
    """Occlusion sensitivity through MONAI (`monai.visualize.OcclusionSensitivity`): a model-agnostic
    check on Grad-CAM. Each position's map value is how much the target score (same units as the CAM
    target: log-odds or logit) drops when a patch around it is replaced by the image mean; only drops
    count (ReLU), as in Grad-CAM. x: normalised (B, C, S, S); targets (B, K) with -1 padding.
    Returns (B, K, S, S) maps at input resolution and the occlusion grid (cells × cells patches with
    50% overlap: cost = cells² forward passes per image)."""
    from monai.visualize import OcclusionSensitivity

    size = x.shape[-1]
    mask = max(2, int(round(2 * size / (cells + 1))))
    wrapped = _ClassScores(model, score).eval()
    occ = OcclusionSensitivity(nn_module=wrapped, mask_size=mask, n_batch=32, overlap=0.5, mode="mean_img", activate=False, verbose=False)
    with torch.no_grad():
        base = wrapped(x)  # (B, n_classes)
        # (B, n_classes, S, S): the scores with the patch at each position occluded; MONAI takes one image a call
        occluded = torch.cat([torch.as_tensor(occ(x[i : i + 1])[0]) for i in range(len(x))])
    drop = F.relu(base[:, :, None, None] - occluded)
    t = targets.clamp(min=0)
    maps = drop.gather(1, t[:, :, None, None].expand(-1, -1, size, size)) * (targets >= 0)[:, :, None, None]
    return maps, (cells, cells)


@dataclass(frozen=True)
class CamMethod:
    """One explanation method: how its maps are computed and what `report` needs to run and label them
    (torch-cam's one class per method, as one table entry). Exactly one of `weights` and `perturb`."""

    name: str
    title: str  # what its maps are called where the scale is per image: "Grad-CAM"
    measures: str  # what one unit of the shared colour scale is: "score drop when occluded"
    # Gradient methods: (acts, grads), both (B, C', h, w) → channel weights (B, C'); the map is
    # relu(Σ w·A) at the chosen layer, taken in the scoring pass itself (one forward pass scores and
    # explains), and also from the int8 model's layer4 features.
    weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Forward-only methods: (model, x, targets, *, score) → ((B, K, S, S) maps at input resolution, grid);
    # no layer is involved and the maps take passes of their own after scoring.
    perturb: Callable[..., tuple[torch.Tensor, tuple[int, int]]] | None = None
    region: str = ""  # a forward-only method's grid, named where a gradient method names its layer
    every_class: bool = True  # cheap enough to map every class (the case page's buttons), not only the explained ones
    cost: str = "one forward pass, one backward pass per mapped class"

    def __post_init__(self) -> None:
        if (self.weights is None) == (self.perturb is None):
            raise ValueError(f"CAM method {self.name!r} needs exactly one of weights (gradient) and perturb (forward-only)")

    @property
    def gradient(self) -> bool:
        """Maps from a layer's activations and gradients (so: a --layer, the scoring pass, int8)."""
        return self.weights is not None

    def where(self, layer: str) -> str:
        """What the map's cells are: the layer's, or the method's own grid."""
        return layer if self.gradient else self.region


METHODS: dict[str, CamMethod] = {m.name: m for m in (
    CamMethod("gradcam", "Grad-CAM", "Grad-CAM", weights=_gradcam_weights),
    CamMethod("gradcam++", "Grad-CAM", "Grad-CAM", weights=_gradcam_pp_weights),
    CamMethod("occlusion", "occlusion", "score drop when occluded", perturb=occlusion_maps, region="occlusion patches", every_class=False,
              cost="cells² (14² = 196) forward passes per image"),
)}


def cam_method(name: str) -> CamMethod:
    """The table entry of `name`; ValueError naming the choices."""
    if name not in METHODS:
        raise ValueError(f"unknown CAM method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def gradient_methods() -> list[str]:
    return [n for n, m in METHODS.items() if m.gradient]


def input_maps(model: nn.Module | None, x: torch.Tensor, targets: torch.Tensor, *, method: str = "gradcam", layer: str = CAM_LAYER, score: str = "logit",
               cam: CamResult | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Any method's (B, K, S, S) maps at the input's resolution and the grid they were computed on.
    x: normalised (B, C, S, S); targets (B, K) with -1 padding. `cam`: a gradient method's maps already
    taken in the scoring pass (then no pass runs here, `model` may be None and only x's size is read)."""
    spec = cam_method(method)
    if spec.perturb is not None:
        return spec.perturb(model, x, targets, score=score)
    if cam is None:
        cam = compute_cam(model, x, targets, layer=layer, method=method, score=score)
    return upsample(cam.maps, x.shape[-1]), (int(cam.maps.shape[-2]), int(cam.maps.shape[-1]))
