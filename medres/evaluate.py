"""`evaluate()`: metrics with patient-level bootstrap CIs, calibration before/after temperature
scaling, operating points from validation, subgroup audit, per-case CSV, plots and an HTML page."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medres.data.dataset import open_store, stream
from medres.data.manifest import Manifest
from medres.errors import ManifestInvalid, UsageError
from medres.files import atomic_write, csv_text
from medres.inference import PROB_DECIMALS, Predictor, to_probs
from medres.io import PreprocessSpec
from medres.metrics import brier, ece, point_metrics, predict_labels
from medres.model import ModelMeta, load_checkpoint
from medres.run import manifest_for

log = logging.getLogger(__name__)
# Subgroup AUROC gaps smaller than this are not flagged even when outside the CI; zero-width CIs (a perfectly
# separated small subgroup: every resample scores 1.0) say nothing about uncertainty and are not used either.
MIN_AUROC_GAP = 0.05
CI_KEYS = ("auroc", "average_precision", "sensitivity", "specificity", "ppv", "npv", "f1")


@dataclass
class Scored:
    logits: np.ndarray  # (len(rows), C); rows whose file failed are zeros
    ok: np.ndarray  # (len(rows),) bool
    errors: list = field(default_factory=list)  # (store row, code, one-line message)
    ood: np.ndarray | None = None  # (len(rows),) OOD scores when a detector was given (NaN for failed rows)


def score_manifest(model, meta: ModelMeta, manifest: Manifest, rows: np.ndarray | None = None, *, device: str = "auto", precision: str = "auto", batch_size: int = 32,
                   store_dir=None, num_workers: int | None = None, detector=None) -> Scored:
    """Logits for `rows` of the manifest (default all), read from the on-disk image store the training
    run built for the same files and preprocessing (built here, once, if it does not exist)."""
    rows = np.arange(len(manifest)) if rows is None else np.asarray(rows, dtype=np.int64)
    store = open_store(manifest, PreprocessSpec.from_dict(meta.preprocess), store_dir=store_dir, dtype=meta.store_dtype)
    try:
        store.ensure(rows, workers=num_workers)
        ok = store.ok_mask(rows)
        logits = np.zeros((len(rows), len(meta.classes)), dtype=np.float32)
        ood = np.full(len(rows), np.nan, dtype=np.float32) if detector is not None else None
        predictor = Predictor.create(model, meta, device=device, precision=precision)
        if ok.any() and detector is not None:
            logits[ok], features = predictor.features_of(stream(store, rows[ok], batch_size))
            ood[ok] = detector.score(features)
        elif ok.any():
            logits[ok] = predictor.logits_of(stream(store, rows[ok], batch_size))
        return Scored(logits, ok, store.errors(rows), ood)
    finally:
        store.close()


# --- bootstrap -----------------------------------------------------------------------------------
def patient_bootstrap(patients: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Index sets for `n` resamples of patients with replacement: a patient's images move together."""
    uniq, inverse = np.unique(patients, return_inverse=True)
    if len(uniq) < 2:  # nothing to resample: no CI (callers report the group as too small)
        return []
    members = [np.nonzero(inverse == k)[0] for k in range(len(uniq))]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pick = rng.integers(0, len(uniq), len(uniq))
        out.append(np.concatenate([members[k] for k in pick]))
    return out


def bootstrap_ci(y, p, patients, classes, task, thresholds, n: int, seed: int = 0) -> dict:
    """95% percentile CIs for every per-class and macro metric (and accuracy)."""
    if n <= 0 or len(y) == 0:
        return {}
    samples: dict[str, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for idx in patient_bootstrap(patients, n, seed):
            m = point_metrics(y[idx], p[idx], classes, task, thresholds)
            for c in classes:
                for k in CI_KEYS:
                    samples.setdefault(f"{c}.{k}", []).append(m["per_class"][c][k])
            for k in CI_KEYS:
                samples.setdefault(f"macro.{k}", []).append(m["macro"][k])
            if "accuracy" in m:
                samples.setdefault("accuracy", []).append(m["accuracy"])
    out = {}
    for key, vals in samples.items():
        v = np.asarray(vals, dtype=float)
        v = v[~np.isnan(v)]
        out[key] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [float("nan"), float("nan")]
    return out


def metrics_with_ci(y, p, patients, classes, task, thresholds, n_boot: int, seed: int = 0) -> dict:
    m = point_metrics(y, p, classes, task, thresholds)
    ci = bootstrap_ci(y, p, patients, classes, task, thresholds, n_boot, seed)
    for c in classes:
        for k in CI_KEYS:
            m["per_class"][c][k + "_ci"] = ci.get(f"{c}.{k}")
    for k in CI_KEYS:
        m["macro"][k + "_ci"] = ci.get(f"macro.{k}")
    if "accuracy" in m:
        m["accuracy_ci"] = ci.get("accuracy")
    m["images"], m["patients"] = int(len(y)), int(len(np.unique(patients)))
    if n_boot and m["patients"] < 2:
        m["note"] = f"{m['patients']} patient(s): too few for a bootstrap CI"
    return m


# --- subgroups -----------------------------------------------------------------------------------
def subgroup_audit(y, p, logits, frame: pd.DataFrame, column: str, classes, task, thresholds, n_boot: int, seed: int) -> tuple[dict, list[str]]:
    if column not in frame.columns:
        raise UsageError(f"--by {column}: no such manifest column (columns: {', '.join(frame.columns)})")
    values = frame[column].astype(str).replace("", "(blank)").to_numpy()
    patients = frame["patient_id"].to_numpy()
    table, warns = {}, []
    overall = point_metrics(y, p, classes, task, thresholds)
    for v in sorted(set(values)):
        mask = values == v
        m = metrics_with_ci(y[mask], p[mask], patients[mask], classes, task, thresholds, n_boot, seed)
        table[v] = m
        rest = point_metrics(y[~mask], p[~mask], classes, task, thresholds) if (~mask).any() else None
        if rest is None:
            continue
        for c in classes:
            ci = m["per_class"][c]["auroc_ci"]
            other = rest["per_class"][c]["auroc"]
            if ci and not any(math.isnan(b) for b in ci) and not math.isnan(other) and not ci[0] <= other <= ci[1] and abs(m['per_class'][c]['auroc'] - other) >= MIN_AUROC_GAP and ci[1] - ci[0] > 1e-9:
                warns.append(f"{column}={v}: {c} AUROC {m['per_class'][c]['auroc']:.3f} (95% CI {ci[0]:.3f}–{ci[1]:.3f}) differs from the rest ({other:.3f})")
        for c in classes:
            if m["per_class"][c]["positives"] == 0 and overall["per_class"][c]["positives"] > 0:
                warns.append(f"{column}={v}: no {c} cases — {c} AUROC is undefined here (NaN)")
    predictability = column_predictability(logits, values, patients)
    if predictability is not None and predictability >= 0.8:
        warns.append(
            f"{column} is predictable from the model outputs (AUROC {predictability:.2f}): the model may have learned "
            f"the {column} rather than the disease — check per-{column} metrics and heatmaps"
        )
    return {"column": column, "groups": table, "predictability_auroc": predictability}, warns


def column_predictability(logits: np.ndarray, values: np.ndarray, patients: np.ndarray) -> float | None:
    """Cross-validated (patient-grouped) macro one-vs-rest AUROC of predicting the column from the logits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    uniq, counts = np.unique(values, return_counts=True)
    if len(uniq) < 2 or counts.min() < 3 or len(np.unique(patients)) < 5:
        return None
    folds = min(5, len(np.unique(patients)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Standardised first: the check must not depend on the logits' scale (a barely trained or
            # high-temperature model has tiny logit spread that L2 regularisation would flatten).
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
            proba = cross_val_predict(model, logits, values, groups=patients, cv=GroupKFold(folds), method="predict_proba")
            if len(uniq) == 2:
                return float(roc_auc_score(values == uniq[1], proba[:, 1]))
            return float(roc_auc_score(values, proba, multi_class="ovr", labels=uniq))
    except ValueError:
        return None


# --- conformal sets ------------------------------------------------------------------------------
def _coverage_stats(member: np.ndarray, y: np.ndarray, task: str) -> tuple[float, float]:
    """(empirical coverage, mean set size); multilabel coverage = share of (image, positive label)
    pairs whose label is in the set."""
    from medres import conformal

    cov = conformal.covered(member, y, task)
    value = float(np.nanmean(cov)) if np.size(cov) and not np.all(np.isnan(np.asarray(cov, dtype=float))) else float("nan")
    return value, float(member.sum(1).mean()) if len(member) else float("nan")


def conformal_audit(y, p_cal, frame: pd.DataFrame, meta: ModelMeta, by: list[str], n_boot: int, seed: int) -> tuple[dict, list[str]]:
    """Empirical coverage and mean set size of the stored conformal sets, with patient-level bootstrap
    CIs, overall and per `--by` subgroup; a warning where a subgroup's coverage falls below the target
    by more than chance allows (conformal.coverage_tolerance)."""
    from medres import conformal

    member = conformal.sets(p_cal, meta.conformal, meta.task)
    patients = frame["patient_id"].to_numpy()
    n_cal = meta.conformal["n"] if isinstance(meta.conformal["n"], int) else int(min(meta.conformal["n"]))
    target = meta.conformal["coverage"]

    def summarise(mask: np.ndarray) -> dict:
        cov, size = _coverage_stats(member[mask], y[mask], meta.task)
        boots = [_coverage_stats(member[mask][i], y[mask][i], meta.task) for i in patient_bootstrap(patients[mask], n_boot, seed)] if n_boot else []
        ci = lambda k: [float(np.nanpercentile([b[k] for b in boots], q)) for q in (2.5, 97.5)] if boots else None  # noqa: E731
        return {"images": int(mask.sum()), "coverage": cov, "coverage_ci": ci(0), "mean_set_size": size, "mean_set_size_ci": ci(1),
                "tolerance": conformal.coverage_tolerance(target, n_cal, int(mask.sum()))}

    everything = np.ones(len(y), dtype=bool)
    out = {"method": meta.conformal["method"], "target": target, "n_calibration": meta.conformal["n"], **summarise(everything), "subgroups": {}}
    warns = []
    if not math.isnan(out["coverage"]) and out["coverage"] < target - out["tolerance"]:
        warns.append(f"conformal sets cover {out['coverage']:.3f} of test images, below the {target:.2f} target by more than chance allows (±{out['tolerance']:.3f}): the test data are not exchangeable with validation")
    for column in by:
        values = frame[column].astype(str).replace("", "(blank)").to_numpy()
        groups = {}
        for v in sorted(set(values)):
            g = summarise(values == v)
            groups[v] = g
            if not math.isnan(g["coverage"]) and g["coverage"] < target - g["tolerance"]:
                warns.append(f"{column}={v}: conformal coverage {g['coverage']:.3f} on {g['images']} images is below the {target:.2f} target (tolerance {g['tolerance']:.3f}): the sets' guarantee does not hold for this subgroup")
        out["subgroups"][column] = groups
    return out, warns


# --- the command ---------------------------------------------------------------------------------
def evaluate(
    checkpoint: str | Path,
    manifest_path: "str | Path | Manifest",
    out: str | Path,
    *,
    split: str | None = "test",
    splits_csv: str | Path | None = None,
    by: list[str] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    store_dir=None,
    num_workers: int | None = None,
    plots: bool = True,
    top_losses: int = 0,
) -> dict:
    """Metrics, audits and per-case outputs of `split` into `out`; with `top_losses` N, also the N
    highest-loss cases with their Grad-CAMs in out/top_losses (medres/top_losses.py)."""
    if top_losses < 0:
        raise UsageError(f"--top-losses must be >= 0, got {top_losses}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_checkpoint(checkpoint)
    manifest = manifest_for(manifest_path, meta, splits_csv)
    rows = _split_rows(manifest, split)
    # The store is keyed by the whole manifest, so the training run's store serves every split.
    from medres.calibration import load_detector

    detector = load_detector(checkpoint, meta)
    scored = score_manifest(model, meta, manifest, rows, device=device, precision=precision, store_dir=store_dir, num_workers=num_workers, detector=detector)
    mask = np.zeros(len(manifest), dtype=bool)
    mask[rows] = True
    manifest = manifest.subset(mask)
    ok = scored.ok
    if not ok.any():
        first = scored.errors[0][2] if scored.errors else "no error recorded"
        raise ManifestInvalid(f"{manifest.source}: split {split or 'all'}: {len(rows)} rows, none of their images could be read (first: {first}); "
                              "is the data root right (data.root, the manifest's folder)?")
    y, z = manifest.targets[ok], scored.logits[ok]
    frame = manifest.frame[ok].reset_index(drop=True)
    p_raw, p_cal = to_probs(z, meta.task, 1.0), to_probs(z, meta.task, meta.temperature)
    thresholds = meta.effective_thresholds()
    warns = [f"skipped {m}" for _, _, m in scored.errors] + _label_warnings(y, meta)
    result = _metrics_result(y, p_raw, p_cal, frame["patient_id"].to_numpy(), meta, thresholds, bootstrap, seed)
    result["split"], result["classes"], result["task"] = split, meta.classes, meta.task
    result["failed_images"] = len(scored.errors)
    warns += _audits(result, y, p_cal, z, frame, meta, thresholds, by=by or [], bootstrap=bootstrap, seed=seed)
    result["estimated_without_labels"], result["shift"] = _label_free_check(checkpoint, meta, p_cal, result)
    if detector is not None:
        result["ood"] = _ood_summary(scored.ood[ok], detector)
    result["warnings"] = warns
    for w in warns:
        log.warning(w)
    if top_losses:
        from medres.top_losses import write_top_losses

        files = [manifest.absolute(int(i)) for i in np.nonzero(ok)[0]]
        result["top_losses"] = write_top_losses(out / "top_losses", model, meta, files=files, shown=list(frame["path"].astype(str)),
                                                y=y, p_cal=p_cal, thresholds=thresholds, n=top_losses)
    _write_outputs(result, out, checkpoint, frame, y, p_raw, p_cal, meta, thresholds, plots=plots)
    return result


def _split_rows(manifest: Manifest, split: str | None) -> np.ndarray:
    """Indices of the manifest rows in `split` (all rows when `split` is empty)."""
    if not split:
        return np.arange(len(manifest))
    if "split" not in manifest.frame.columns:
        raise UsageError(f"--split {split}: the manifest has no split column; pass --run RUN_DIR (its splits.csv) or --split ''")
    rows = np.nonzero((manifest.frame["split"] == split).to_numpy())[0]
    if len(rows) == 0:
        counts = manifest.frame["split"].replace("", "(blank)").value_counts().to_dict()
        raise ManifestInvalid(f"{manifest.source}: no rows with split={split} (rows per split: {counts})")
    return rows


def _label_warnings(y: np.ndarray, meta: ModelMeta) -> list[str]:
    """Warnings about the operating points and about classes absent from, or partly unlabelled in, the split."""
    warns = []
    if not meta.thresholds:
        warns.append("checkpoint has no operating points from validation: using 0.5 (run medres calibrate)")
    for j, c in enumerate(meta.classes):
        if np.nansum(y[:, j]) == 0:
            warns.append(f"class {c} is absent from the evaluated split: its AUROC/AP/sensitivity are NaN")
        elif np.isnan(y[:, j]).any():
            warns.append(f"class {c}: {int(np.isnan(y[:, j]).sum())} of {len(y)} images have no label for it (missing or uncertain-ignored): "
                         f"its metrics use the {int((~np.isnan(y[:, j])).sum())} labelled ones")
    return warns


def _metrics_result(y, p_raw, p_cal, patients, meta: ModelMeta, thresholds, bootstrap: int, seed: int) -> dict:
    """Metrics with CIs, calibration before/after temperature scaling, and the operating points used."""
    result = metrics_with_ci(y, p_cal, patients, meta.classes, meta.task, thresholds, bootstrap, seed)
    result["calibration"] = {
        "temperature": meta.temperature,
        "before": {"ece": ece(y, p_raw, meta.task), "brier": brier(y, p_raw, meta.task)},
        "after": {"ece": ece(y, p_cal, meta.task), "brier": brier(y, p_cal, meta.task)},
    }
    result["operating_points"] = {"method": meta.threshold_method or "default 0.5", "thresholds": dict(zip(meta.classes, thresholds))}
    return result


def _audits(result: dict, y, p_cal, z, frame: pd.DataFrame, meta: ModelMeta, thresholds, *, by: list[str], bootstrap: int, seed: int) -> list[str]:
    """The subgroup audit per `--by` column and the conformal audit, added to `result`; their warnings."""
    warns: list[str] = []
    result["subgroups"] = []
    for column in by:
        table, w = subgroup_audit(y, p_cal, z, frame, column, meta.classes, meta.task, thresholds, bootstrap, seed)
        result["subgroups"].append(table)
        warns += w
    if meta.conformal:
        result["conformal"], w = conformal_audit(y, p_cal, frame, meta, by, bootstrap, seed)
        warns += w
    return warns


def _ood_summary(ood: np.ndarray, detector) -> dict:
    """How many evaluated images the input gate would flag (its false-flag rate on in-distribution data)."""
    flagged = ood > detector.threshold
    return {"threshold": detector.threshold, "quantile": detector.quantile, "flagged": int(flagged.sum()),
            "flagged_fraction": float(flagged.mean()) if len(flagged) else None}


def _write_outputs(result: dict, out: Path, checkpoint, frame: pd.DataFrame, y, p_raw, p_cal, meta: ModelMeta, thresholds, *, plots: bool) -> None:
    """per_case.csv, metrics.json (with links to the run's curves and card) and, with `plots`, the plots and report.html."""
    atomic_write(out / "per_case.csv", _per_case_csv(frame, y, p_cal, meta, thresholds))
    run = Path(checkpoint).parent  # a run folder: its training curves and model card
    if (run / "curves.png").is_file():
        result["curves"] = os.path.relpath(run / "curves.png", out)
    result["card"] = os.path.relpath(run / "model_card.html", out)
    result["card_command"] = f"medres card --run {run} --eval {out} --out {run / 'model_card.md'}"
    atomic_write(out / "metrics.json", json.dumps(_clean(result), indent=2))
    if plots:
        from medres.plots import write_plots

        result["plots"] = write_plots(out, y, p_raw, p_cal, meta, thresholds)
        atomic_write(out / "report.html", render_html(result))


def _per_case_csv(frame: pd.DataFrame, y, p_cal, meta: ModelMeta, thresholds) -> str:
    """One row per evaluated image: path, patient, true label(s), calibrated probabilities, prediction."""
    labels = predict_labels(p_cal, meta.task, thresholds)
    rows = []
    for i in range(len(frame)):
        truth = meta.classes[int(y[i].argmax())] if meta.task == "multiclass" else "|".join(c for c, v in zip(meta.classes, y[i]) if v == 1)
        pred = meta.classes[int(labels[i])] if meta.task == "multiclass" else "|".join(c for c, v in zip(meta.classes, labels[i]) if v)
        rows.append([frame["path"].iloc[i], frame["patient_id"].iloc[i], truth] + [f"{v:.{PROB_DECIMALS}f}" for v in p_cal[i]] + [pred])
    return csv_text(["path", "patient_id", "label"] + [f"prob_{c}" for c in meta.classes] + ["prediction"], rows)


def _label_free_check(checkpoint, meta: ModelMeta, p_cal: np.ndarray, result: dict) -> tuple[dict | None, dict | None]:
    """What `predict` would have said about this split without its labels (medres/shift.py): the
    estimated accuracy and per-class AUROC beside the real ones, so the estimator's error is visible,
    and the output-distribution shift test against validation."""
    from medres.shift import check, estimate_performance, load_reference

    ref = load_reference(checkpoint, meta)
    if ref is None or len(p_cal) == 0:
        return None, None
    est = estimate_performance(ref, p_cal, meta.classes)
    for c, row in est["per_class_auroc"].items():
        row["actual"] = result["per_class"][c]["auroc"]
    if "accuracy" in est:
        est["accuracy"]["actual"] = result.get("accuracy")
    return est, check(ref, p_cal, None, meta.classes)


def _clean(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    return obj


def render_html(result: dict) -> str:
    from medres.templates import render

    return render("evaluate.html", r=result, keys=CI_KEYS)
