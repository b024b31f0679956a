"""`medres pretrain`: self-supervised pretraining of the same ResNet50 on films without labels.

VICReg (Bardes, Ponce & LeCun, ICLR 2022): two views of each film go through the backbone and a small
projector; the loss pulls the two embeddings together (invariance), keeps every embedding dimension's
standard deviation above 1 across the batch (variance) and decorrelates the dimensions (covariance).
Chosen for CPUs and small batches: no negatives (SimCLR and MoCo need large batches or a queue), no
momentum encoder, no collapse-prone asymmetric tricks (SimSiam); the variance term is an explicit
guard against collapse, and the collapse check below measures the outcome anyway.

Views are X-ray-appropriate (MoCo-CXR, MedAug): zoom crop, small rotation and translation,
brightness/contrast/gamma and noise — no colour jitter, no flips. With `pretrain.same_patient` and a
`patient_id` column, the second view of a film is, half of the time, another film of the same patient
(MedAug's positive pairs). Images come from the on-disk store (decoded once, reused by `train`);
bf16 autocast and channels_last as in `train`; every epoch is checkpointed and `--resume` continues.

Writes RUN/backbone.safetensors in torchvision's key layout (no head), so `model.weights:
RUN/backbone.safetensors` loads it strictly in `train` and `medres weights import` records it; plus
metrics.jsonl, curves.png, train.log and pretrain.json (the run summary with the collapse check).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medres.config import Config, dump_config
from medres.data.dataset import open_store, stream
from medres.data.selection import unlabelled_manifest
from medres.data.transforms import STRONG, augment
from medres.errors import TrainingError
from medres.files import atomic_path, atomic_write
from medres.inference import autocast, normalise, resolve_device, resolve_precision
from medres.model import CLASSIFIER, IMAGENET_MEAN, IMAGENET_STD, build_model, norm_for_channels

log = logging.getLogger(__name__)
BACKBONE, STATE = "backbone.safetensors", "pretrain_state.pt"
VIEWS = STRONG
COLLAPSE_SPREAD = 1e-3  # films' feature spread relative to the features' size below this: one point for every film


class Projector(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2048, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def vicreg_loss(a: torch.Tensor, b: torch.Tensor, *, invariance: float = 25.0, variance: float = 25.0, covariance: float = 1.0) -> torch.Tensor:
    """VICReg's loss on two (B, D) embeddings (the paper's default weights)."""
    a, b = a.float(), b.float()
    sim = F.mse_loss(a, b)

    def var(z: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean()

    def cov(z: torch.Tensor) -> torch.Tensor:
        z = z - z.mean(0)
        c = (z.T @ z) / max(len(z) - 1, 1)
        off = c - torch.diag(torch.diag(c))
        return off.pow(2).sum() / z.shape[1]

    return invariance * sim + variance * (var(a) + var(b)) + covariance * (cov(a) + cov(b))


def _partner(patients: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row, another film of the same patient half of the time (itself otherwise or when alone)."""
    by_patient: dict[str, list[int]] = {}
    for r in rows:
        by_patient.setdefault(patients[r], []).append(int(r))
    out = rows.copy()
    for i, r in enumerate(rows):
        mates = [m for m in by_patient[patients[r]] if m != r]
        if mates and rng.random() < 0.5:
            out[i] = mates[int(rng.integers(len(mates)))]
    return out


def pretrain(cfg: Config, out: str | Path, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Run VICReg pretraining; returns the summary written to RUN/pretrain.json."""
    from medres.progress import Progress
    from medres.train import _attach_log, preprocess_spec

    out = Path(out)
    p = cfg.pretrain
    manifest = unlabelled_manifest(cfg.data.manifests, root=cfg.data.root, filters=cfg.data.filter)
    out.mkdir(parents=True, exist_ok=True)
    _attach_log(out / "train.log")
    atomic_write(out / "config.yaml", dump_config(cfg))
    device = resolve_device(cfg.train.device)
    dtype = resolve_precision(cfg.train.precision, device)
    store = open_store(manifest, preprocess_spec(cfg), store_dir=cfg.data.store_dir, dtype=cfg.data.store_dtype, cache_dir=cfg.data.cache_dir)
    stats = store.ensure(workers=cfg.train.num_workers)
    rows = np.nonzero(store.ok_mask())[0]
    log.info("pretrain: %d films (%d decoded, %d reused, %d unreadable)", len(rows), stats.decoded, stats.reused, len(manifest) - len(rows))
    if len(rows) < 2:
        raise TrainingError(f"{manifest.source}: fewer than 2 readable films to pretrain on")
    torch.manual_seed(cfg.train.seed)
    model = build_model(1, in_channels=cfg.model.in_channels).to(device).to(memory_format=torch.channels_last)
    head = Projector(p.projector_dim).to(device)
    params = list(model.backbone_parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    mean, std = norm_for_channels(IMAGENET_MEAN, IMAGENET_STD, cfg.model.in_channels)
    steps = math.ceil(len(rows) / p.batch_size)
    steps = min(steps, p.max_steps_per_epoch) if p.max_steps_per_epoch else steps
    start = _restore(out, model, head, opt) if resume else 0
    patients = manifest.frame["patient_id"].to_numpy() if p.same_patient and "patient_id" in manifest.frame.columns else None
    bar = Progress(enabled=show_progress)
    with bar.task("pretrain", total=(p.epochs - start) * steps) as tick:
        for epoch in range(start, p.epochs):
            loss = _epoch(model, head, opt, store, rows, patients, cfg, epoch, steps, mean, std, device, dtype, tick)
            spread = embedding_spread(model, store, rows, mean, std, cfg, device, dtype)
            record = {"epoch": epoch + 1, "train_loss": loss, "embedding_spread": spread}
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            with atomic_path(out / STATE) as tmp:
                torch.save({"model": model.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, tmp)
            from medres.plots import write_curves

            write_curves(out)
            log.info("pretrain epoch %s", json.dumps(record))
    if start >= p.epochs:  # resumed after the last epoch: nothing was measured in this call
        spread = embedding_spread(model, store, rows, mean, std, cfg, device, dtype)
    store.close()
    summary = {"method": "vicreg", "films": int(len(rows)), "epochs": p.epochs, "embedding_spread": spread, "collapsed": spread < COLLAPSE_SPREAD,
               "backbone": str(out / BACKBONE)}
    if summary["collapsed"]:
        summary["backbone"] = None
        atomic_write(out / "pretrain.json", json.dumps(summary, indent=2))
        raise TrainingError(f"pretraining collapsed: the embeddings of {len(rows)} films are constant (feature spread {spread:.2e} < {COLLAPSE_SPREAD:g}); "
                            f"{BACKBONE} not written — check pretrain.variance_weight/covariance_weight and the learning rate")
    save_backbone(model, out / BACKBONE, {"method": "vicreg", "films": int(len(rows)), "epochs": p.epochs, "mean": list(mean), "std": list(std)})
    atomic_write(out / "pretrain.json", json.dumps(summary, indent=2))
    return summary


def _epoch(model, head, opt, store, rows, patients, cfg: Config, epoch: int, steps: int, mean, std, device, dtype, tick) -> float:
    """One epoch of VICReg steps; the order and the views are functions of (seed, epoch) only."""
    p = cfg.pretrain
    rng = np.random.default_rng([cfg.train.seed, epoch])
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch)
    order = rng.permutation(rows)
    model.train()
    head.train()
    losses = []
    for s in range(steps):
        batch = np.sort(order[s * p.batch_size : (s + 1) * p.batch_size])
        if len(batch) < 2:
            continue
        partner = _partner(patients, batch, rng) if patients is not None else batch
        views = []
        for rows_k in (batch, partner):
            x = augment(torch.from_numpy(store.read(rows_k)), gen, VIEWS)
            x = (x + p.noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)
            views.append(normalise(x.to(device), mean, std, cfg.model.in_channels).contiguous(memory_format=torch.channels_last))
        with autocast(device, dtype):
            za = head(model.pooled(model.forward_features(views[0])).float())
            zb = head(model.pooled(model.forward_features(views[1])).float())
        loss = vicreg_loss(za, zb, variance=p.variance_weight, covariance=p.covariance_weight)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite pretraining loss at epoch {epoch + 1} step {s + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        tick(loss=losses[-1])
    return float(np.mean(losses)) if losses else float("nan")


@torch.inference_mode()
def embedding_spread(model, store, rows, mean, std, cfg: Config, device, dtype, *, n: int = 256) -> float:
    """How far apart the films' pooled features are: the mean per-dimension standard deviation across up
    to `n` films over the mean absolute feature value. 0 when every film maps to one point (collapse);
    scale-free, so a network whose features are merely small is not called collapsed."""
    model.eval()
    sample = rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]
    feats = []
    for x in stream(store, sample, 64):
        x = normalise(x.to(device), mean, std, cfg.model.in_channels).contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            feats.append(model.pooled(model.forward_features(x)).float().cpu())
    f = torch.cat(feats).double()
    return float(f.std(0).mean() / (f.abs().mean() + 1e-12))


def save_backbone(model, path: Path, info: dict) -> None:
    """torchvision key layout, no classifier: what `model.weights` and `medres weights import` read."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(CLASSIFIER + ".")}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "medres_pretrain": json.dumps(info)})


def _restore(out: Path, model, head, opt) -> int:
    path = out / STATE
    if not path.is_file():
        raise TrainingError(f"--resume: {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    head.load_state_dict(state["head"])
    opt.load_state_dict(state["optimizer"])
    log.info("pretrain resumed after epoch %d", int(state["epoch"]) + 1)
    return int(state["epoch"]) + 1
