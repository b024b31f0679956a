"""`lr_find()`: the learning-rate range test (Smith 2015; fastai's `lr_find`) on the real training pipeline.

The same data selection, image store, splits, augmentation, model (donor weights, head), optimiser
(AdamW, the backbone at lr × backbone_lr_mult), precision, channels_last, gradient clipping and first
training stage (backbone frozen while `train.freeze_epochs` > 0) as `medres train`, built by train.py's
own functions. The LR grows exponentially from `start_lr` to `end_lr` over `steps` steps; the loss is
smoothed (exponential moving average, beta 0.98, bias-corrected) and the sweep stops once the smoothed
loss exceeds 4× its best (divergence) or a loss is not finite.

Suggestion rule (SUGGESTION_RULE): the LR where the smoothed loss is lowest, divided by 10 (fastai's
`minimum` suggestion, Smith's "an order of magnitude below where the loss is best"), not below start_lr.
The first tenth of the sweep is left out: there the bias-corrected average is still close to single,
noisy losses. The steepest-slope rule was measured too and rejected: on a flat, noisy curve it points
at noise (e.g. 6e-7 on the smoke phantoms, where the minimum rule gives 1e-5).

Nothing is saved but `lr_find.json` and `lr_find.png`: the model, its weights and the optimiser's state
live in memory only and are dropped when the call returns.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from medres.config import Config
from medres.errors import TrainingError, UsageError
from medres.files import atomic_write

log = logging.getLogger(__name__)
BETA = 0.98  # smoothing of the loss (fastai's value)
DIVERGE = 4.0  # stop when the smoothed loss exceeds this many times its best
SKIP_START = 0.1  # share of the first steps left out of the suggestion (the average is still settling)
SUGGESTION_RULE = "lr at the smoothed loss's minimum / 10"


def lr_schedule(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """(steps,) learning rates growing exponentially from start_lr to end_lr (both included)."""
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / max(1, steps - 1))


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """Exponential moving average with bias correction (the first value is the first loss)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, str]:
    """(suggested lr, the rule): SUGGESTION_RULE, kept inside the swept range."""
    lo = int(len(lrs) * SKIP_START)
    best = lo + int(np.argmin(smoothed[lo:]))
    return float(max(lrs[best] / 10, lrs[0])), SUGGESTION_RULE


def lr_find(cfg: Config, out: str | Path, *, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0, show_progress: bool = False) -> dict:
    """Run the range test on `cfg`'s training data; write lr_find.json and lr_find.png into `out`.
    Returns what lr_find.json holds: lrs, losses, smoothed, suggestion, rule, stage, stopped."""
    if steps < 2:
        raise UsageError(f"--steps must be at least 2, got {steps}")
    if not 0 < start_lr < end_lr:
        raise UsageError(f"the sweep needs 0 < start_lr < end_lr, got start_lr {start_lr:g}, end_lr {end_lr:g}")
    out = Path(out)
    lrs, losses, stage, stopped = _sweep(cfg, lr_schedule(start_lr, end_lr, steps), show_progress=show_progress)
    smoothed = smooth(losses)
    suggestion, rule = suggest(lrs, smoothed)
    result = {
        "lrs": lrs, "losses": losses, "smoothed": smoothed, "suggestion": suggestion, "rule": rule, "stage": stage,
        "start_lr": start_lr, "end_lr": end_lr, "steps": steps, "steps_run": len(losses),
        "stopped": stopped,
        "beta": BETA, "set": f"--set train.lr={suggestion:.3g}",
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "lr_find.json", json.dumps(result, indent=2))
    from medres.plots import write_lr_find

    write_lr_find(out / "lr_find.png", result)
    return result


def _sweep(cfg: Config, schedule: np.ndarray, *, show_progress: bool) -> tuple[list[float], list[float], str, str]:
    """Train one step per LR of `schedule` on the training split, up to divergence: (lrs, losses, stage,
    why it stopped). A step whose loss is not finite is not recorded."""
    from medres.inference import autocast, resolve_device
    from medres.model import load_source_weights
    from medres.progress import Progress
    from medres.train import backbone_bn_eval, optimizer_step, prepare_data, set_stage, setup_run, training_input

    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    source = load_source_weights(cfg.model.weights)
    manifest, splits, store = prepare_data(cfg, None)  # out=None: no splits.csv, nothing written
    try:
        # The run folder argument only names where checkpoints would go; nothing here saves one.
        run = setup_run(cfg, Path("lr-find-writes-nothing"), device, manifest, splits, store, source, 0, 1, False)
        frozen = run.freeze_epochs > 0  # the first stage of training: the head alone while the backbone is frozen
        set_stage(run, trainable=not frozen)
        run.model.train()
        if frozen:
            backbone_bn_eval(run.model)
        ratios = [g["base_lr"] / cfg.train.lr for g in run.optimizer.param_groups]  # backbone at lr × backbone_lr_mult
        gen = torch.Generator().manual_seed(cfg.train.seed)
        lrs: list[float] = []
        losses: list[float] = []
        best, stopped = math.inf, "end_lr reached"
        bar = Progress(enabled=show_progress)
        with bar.task("lr-find", total=len(schedule)) as tick:
            for xb, yb in _batches(run, len(schedule)):
                lr = float(schedule[len(lrs)])
                for group, ratio in zip(run.optimizer.param_groups, ratios):
                    group["lr"] = lr * ratio
                xb = training_input(run, xb, gen)
                with autocast(device, run.dtype):
                    logits = run.model(xb)
                loss = run.loss_fn(logits, yb.to(device))
                if not torch.isfinite(loss):
                    stopped = f"diverged: loss not finite at lr {lr:.3g}"
                    break
                optimizer_step(run, loss)
                lrs.append(lr)
                losses.append(float(loss.detach()))
                tick(loss=losses[-1])
                smoothed = smooth(losses)[-1]
                best = min(best, smoothed)
                if len(losses) > 1 and smoothed > DIVERGE * best:
                    stopped = f"diverged: smoothed loss {smoothed:.4g} > {DIVERGE:g} x best {best:.4g} at lr {lr:.3g}"
                    break
        if len(losses) < 2:
            raise TrainingError(f"lr-find: the loss diverged at once (lr {schedule[0]:.3g}); lower --start-lr")
        log.info("lr-find: %d steps, %s", len(losses), stopped)
        return lrs, losses, "head only (backbone frozen: train.freeze_epochs > 0)" if frozen else "whole network", stopped
    finally:
        store.close()


def _batches(run, steps: int):
    """Training batches in train.py's epoch order, as many epochs as `steps` needs."""
    from medres.train import epoch_batches

    done, epoch = 0, 0
    while done < steps:
        for batch in epoch_batches(run, epoch, min(run.steps_per_epoch, steps - done)):
            done += 1
            yield batch
        epoch += 1
