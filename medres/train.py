"""`fit()`: one readable training loop (nanoGPT style) for a ResNet50 with a swapped head.

Linear probe for `train.freeze_epochs` (backbone frozen, its BatchNorm statistics too), then the
whole network with a discriminative LR (backbone at lr × backbone_lr_mult); AdamW or SGD; a per-step
schedule (warm-up then cosine, one-cycle or step); an optional EMA of the weights; bf16 autocast + channels_last; gradient clipping; class-weighted loss or balanced
sampling; validation each epoch; atomic best/last checkpoints; exact resume; DDP under torchrun.
Images come from the on-disk store (`data/store.py`), so memory does not grow with the data set.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from medres.config import Config, dump_config
from medres.data.dataset import epoch_loader, open_store, stream
from medres.data.manifest import Manifest
from medres.data.selection import select_rows
from medres.data.splits import assign_splits, audit_leakage, splits_frame
from medres.data.store import ImageStore
from medres.data.transforms import STRONG, AugmentSpec, augment
from medres.errors import ManifestInvalid, NonFiniteLoss, TrainingError
from medres.files import atomic_path, atomic_write, csv_text
from medres.inference import Predictor, autocast, normalise, resolve_device, resolve_precision, to_probs
from medres.io import PreprocessSpec
from medres.io.cache import file_digest
from medres.metrics import macro_auroc
from medres.model import (
    IMAGENET_MEAN, IMAGENET_STD, ModelMeta, SourceWeights, build_model, load_backbone_weights, load_source_weights, norm_for_channels,
    read_weight_file, save_checkpoint, unwrap_model,
)

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
    """The cosine schedule: linear warm-up, then cosine from 1 to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _onecycle_factor(step: int, total: int, warmup: int) -> float:
    """One-cycle (Smith 2018; torch's OneCycleLR with cosine annealing, LR only): cosine from 1/25 up to 1
    over the warm-up (30% of the steps without one), then cosine down to 1/25e4."""
    up = warmup if warmup > 0 else max(1, int(0.3 * total))
    start, end = 1 / 25, 1 / 25e4
    if step < up:
        return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / up))
    progress = min(1.0, (step - up) / max(1, total - up))
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _step_factor(step: int, warmup: int, every: int, gamma: float) -> float:
    """Step decay: linear warm-up, then multiplied by gamma every `every` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return gamma ** ((step - warmup) // max(1, every))


def lr_factor(run: "_Run") -> float:
    """This step's LR as a fraction of each group's base LR: a pure function of the step counter, so
    --resume continues the schedule exactly from the saved step."""
    cfg = run.cfg.train
    schedules = {
        "cosine": lambda: _lr_factor(run.step, run.total_steps, run.warmup),
        "onecycle": lambda: _onecycle_factor(run.step, run.total_steps, run.warmup),
        "step": lambda: _step_factor(run.step, run.warmup, round(cfg.step_epochs * run.steps_per_epoch), cfg.step_gamma),
    }
    return schedules[cfg.schedule]()


def _optimizer(cfg: Config, model: torch.nn.Module, backbone_mult: float) -> torch.optim.Optimizer:
    """train.optimizer over two groups (backbone at lr × backbone_mult, head at lr); `base_lr` is what
    the schedule scales."""
    t = cfg.train
    groups = [
        {"params": model.backbone_parameters(), "lr": t.lr * backbone_mult, "base_lr": t.lr * backbone_mult},
        {"params": model.head_parameters(), "lr": t.lr, "base_lr": t.lr},
    ]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, for every floating parameter and buffer (BatchNorm
    statistics included, as timm's ModelEmaV2); integer buffers (BatchNorm's step count) are copied."""
    live = model.state_dict()
    for name, e in ema.state_dict().items():
        if e.is_floating_point():
            e.mul_(decay).add_(live[name].detach(), alpha=1 - decay)
        else:
            e.copy_(live[name])


def _loss_fn(cfg: Config, y_train: np.ndarray, device: torch.device):
    """Cross-entropy (multiclass) or binary cross-entropy per label (multilabel) averaged over the
    labelled entries only: a NaN target (missing, or uncertain under `ignore`) adds nothing to the loss
    or its gradient."""
    task = cfg.data.task
    counts = np.nansum(y_train, 0)
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
        negatives = (~np.isnan(y_train)).sum(0) - counts
        pos_weight = torch.tensor(np.clip(negatives / np.maximum(counts, 1), 1.0, 50.0), dtype=torch.float32, device=device)

    def loss_ml(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labelled = ~torch.isnan(target)
        t = torch.nan_to_num(target) * (1 - cfg.train.label_smoothing) + 0.5 * cfg.train.label_smoothing
        each = F.binary_cross_entropy_with_logits(logits.float(), t, pos_weight=pos_weight, reduction="none")
        return (each * labelled).sum() / labelled.sum().clamp(min=1)

    return loss_ml


def epoch_order(n_train: int, y_train: np.ndarray, cfg: Config, epoch: int, rank: int, world: int) -> np.ndarray:
    """Indices for one epoch, a pure function of (seed, epoch): resume replays it exactly."""
    rng = np.random.default_rng([cfg.train.seed, epoch])
    if cfg.train.balance == "sampler":
        known = np.nan_to_num(y_train)  # masked labels weigh nothing in the sampler's class choice
        cls = known.argmax(1) if cfg.data.task == "multiclass" else np.argmax(known + 1e-3 * rng.random(known.shape), 1)
        freq = np.bincount(cls, minlength=y_train.shape[1]).astype(float)
        w = 1.0 / freq[cls]
        order = rng.choice(n_train, size=n_train, replace=True, p=w / w.sum())
    else:
        order = rng.permutation(n_train)
    if world > 1:  # DistributedSampler's rule: pad to a multiple of world, then stride
        pad = (-len(order)) % world
        order = np.concatenate([order, order[:pad]])[rank::world]
    return order


def set_stage(run: "_Run", *, trainable: bool) -> None:
    """Linear probe (backbone frozen) or full fine-tune. Under DDP the wrapper is rebuilt when the stage
    changes: DDP registers the parameters that require grad when it is constructed, and toggling
    requires_grad under an existing wrapper leaves its reducer waiting for gradients that never come."""
    if run.trainable == trainable:
        return
    base = run.base
    for p in base.backbone_parameters():
        p.requires_grad_(trainable)
    if run.distributed:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        run.model = torch.nn.parallel.DistributedDataParallel(base, device_ids=device_ids)
    run.trainable = trainable


def _check_ranks_agree(run: "_Run") -> None:
    """DDP: every rank must end with the same weights (and BatchNorm statistics); a per-tensor checksum
    is all-gathered and compared."""
    sums = torch.stack([t.detach().double().sum() for t in run.base.state_dict().values() if t.is_floating_point()]).cpu()
    gathered = [torch.zeros_like(sums) for _ in range(run.world)]
    dist.all_gather(gathered, sums)
    if any(not torch.equal(g, gathered[0]) for g in gathered[1:]):
        raise TrainingError("DDP ranks ended with different weights; the run is not valid")
    log.info("all %d ranks hold identical weights", run.world)


def backbone_bn_eval(model: torch.nn.Module) -> None:
    for name, m in unwrap_model(model).named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def load_training_manifest(cfg: Config) -> Manifest:
    """The rows the run trains on (`data/selection.py`: manifests merged, views and filters applied)."""
    return select_rows(cfg.data).manifest


def training_store(cfg: Config, manifest: Manifest) -> ImageStore:
    return open_store(manifest, preprocess_spec(cfg), store_dir=cfg.data.store_dir, dtype=cfg.data.store_dtype, cache_dir=cfg.data.cache_dir)


def prepare_data(cfg: Config, out: Path | None, *, progress=None, manifest: Manifest | None = None) -> tuple[Manifest, np.ndarray, ImageStore]:
    """Manifest → splits → every row in the on-disk store (built or resumed once, reused after) →
    leakage audit on the stored content digests. Rank 0 writes splits.csv and skipped.csv."""
    manifest = manifest if manifest is not None else load_training_manifest(cfg)
    splits = assign_splits(manifest, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction, seed=cfg.train.seed,
                           group_by=cfg.data.group_by, split_column=cfg.data.split_column)
    store = training_store(cfg, manifest)
    stats = store.ensure(workers=cfg.train.num_workers, progress=progress)
    log.info("image store %s: %d rows decoded, %d reused (%.1fs)", store.folder, stats.decoded, stats.reused, stats.seconds)
    audit_leakage(manifest, splits, group_by=cfg.data.group_by, digests=[d or f"missing-{i}" for i, d in enumerate(store.digests())], allow=cfg.data.allow_leakage)
    if out is not None and _rank()[0] == 0:
        atomic_write(out / "splits.csv", splits_frame(manifest, splits).to_csv(index=False))
        errors = store.errors()
        if errors:  # each was logged as it was decoded; the list stays with the run
            atomic_write(out / "skipped.csv", csv_text(["row", "code", "message"], [list(e) for e in errors]))
    return manifest, splits, store


@dataclass
class _Run:
    """What the epochs share: data rows, model, optimiser and schedule."""

    cfg: Config
    out: Path
    device: torch.device
    dtype: torch.dtype | None
    store: ImageStore
    targets: np.ndarray  # (N, C) by store row
    train_rows: np.ndarray
    val_rows: np.ndarray
    model: torch.nn.Module  # what the steps call (DDP-wrapped under torchrun)
    meta: ModelMeta
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: object
    freeze_epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    rank: int = 0
    world: int = 1
    distributed: bool = False
    trainable: bool | None = None  # the backbone's current stage (None: not set yet)
    unlabeled: ImageStore | None = None  # train.unlabeled: films without labels (semi-supervised)
    unlabeled_rows: np.ndarray | None = None
    pseudo_rates: list = None  # per step this epoch: share of unlabelled entries above the threshold
    ema: torch.nn.Module | None = None  # train.ema: the averaged weights (a copy of the model)
    best_weights: str = "live"  # which weights the best checkpoint holds: live or ema
    step: int = 0
    best: float = -math.inf
    stale: int = 0

    @property
    def base(self) -> torch.nn.Module:
        return unwrap_model(self.model)


def fit(cfg: Config, out: str | Path, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Train; returns a summary dict. Writes the run folder described in the README.
    `train.deterministic` switches torch to deterministic kernels for this call only."""
    was_deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    root = logging.getLogger("medres")
    handlers = list(root.handlers)
    try:
        return _fit(cfg, Path(out), resume=resume, show_progress=show_progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
        for h in [h for h in root.handlers if h not in handlers]:  # this run's train.log: closed, so a
            root.removeHandler(h)  # later run in the same process does not write into it
            h.close()


def _fit(cfg: Config, out: Path, *, resume: bool, show_progress: bool) -> dict:
    device = resolve_device(cfg.train.device)
    distributed = _setup_distributed(device)
    rank, world = _rank()
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # Mistakes a user fixes by editing the config or the manifest fail here, before a run folder
    # is made for them.
    selection = select_rows(cfg.data)
    manifest = selection.manifest
    source = load_source_weights(cfg.model.weights)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _attach_log(out / "train.log")
        write_run_config(cfg, out)
        write_selection(out, selection)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)

    tracker = None
    if rank == 0 and cfg.train.log_to:
        from medres.tracking import Tracker

        tracker = Tracker(cfg, out)
    try:
        summary = _epochs_and_calibration(cfg, out, manifest, source, device, rank, world, distributed, resume, show_progress, tracker)
    except BaseException:
        if tracker is not None:
            tracker.abort()
        raise
    if tracker is not None:
        tracker.finish([out / BEST, out / "curves.png", out / "model_card.md", out / "config.yaml"], {"best_score": summary["best_score"]})
    return summary


def _epochs_and_calibration(cfg: Config, out: Path, manifest: Manifest, source, device, rank: int, world: int, distributed: bool,
                            resume: bool, show_progress: bool, tracker) -> dict:
    from medres.progress import Progress

    bar = Progress(enabled=show_progress and rank == 0)
    with bar.task("decode", total=None) as tick:
        manifest, splits, store = prepare_data(cfg, out, progress=tick, manifest=manifest)
    run = setup_run(cfg, out, device, manifest, splits, store, source, rank, world, distributed)
    if cfg.train.unlabeled is not None:
        run.unlabeled, run.unlabeled_rows = _unlabeled_store(cfg, manifest)
        if rank == 0:  # what the model learnt from, beside the labelled rows (the model card reads it)
            info = json.loads((out / "selection.json").read_text(encoding="utf-8"))
            info["unlabeled"] = {"source": str(cfg.train.unlabeled), "films": int(len(run.unlabeled_rows)), "ratio": cfg.train.unlabeled_ratio,
                                 "pseudo_threshold": cfg.train.pseudo_threshold}
            atomic_write(out / "selection.json", json.dumps(info, indent=2))
    start_epoch = _restore(run) if resume else 0
    if rank == 0:
        write_augment_preview(run)

    history = []
    with bar.task("train", total=(cfg.train.epochs - start_epoch) * run.steps_per_epoch) as tick:
        for epoch in range(start_epoch, cfg.train.epochs):
            record = _train_epoch(run, epoch, tick)
            if rank == 0:
                history.append(_validate_and_checkpoint(run, epoch, record))
                if tracker is not None:
                    tracker.epoch(history[-1])
            if distributed:
                # DDP syncs BatchNorm statistics from rank 0 only at the next forward: after an epoch's
                # last step each rank holds its own. Rank 0's (the checkpoint's) go to every rank now.
                for buf in run.base.buffers():
                    dist.broadcast(buf, 0)
                flags = torch.tensor([run.stale], dtype=torch.long)
                dist.broadcast(flags, 0)
                run.stale = int(flags.item())
            if cfg.train.early_stopping and run.stale >= cfg.train.early_stopping:
                log.info("early stopping after epoch %d", epoch + 1)
                break

    summary = {"run": str(out), "epochs": history, "best_score": run.best, "best_weights": run.best_weights}
    if rank == 0 and run.ema is not None:
        log.info("best checkpoint: %s weights (score %.4f)", run.best_weights, run.best)
    if rank == 0 and cfg.train.calibrate and len(run.val_rows):
        summary["calibration"] = calibrate_run(out, run)
    if rank == 0:
        from medres.card import write_card

        write_card(out, out / "model_card.md")  # without an evaluation; medres card --eval adds one
    store.close()
    if run.unlabeled is not None:
        run.unlabeled.close()
    if distributed:
        _check_ranks_agree(run)
        dist.barrier()
        dist.destroy_process_group()
    return summary


def setup_run(cfg: Config, out: Path, device, manifest: Manifest, splits: np.ndarray, store: ImageStore, source, rank: int, world: int, distributed: bool) -> _Run:
    """Rows, model (+ donor weights and their normalisation), optimiser and schedule."""
    ok = store.ok_mask()
    train_rows = np.nonzero((splits == "train") & ok)[0]
    val_rows = np.nonzero((splits == "val") & ok)[0]
    if len(train_rows) == 0:
        raise ManifestInvalid(f"{manifest.source}: no usable training images")
    y = manifest.targets
    positives = np.nansum(y[train_rows], 0)
    if (positives == 0).any():
        absent = [c for c, n in zip(cfg.data.classes, positives) if n == 0]
        raise ManifestInvalid(f"{manifest.source}: class {absent[0]!r} has no positive training images ({len(train_rows)} training rows)")

    model = build_model(len(cfg.data.classes), in_channels=cfg.model.in_channels, dropout=cfg.model.dropout)
    if source is not None:
        load_backbone_weights(model, source)
        mean, std = norm_for_channels(source.mean, source.std, cfg.model.in_channels)
    else:
        mean, std = norm_for_channels(IMAGENET_MEAN, IMAGENET_STD, cfg.model.in_channels)
    model = model.to(device).to(memory_format=torch.channels_last) if cfg.train.channels_last else model.to(device)
    dtype = resolve_precision(cfg.train.precision, device)
    train_model = model  # wrapped in DDP per stage by set_stage under torchrun

    freeze_epochs, backbone_mult = cfg.train.freeze_epochs, cfg.train.backbone_lr_mult
    if source is None and (freeze_epochs or backbone_mult < 1):
        # Random weights: a linear probe on random features and a damped backbone LR only slow training down.
        log.warning("model.weights=none: training the whole network from scratch (freeze_epochs 0, backbone_lr_mult 1)")
        freeze_epochs, backbone_mult = 0, 1.0
    optimizer = _optimizer(cfg, model, backbone_mult)
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / world) / cfg.train.batch_size)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    meta = ModelMeta(
        classes=list(cfg.data.classes), task=cfg.data.task, preprocess=asdict(preprocess_spec(cfg)), mean=mean, std=std,
        in_channels=cfg.model.in_channels, dropout=cfg.model.dropout, config_sha256=cfg.digest(),
        manifest_sha256=manifests_digest(cfg.data.manifests), weights_source=source.origin if source else "none", weights_sha256=source.sha256 if source else None,
        store_dtype=cfg.data.store_dtype,
    )
    return _Run(
        cfg=cfg, out=out, device=device, dtype=dtype, store=store, targets=y, train_rows=train_rows, val_rows=val_rows,
        model=train_model, meta=meta, optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16)),
        loss_fn=_loss_fn(cfg, y[train_rows], device), freeze_epochs=freeze_epochs, steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * cfg.train.epochs, warmup=int(cfg.train.warmup_epochs * steps_per_epoch), rank=rank, world=world,
        distributed=distributed, ema=_ema_copy(model) if cfg.train.ema is not None else None,
    )


def _ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def _unlabeled_store(cfg: Config, manifest: Manifest) -> tuple[ImageStore, np.ndarray]:
    """train.unlabeled's films in their own store; films that are also labelled rows are left out."""
    from medres.data.selection import unlabelled_manifest

    um = unlabelled_manifest([cfg.train.unlabeled])
    store = open_store(um, preprocess_spec(cfg), store_dir=cfg.data.store_dir, dtype=cfg.data.store_dtype, cache_dir=cfg.data.cache_dir)
    store.ensure(workers=cfg.train.num_workers)
    labelled = {str(manifest.absolute(i)) for i in range(len(manifest))}
    rows = np.array([i for i in np.nonzero(store.ok_mask())[0] if str(um.absolute(int(i))) not in labelled], dtype=np.int64)
    if len(rows) == 0:
        raise ManifestInvalid(f"train.unlabeled {cfg.train.unlabeled}: no readable film that is not already a labelled row")
    log.info("semi-supervised: %d unlabelled films (%d were labelled rows, left out), %d per labelled film in each step, pseudo-label threshold %.2f",
             len(rows), int(store.ok_mask().sum()) - len(rows), cfg.train.unlabeled_ratio, cfg.train.pseudo_threshold)
    return store, rows


def pseudo_label_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, task: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch (Sohn et al., NeurIPS 2020): the weak view's confident predictions are the targets of the
    strong view; below the threshold a film (multiclass) or a label (multilabel) adds nothing. Returns
    (loss averaged over all unlabelled entries, the mask of entries that counted)."""
    weak = weak_logits.detach().float()
    if task == "multiclass":
        conf, target = torch.softmax(weak, 1).max(1)
        mask = (conf >= threshold).float()
        return (F.cross_entropy(strong_logits.float(), target, reduction="none") * mask).mean(), mask
    p = torch.sigmoid(weak)
    mask = ((p >= threshold) | (p <= 1 - threshold)).float()
    each = F.binary_cross_entropy_with_logits(strong_logits.float(), (p >= 0.5).float(), reduction="none")
    return (each * mask).mean(), mask


def _unlabeled_views(run: _Run, epoch: int, s: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weak, strong) normalised views of this step's unlabelled films (chosen as a function of seed, epoch, step)."""
    cfg = run.cfg
    pick = np.random.default_rng([cfg.train.seed, epoch, s]).choice(run.unlabeled_rows, cfg.train.batch_size * cfg.train.unlabeled_ratio)
    x = torch.from_numpy(run.unlabeled.read(np.sort(pick)))
    settings = cfg.train.augmentation  # the weak view: the run's own augmentation (today's default when it is off)
    weak = augment(x, gen, AugmentSpec.from_config(settings) if settings.enabled else AugmentSpec())
    strong = (augment(x, gen, STRONG) + 0.02 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return _network_input(run, weak), _network_input(run, strong)


def write_augment_preview(run: _Run, n: int = 16) -> Path:
    """augment.png: `n` training images beside their augmented versions under train.augment, so the
    recipe can be checked by eye. Its own generator: the training run's random streams are untouched."""
    from medres.plots import write_augment_grid

    settings = run.cfg.train.augmentation
    rows = np.sort(np.random.default_rng([run.cfg.train.seed, 16]).permutation(run.train_rows)[:n])
    x = torch.from_numpy(run.store.read(rows)).float()
    gen = torch.Generator().manual_seed(run.cfg.train.seed)
    y = augment_batch(run.cfg, x, gen)
    return write_augment_grid(run.out / "augment.png", x.numpy(), y.numpy(), settings.describe())


def _restore(run: _Run) -> int:
    """--resume: weights, optimiser and counters from the run folder; returns the next epoch."""
    state_path = run.out / STATE
    if not state_path.is_file():
        raise TrainingError(f"--resume: {state_path} not found")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    tensors, _ = read_weight_file(run.out / LAST)
    load_backbone_weights(run.base, SourceWeights(tensors, "medres", tuple(run.meta.mean), tuple(run.meta.std), LAST), include_head=True)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None:
        if "ema" not in state:
            raise TrainingError(f"--resume: {state_path} has no EMA weights (the run was started without train.ema)")
        run.ema.load_state_dict(state["ema"])
    run.best_weights = state.get("best_weights", "live")
    run.step, run.best, run.stale = int(state["step"]), float(state["best"]), int(state["stale"])
    log.info("resumed at epoch %d", int(state["epoch"]) + 1)
    return int(state["epoch"]) + 1


def _train_epoch(run: _Run, epoch: int, tick) -> dict:
    """One pass over this rank's share of the epoch; batches come from the store through a DataLoader."""
    cfg = run.cfg
    torch.manual_seed(cfg.train.seed * 1000 + epoch)  # dropout etc.: a function of (seed, epoch)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch)
    frozen = epoch < run.freeze_epochs
    set_stage(run, trainable=not frozen)
    run.model.train()
    if frozen:
        backbone_bn_eval(run.model)
    loader = epoch_batches(run, epoch, run.steps_per_epoch)
    t0, seen, losses = time.perf_counter(), 0, []
    for s, (xb, yb) in enumerate(loader):
        xb = training_input(run, xb, gen)
        unlabeled = _unlabeled_views(run, epoch, s, gen) if run.unlabeled is not None else None
        losses.append(_train_step(run, xb, yb.to(run.device, non_blocking=True), epoch, s, unlabeled=unlabeled))
        seen += len(yb)
        tick(loss=losses[-1], ips=seen * run.world / (time.perf_counter() - t0))
    train_time = time.perf_counter() - t0
    record = {"epoch": epoch + 1, "frozen": frozen, "train_loss": float(np.mean(losses)) if losses else float("nan"), "images_per_s": seen * run.world / max(train_time, 1e-9)}
    if run.unlabeled is not None:
        mu = cfg.train.unlabeled_ratio
        record.update(unlabeled_share=mu / (1 + mu), pseudo_label_rate=float(np.mean(run.pseudo_rates)) if run.pseudo_rates else 0.0)
        run.pseudo_rates = []
    return record


def epoch_batches(run: _Run, epoch: int, steps: int):
    """The DataLoader of this rank's first `steps` training batches of `epoch` (fixed by seed and epoch)."""
    cfg = run.cfg
    order = epoch_order(len(run.train_rows), run.targets[run.train_rows], cfg, epoch, run.rank, run.world)
    batches = [run.train_rows[order[s * cfg.train.batch_size : (s + 1) * cfg.train.batch_size]] for s in range(steps)]
    workers = cfg.train.loader_workers if cfg.train.loader_workers is not None else (4 if run.device.type == "cuda" else 0)
    return epoch_loader(run.store, [b for b in batches if len(b)], run.targets, workers=workers, pin_memory=run.device.type == "cuda", seed=cfg.train.seed * 1000 + epoch)


def augment_batch(cfg: Config, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """train.augment applied to a batch of pixels in [0, 1]; switched off, the batch as it is and no
    random numbers drawn."""
    settings = cfg.train.augmentation
    return augment(x, gen, AugmentSpec.from_config(settings)) if settings.enabled else x


def _network_input(run: _Run, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] → the model's normalised input on its device, in its memory format."""
    x = normalise(x.to(run.device, non_blocking=True), run.meta.mean, run.meta.std, run.cfg.model.in_channels)
    return x.contiguous(memory_format=torch.channels_last) if run.cfg.train.channels_last else x


def training_input(run: _Run, xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A loaded batch as the network sees it in training: train.augment, normalisation, memory format."""
    return _network_input(run, augment_batch(run.cfg, xb, gen))


def optimizer_step(run: _Run, loss: torch.Tensor) -> None:
    """Backward pass, gradient clipping (train.grad_clip) and one optimiser step, through the grad scaler."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.cfg.train.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], run.cfg.train.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()


def _train_step(run: _Run, xb: torch.Tensor, yb: torch.Tensor, epoch: int, s: int, *, unlabeled=None) -> float:
    factor = lr_factor(run)
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    with autocast(run.device, run.dtype):
        logits = run.model(xb)
    loss = run.loss_fn(logits, yb)
    if unlabeled is not None:
        weak, strong = unlabeled
        with torch.no_grad(), autocast(run.device, run.dtype):
            weak_logits = run.model(weak)
        with autocast(run.device, run.dtype):
            strong_logits = run.model(strong)
        extra, mask = pseudo_label_loss(weak_logits, strong_logits, run.cfg.data.task, run.cfg.train.pseudo_threshold)
        loss = loss + run.cfg.train.unlabeled_weight * extra
        run.pseudo_rates = (run.pseudo_rates or []) + [float(mask.mean())]
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1} step {s + 1}; the last good checkpoint in {run.out} is kept")
    optimizer_step(run, loss)
    if run.ema is not None:
        update_ema(run.ema, run.base, run.cfg.train.ema)
    run.step += 1
    return float(loss.detach())


def _validate(run: _Run, model: torch.nn.Module) -> dict:
    """Validation loss and macro AUROC of `model` (empty without validation rows)."""
    if not len(run.val_rows):
        return {}
    cfg = run.cfg
    predictor = Predictor(model.eval(), run.meta, run.device, run.dtype, cfg.train.channels_last)
    logits_val = predictor.logits_of(stream(run.store, run.val_rows, cfg.train.batch_size * 2))
    y_val = run.targets[run.val_rows]
    loss = float(run.loss_fn(torch.from_numpy(logits_val).to(run.device), torch.from_numpy(y_val).to(run.device)))
    return {"val_loss": loss, "val_macro_auroc": macro_auroc(y_val, to_probs(logits_val, cfg.data.task))}


def _score(metrics: dict, train_loss: float) -> float:
    """Best = highest validation AUROC; without one, lowest validation (else training) loss."""
    score = metrics.get("val_macro_auroc", float("nan"))
    return -metrics.get("val_loss", train_loss) if math.isnan(score) else score


def _validate_and_checkpoint(run: _Run, epoch: int, record: dict) -> dict:
    """Rank 0: validation metrics (live and EMA weights), last/best checkpoints, resume state and metrics.jsonl."""
    cfg, out = run.cfg, run.out
    record.update(_validate(run, run.base))
    candidates = {"live": (_score(record, record["train_loss"]), run.base)}
    if run.ema is not None:
        ema = _validate(run, run.ema)
        record.update({f"ema_{k}": v for k, v in ema.items()})
        candidates["ema"] = (_score(ema, record["train_loss"]), run.ema)
    # The better of live and EMA this epoch (live on a tie); -inf start: any finite first score is an
    # improvement, so model.safetensors always exists after epoch 1.
    which = max(candidates, key=lambda k: (candidates[k][0], k == "live"))
    score, weights = candidates[which]
    if run.ema is not None:
        record["better_weights"] = which
    run.meta.epoch, run.meta.val_auroc = epoch + 1, record.get("val_macro_auroc")
    save_checkpoint(out / LAST, run.base, run.meta)  # the live weights: what --resume continues from
    if score > run.best or not (out / BEST).exists():
        run.best, run.stale, run.best_weights = score, 0, which
        run.meta.val_auroc = record.get("ema_val_macro_auroc" if which == "ema" else "val_macro_auroc")
        save_checkpoint(out / BEST, weights, run.meta)
        if run.ema is not None:
            log.info("epoch %d: best so far, from the %s weights (live %.4f, EMA %.4f)", epoch + 1, which, candidates["live"][0], candidates["ema"][0])
    else:
        run.stale += 1
    state = {"optimizer": run.optimizer.state_dict(), "epoch": epoch, "best": run.best, "step": run.step, "stale": run.stale, "best_weights": run.best_weights}
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    with atomic_path(out / STATE) as tmp:
        torch.save(state, tmp)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    from medres.plots import write_curves

    write_curves(out)  # kept current each epoch: a stopped run has its curves too
    log.info("epoch %s", json.dumps(record))
    return record


def calibrate_run(out: Path, run: "_Run") -> dict:
    """Temperature, operating points, conformal sets and the input gate, fitted on held-out data and
    stored in the best checkpoint (medres/calibration.py)."""
    from medres.calibration import calibrate_checkpoint

    cfg = run.cfg
    return calibrate_checkpoint(
        out / BEST, run.store, train_rows=run.train_rows, val_rows=run.val_rows, targets=run.targets, device=run.device, dtype=run.dtype,
        target_sensitivity=cfg.eval.target_sensitivity, coverage=cfg.eval.coverage, method=cfg.eval.conformal,
        ood_quantile=cfg.eval.ood_quantile, ood_max_train=cfg.eval.ood_max_train, orientation_images=cfg.eval.orientation_images,
        batch_size=cfg.train.batch_size * 2, seed=cfg.train.seed,
    )


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


def write_selection(out: Path, selection) -> None:
    """What the run selected and how many rows each step removed, plus the label states per class."""
    m = selection.manifest
    for line in selection.summary():
        log.info("selection: %s", line)
    info = {"steps": selection.steps, "rows": len(m), "label_states": m.label_counts() if m.states is not None else None}
    atomic_write(out / "selection.json", json.dumps(info, indent=2))


def manifests_digest(paths: list[Path]) -> str:
    """sha256 of the training manifest (of each, in order, when several are merged)."""
    digests = [file_digest(Path(p)) for p in paths]
    if len(digests) == 1:
        return digests[0]
    import hashlib

    return hashlib.sha256("|".join(digests).encode()).hexdigest()
