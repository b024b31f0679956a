"""Everything fitted on held-out data after training, in one pass, stored in the checkpoint:

- temperature scaling and operating points (validation; `calibrate_meta`),
- conformal prediction sets at `eval.coverage` (validation; `conformal.py`),
- the input gate: header expectations from the training images' DICOM tags, and the OOD detector on
  the training images' penultimate features with its threshold from validation (`gate.py`),
- the folder-level shift reference: validation probabilities and reduced features (`shift.py`).

`train` runs it at the end (`calibrate_checkpoint`); `medres calibrate` re-runs it on any checkpoint
(`calibrate`; older ones gain the gate and the shift reference). All calibration lives here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from medres import conformal
from medres.data.dataset import open_store, stream
from medres.data.store import ImageStore
from medres.gate import ORIENTATION_IMAGES, TRANSFORMS, OodDetector, OrientationCheck, header_profile, transformed
from medres.inference import Predictor, to_probs
from medres.errors import ManifestInvalid
from medres.io import PreprocessSpec
from medres.model import ModelMeta, load_checkpoint, save_checkpoint
from medres.run import manifest_for
from medres.shift import ShiftReference

log = logging.getLogger(__name__)


def calibrate_meta(meta: ModelMeta, logits: np.ndarray, y: np.ndarray, *, target_sensitivity: float | None = None) -> dict:
    """Temperature scaling and operating points from validation logits, written into `meta`.
    The one calibration step: `train` runs it at the end, `medres calibrate` on older checkpoints."""
    from medres.metrics import choose_thresholds, fit_temperature

    meta.temperature = fit_temperature(logits, y, meta.task)
    meta.thresholds, meta.threshold_method = choose_thresholds(y, to_probs(logits, meta.task, meta.temperature), target_sensitivity=target_sensitivity)
    return {"temperature": meta.temperature, "thresholds": meta.thresholds, "method": meta.threshold_method}


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


def calibrate(checkpoint: str | Path, manifest_path, splits_csv: str | Path | None = None, *, target_sensitivity: float | None = None,
              coverage: float = 0.9, method: str = "aps", ood_quantile: float = 0.99, ood_max_train: int = 20000,
              device: str = "auto", precision: str = "auto", store_dir=None, num_workers: int | None = None) -> dict:
    """Fit temperature, operating points, conformal sets and the input gate (OOD detector on the train
    split, its threshold and the other fits on the validation split); store them in the checkpoint."""
    from medres.inference import resolve_device, resolve_precision

    _, meta = load_checkpoint(checkpoint)
    manifest = manifest_for(manifest_path, meta, splits_csv)
    split = manifest.frame["split"].to_numpy() if "split" in manifest.frame.columns else np.full(len(manifest), "")
    val, train = np.nonzero(split == "val")[0], np.nonzero(split == "train")[0]
    if len(val) == 0:
        raise ManifestInvalid(f"{manifest.source}: no validation rows to calibrate on")
    store = open_store(manifest, PreprocessSpec.from_dict(meta.preprocess), store_dir=store_dir, dtype=meta.store_dtype)
    try:
        store.ensure(np.concatenate([train, val]), workers=num_workers)
        if not store.ok_mask(val).any():
            raise ManifestInvalid(f"{manifest.source}: no readable validation images to calibrate on")
        dev = resolve_device(device)
        return calibrate_checkpoint(checkpoint, store, train_rows=train, val_rows=val, targets=manifest.targets, device=dev,
                                    dtype=resolve_precision(precision, dev), target_sensitivity=target_sensitivity, coverage=coverage,
                                    method=method, ood_quantile=ood_quantile, ood_max_train=ood_max_train if len(train) else 0)
    finally:
        store.close()
