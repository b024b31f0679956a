"""Everything fitted on held-out data after training, in one pass, stored in the checkpoint:

- temperature scaling and operating points (validation; `inference.calibrate_meta`),
- conformal prediction sets at `eval.coverage` (validation; `conformal.py`),
- the input gate: header expectations from the training images' DICOM tags, and the OOD detector on
  the training images' penultimate features with its threshold from validation (`gate.py`),
- the folder-level shift reference: validation probabilities and reduced features (`shift.py`).

`train` runs it at the end; `medres calibrate` re-runs it on any checkpoint (older ones gain the gate).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from medres import conformal
from medres.data.dataset import stream
from medres.data.store import ImageStore
from medres.gate import ORIENTATION_IMAGES, TRANSFORMS, OodDetector, OrientationCheck, header_profile, transformed
from medres.inference import Predictor, calibrate_meta, to_probs
from medres.model import load_checkpoint, save_checkpoint
from medres.shift import ShiftReference

log = logging.getLogger(__name__)


def calibrate_checkpoint(
    path: str | Path,
    store: ImageStore,
    *,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    targets: np.ndarray,
    device: torch.device,
    dtype: torch.dtype | None,
    target_sensitivity: float | None = None,
    coverage: float = 0.9,
    method: str = "aps",
    ood_quantile: float = 0.99,
    ood_max_train: int = 20000,
    orientation_images: int = ORIENTATION_IMAGES,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Fit and store everything above; returns what was fitted (for the run summary and the CLI)."""
    model, meta = load_checkpoint(path, device)
    predictor = Predictor(model.to(memory_format=torch.channels_last), meta, device, dtype)
    ok = store.ok_mask()
    train_rows, val_rows = train_rows[ok[train_rows]], val_rows[ok[val_rows]]
    logits_val, feats_val = predictor.features_of(stream(store, val_rows, batch_size))
    y_val = targets[val_rows]
    result = calibrate_meta(meta, logits_val, y_val, target_sensitivity=target_sensitivity)
    meta.conformal = conformal.fit(to_probs(logits_val, meta.task, meta.temperature), y_val, meta.task, coverage=coverage, method=method)
    result["conformal"] = meta.conformal
    meta.expect = header_profile(store.headers(train_rows)) or None
    result["expect"] = meta.expect
    reference = ShiftReference.fit(to_probs(logits_val, meta.task, meta.temperature), y_val, feats_val, meta.task, seed=seed)
    meta.shift = reference.info()
    extra = reference.tensors()
    if ood_max_train and len(train_rows) >= 2:
        sample = train_rows
        if len(sample) > ood_max_train:
            sample = np.sort(np.random.default_rng(seed).choice(train_rows, ood_max_train, replace=False))
        _, feats_train = predictor.features_of(stream(store, sample, batch_size))
        labels = targets[sample].argmax(1) if meta.task == "multiclass" else None
        detector = OodDetector.fit(feats_train, labels, feats_val, quantile=ood_quantile)
        if orientation_images:
            detector.orientation = fit_orientation(predictor, store, sample[:orientation_images] if len(sample) <= orientation_images else
                                                   np.sort(np.random.default_rng(seed + 1).choice(sample, orientation_images, replace=False)),
                                                   feats_val, batch_size=batch_size, seed=seed)
        meta.ood = detector.info()
        extra.update(detector.tensors())
        result["ood"] = meta.ood
    else:
        meta.ood = None
    save_checkpoint(path, model, meta, extra=extra)
    log.info("calibrated %s: temperature %.3f, conformal q %s, OOD threshold %s, expect %s", Path(path).name, meta.temperature,
             meta.conformal.get("qhat"), meta.ood and round(meta.ood["threshold"], 3), meta.expect)
    return result


def fit_orientation(predictor: Predictor, store: ImageStore, rows: np.ndarray, val_features: np.ndarray, *, batch_size: int, seed: int) -> OrientationCheck:
    """The ROTATED/INVERTED check (gate.OrientationCheck): the sampled training films in each of the 8
    orientations × polarities, through the model, to a logistic regression on the pooled features."""
    by_transform = []
    for k, inverted in TRANSFORMS:
        _, feats = predictor.features_of(transformed(b, k, inverted) for b in stream(store, rows, batch_size))
        by_transform.append(feats)
    check = OrientationCheck.fit(by_transform, val_features, seed=seed)
    log.info("orientation check: %d films x 8 transforms, training accuracy %.3f, threshold %.4f", len(rows), check.train_accuracy, check.threshold)
    return check


def load_detector(path: str | Path, meta) -> OodDetector | None:
    """The checkpoint's OOD detector, or None when it was trained before the gate existed."""
    from medres.model import read_extra

    if not meta.ood:
        return None
    return OodDetector.from_checkpoint(read_extra(path, "ood."), meta.ood)
