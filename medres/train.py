"""`fit()`: one readable training loop (nanoGPT style) for a ResNet50 with a swapped head.

Linear probe for `train.freeze_epochs` (backbone frozen, its BatchNorm statistics too), then the
whole network with a discriminative LR (backbone at lr × backbone_lr_mult); AdamW; linear warm-up
then cosine; bf16 autocast + channels_last; gradient clipping; class-weighted loss or balanced
sampling; validation each epoch; atomic best/last checkpoints; exact resume; DDP under torchrun.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from medres.config import Config, dump_config
from medres.data.dataset import decode_all
from medres.data.manifest import Manifest, load_manifest
from medres.data.splits import assign_splits, audit_leakage, splits_frame
from medres.data.transforms import AugmentSpec, augment
from medres.errors import ConfigInvalid, ManifestInvalid, NonFiniteLoss, TrainingError
from medres.files import atomic_path, atomic_write, csv_text
from medres.inference import Predictor, autocast, normalise, resolve_device, resolve_precision, to_probs
from medres.io import PreprocessSpec
from medres.io.cache import file_digest
from medres.metrics import choose_thresholds, fit_temperature, macro_auroc
from medres.model import ModelMeta, build_model, load_backbone_weights, load_source_weights, norm_for_channels, save_checkpoint, unwrap_model

log = logging.getLogger(__name__)
BEST, LAST, STATE = "model.safetensors", "last.safetensors", "state.pt"


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _setup_distributed(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def preprocess_spec(cfg: Config) -> PreprocessSpec:
    return PreprocessSpec(image_size=cfg.data.image_size, resize=cfg.data.resize, voi=cfg.data.voi, max_megapixels=cfg.data.max_megapixels)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _loss_fn(cfg: Config, y_train: np.ndarray, device: torch.device):
    task = cfg.data.task
    counts = y_train.sum(0)
    if task == "multiclass":
        weight = None
        if cfg.train.balance == "weights":
            w = len(y_train) / (len(counts) * np.maximum(counts, 1))
            weight = torch.tensor(w, dtype=torch.float32, device=device)

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float(), target.argmax(1), weight=weight, label_smoothing=cfg.train.label_smoothing)

        return loss
    pos_weight = None
    if cfg.train.balance == "weights":
        pw = (len(y_train) - counts) / np.maximum(counts, 1)
        pos_weight = torch.tensor(np.clip(pw, 1.0, 50.0), dtype=torch.float32, device=device)

    def loss_ml(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target * (1 - cfg.train.label_smoothing) + 0.5 * cfg.train.label_smoothing
        return F.binary_cross_entropy_with_logits(logits.float(), t, pos_weight=pos_weight)

    return loss_ml


def _epoch_order(n_train: int, y_train: np.ndarray, cfg: Config, epoch: int, rank: int, world: int) -> np.ndarray:
    """Indices for one epoch, a pure function of (seed, epoch): resume replays it exactly."""
    rng = np.random.default_rng([cfg.train.seed, epoch])
    if cfg.train.balance == "sampler":
        cls = y_train.argmax(1) if cfg.data.task == "multiclass" else np.argmax(y_train + 1e-3 * rng.random(y_train.shape), 1)
        freq = np.bincount(cls, minlength=y_train.shape[1]).astype(float)
        w = 1.0 / freq[cls]
        order = rng.choice(n_train, size=n_train, replace=True, p=w / w.sum())
    else:
        order = rng.permutation(n_train)
    if world > 1:  # DistributedSampler's rule: pad to a multiple of world, then stride
        pad = (-len(order)) % world
        order = np.concatenate([order, order[:pad]])[rank::world]
    return order


def _set_backbone_trainable(model: torch.nn.Module, trainable: bool) -> None:
    for name, p in unwrap_model(model).named_parameters():
        if not name.startswith("fc."):
            p.requires_grad_(trainable)


def _backbone_bn_eval(model: torch.nn.Module) -> None:
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def load_training_manifest(cfg: Config) -> Manifest:
    if cfg.data.manifest is None:
        raise ConfigInvalid("data.manifest is required for training")
    if not cfg.data.classes:
        raise ConfigInvalid("data.classes must list the class names")
    return load_manifest(cfg.data.manifest, classes=cfg.data.classes, task=cfg.data.task, root=cfg.data.root)


def prepare_data(cfg: Config, out: Path | None, *, progress=None, manifest: Manifest | None = None) -> tuple[Manifest, np.ndarray, "object"]:
    """Manifest → splits (with leakage audit) → decoded pixels. Rank 0 writes splits.csv."""
    manifest = manifest if manifest is not None else load_training_manifest(cfg)
    splits = assign_splits(manifest, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction, seed=cfg.train.seed, group_by=cfg.data.group_by)
    items = [(str(manifest.absolute(i)), manifest.frame["path"].iloc[i]) for i in range(len(manifest))]
    decoded = decode_all(items, preprocess_spec(cfg), cache_dir=cfg.data.cache_dir, num_workers=cfg.train.num_workers, progress=progress)
    audit_leakage(manifest, splits, group_by=cfg.data.group_by, digests=[d or f"missing-{i}" for i, d in enumerate(decoded.digests)], allow=cfg.data.allow_leakage)
    if out is not None and _rank()[0] == 0:
        atomic_write(out / "splits.csv", splits_frame(manifest, splits).to_csv(index=False))
    return manifest, splits, decoded


def fit(cfg: Config, out: str | Path, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Train; returns a summary dict. Writes the run folder described in the README.
    `train.deterministic` switches torch to deterministic kernels for this call only."""
    was_deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    root = logging.getLogger("medres")
    handlers = list(root.handlers)
    try:
        return _fit(cfg, out, resume=resume, show_progress=show_progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
        for h in [h for h in root.handlers if h not in handlers]:  # this run's train.log: closed, so a
            root.removeHandler(h)  # later run in the same process does not write into it
            h.close()


def _fit(cfg: Config, out: str | Path, *, resume: bool, show_progress: bool) -> dict:
    out = Path(out)
    device = resolve_device(cfg.train.device)
    distributed = _setup_distributed(device)
    rank, world = _rank()
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # Mistakes a user fixes by editing the config or the manifest fail here, before a run folder
    # is made for them.
    manifest = load_training_manifest(cfg)
    source = load_source_weights(cfg.model.weights)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _attach_log(out / "train.log")
        write_run_config(cfg, out)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    from medres.progress import Progress  # printing belongs to the caller's terminal; quiet in tests

    bar = Progress(enabled=show_progress and rank == 0)
    with bar.task("decode", total=None) as tick:
        manifest, splits, decoded = prepare_data(cfg, out, progress=tick, manifest=manifest)
    if decoded.errors and rank == 0:  # each was logged as it happened; the list stays with the run
        atomic_write(out / "skipped.csv", csv_text(["row", "code", "message"], [list(e) for e in decoded.errors]))
    train_mask = (splits == "train") & decoded.ok
    val_mask = (splits == "val") & decoded.ok
    if train_mask.sum() == 0:
        raise ManifestInvalid(f"{manifest.source}: no usable training images")
    y = manifest.targets
    x_all = torch.from_numpy(decoded.pixels)
    x_train, y_train = x_all[train_mask], y[train_mask]
    x_val, y_val = x_all[val_mask], y[val_mask]
    if (y_train.sum(0) == 0).any():
        absent = [c for c, n in zip(cfg.data.classes, y_train.sum(0)) if n == 0]
        raise ManifestInvalid(f"{manifest.source}: class {absent[0]!r} has no training images")

    # Model, weights and normalisation that follows them.
    model = build_model(len(cfg.data.classes), in_channels=cfg.model.in_channels, dropout=cfg.model.dropout)
    if source is not None:
        load_backbone_weights(model, source)
        mean, std = norm_for_channels(source.mean, source.std, cfg.model.in_channels)
    else:
        from medres.model import IMAGENET_MEAN, IMAGENET_STD

        mean, std = norm_for_channels(IMAGENET_MEAN, IMAGENET_STD, cfg.model.in_channels)
    model = model.to(device).to(memory_format=torch.channels_last) if cfg.train.channels_last else model.to(device)
    dtype = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    train_model = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    base = unwrap_model(train_model)
    freeze_epochs, backbone_mult = cfg.train.freeze_epochs, cfg.train.backbone_lr_mult
    if source is None and (freeze_epochs or backbone_mult < 1):
        # Random weights: a linear probe on random features and a damped backbone LR only slow training down.
        log.warning("model.weights=none: training the whole network from scratch (freeze_epochs 0, backbone_lr_mult 1)")
        freeze_epochs, backbone_mult = 0, 1.0
    optimizer = torch.optim.AdamW(
        [
            {"params": base.backbone_parameters(), "lr": cfg.train.lr * backbone_mult, "base_lr": cfg.train.lr * backbone_mult},
            {"params": base.head_parameters(), "lr": cfg.train.lr, "base_lr": cfg.train.lr},
        ],
        weight_decay=cfg.train.weight_decay,
    )
    steps_per_epoch = math.ceil(math.ceil(len(x_train) / world) / cfg.train.batch_size)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup = int(cfg.train.warmup_epochs * steps_per_epoch)
    loss_fn = _loss_fn(cfg, y_train, device)
    aug = AugmentSpec(hflip=cfg.train.hflip)
    meta = ModelMeta(
        classes=list(cfg.data.classes), task=cfg.data.task, preprocess=asdict(preprocess_spec(cfg)), mean=mean, std=std,
        in_channels=cfg.model.in_channels, dropout=cfg.model.dropout, config_sha256=cfg.digest(),
        manifest_sha256=file_digest(Path(cfg.data.manifest)), weights_source=source.origin if source else "none",
    )

    start_epoch, best, step, stale = 0, -1.0, 0, 0
    if resume:
        state_path = out / STATE
        if not state_path.is_file():
            raise TrainingError(f"--resume: {state_path} not found")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        from medres.model import SourceWeights, read_weight_file

        tensors, _ = read_weight_file(out / LAST)
        load_backbone_weights(base, SourceWeights(tensors, "medres", tuple(mean), tuple(std), LAST), include_head=True)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, step, stale = int(state["epoch"]) + 1, float(state["best"]), int(state["step"]), int(state["stale"])
        log.info("resumed at epoch %d", start_epoch)

    history = []
    with bar.task("train", total=(cfg.train.epochs - start_epoch) * steps_per_epoch) as tick:
        for epoch in range(start_epoch, cfg.train.epochs):
            torch.manual_seed(cfg.train.seed * 1000 + epoch)  # dropout etc.: a function of (seed, epoch)
            gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch)
            frozen = epoch < freeze_epochs
            _set_backbone_trainable(train_model, not frozen)
            train_model.train()
            if frozen:
                _backbone_bn_eval(train_model)
            order = _epoch_order(len(x_train), y_train, cfg, epoch, rank, world)
            t0, seen, losses = time.perf_counter(), 0, []
            for s in range(steps_per_epoch):
                idx = torch.from_numpy(order[s * cfg.train.batch_size : (s + 1) * cfg.train.batch_size])
                if len(idx) == 0:
                    break
                xb, yb = x_train[idx], torch.from_numpy(y_train[idx.numpy()])
                if cfg.train.augment:
                    xb = augment(xb, gen, aug)
                xb = normalise(xb.to(device), mean, std, cfg.model.in_channels)
                if cfg.train.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                factor = _lr_factor(step, total_steps, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                with autocast(device, dtype):
                    logits = train_model(xb)
                loss = loss_fn(logits, yb.to(device))
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1} step {s + 1}; the last good checkpoint in {out} is kept")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.train.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for p in train_model.parameters() if p.requires_grad], cfg.train.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                seen += len(idx)
                losses.append(float(loss.detach()))
                tick(loss=losses[-1], ips=seen * world / (time.perf_counter() - t0))
            train_time = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "frozen": frozen, "train_loss": float(np.mean(losses)) if losses else float("nan"), "images_per_s": seen * world / max(train_time, 1e-9)}
            if rank == 0:
                if len(x_val):
                    logits_val = Predictor(base.eval(), meta, device, dtype, cfg.train.channels_last).logits_batched(x_val, cfg.train.batch_size * 2)
                    probs = to_probs(logits_val, cfg.data.task)
                    record["val_loss"] = float(loss_fn(torch.from_numpy(logits_val).to(device), torch.from_numpy(y_val).to(device)))
                    record["val_macro_auroc"] = macro_auroc(y_val, probs)
                score = record.get("val_macro_auroc", float("nan"))
                score = -record.get("val_loss", record["train_loss"]) if math.isnan(score) else score
                improved = score > best
                meta.epoch, meta.val_auroc = epoch + 1, record.get("val_macro_auroc")
                save_checkpoint(out / LAST, base, meta)
                if improved:
                    best, stale = score, 0
                    save_checkpoint(out / BEST, base, meta)
                else:
                    stale += 1
                with atomic_path(out / STATE) as tmp:
                    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "best": best, "step": step, "stale": stale}, tmp)
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                log.info("epoch %s", json.dumps(record))
                history.append(record)
            if distributed:
                flags = torch.tensor([stale], dtype=torch.long)
                dist.broadcast(flags, 0)
                stale = int(flags.item())
            if cfg.train.early_stopping and stale >= cfg.train.early_stopping:
                log.info("early stopping after epoch %d", epoch + 1)
                break

    summary = {"run": str(out), "epochs": history, "best_score": best}
    if rank == 0 and cfg.train.calibrate and len(x_val):
        summary["calibration"] = calibrate_run(out, x_val, y_val, cfg, device, dtype)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def calibrate_run(out: Path, x_val: torch.Tensor, y_val: np.ndarray, cfg: Config, device, dtype) -> dict:
    """Temperature scaling and operating points, fitted on validation only, stored in the checkpoint."""
    from medres.model import load_checkpoint

    model, meta = load_checkpoint(out / BEST, device)
    logits = Predictor(model.to(memory_format=torch.channels_last), meta, device, dtype).logits_batched(x_val, cfg.train.batch_size * 2)
    meta.temperature = fit_temperature(logits, y_val, meta.task)
    probs = to_probs(logits, meta.task, meta.temperature)
    meta.thresholds, meta.threshold_method = choose_thresholds(y_val, probs, target_sensitivity=cfg.eval.target_sensitivity)
    save_checkpoint(out / BEST, model, meta)
    return {"temperature": meta.temperature, "thresholds": meta.thresholds, "method": meta.threshold_method}


def _attach_log(path: Path) -> None:
    root = logging.getLogger("medres")
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def write_run_config(cfg: Config, out: Path) -> None:
    atomic_write(out / "config.yaml", dump_config(cfg))
