"""Metrics, calibration and operating points on plain arrays (no files, no torch models).

Conventions: `y` is (N, C) 0/1 (one-hot for multiclass), `p` is (N, C) probabilities. In multilabel
`y`, NaN marks a masked label (missing, or uncertain under `ignore`): every metric of a class is
computed over that class's labelled images only, and flipping a masked entry changes nothing.
A class without both positives and negatives gives NaN, never a crash.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

# scikit-learn is imported where a metric is computed: `predict` imports this module for
# `predict_labels` alone, and importing sklearn.metrics costs ≈ 1.1 s of every run's start-up.


def _defined(y: np.ndarray) -> bool:
    return 0 < np.nansum(y) < np.count_nonzero(~np.isnan(y))


def labelled(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries of one class that carry a label (NaN targets left out)."""
    keep = ~np.isnan(y)
    return y[keep], s[keep]


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y, s = labelled(y, s)
    return float(roc_auc_score(y, s)) if _defined(y) else float("nan")


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    y, s = labelled(y, s)
    return float(average_precision_score(y, s)) if _defined(y) else float("nan")


def macro(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def macro_auroc(y: np.ndarray, p: np.ndarray) -> float:
    return macro([auroc(y[:, j], p[:, j]) for j in range(y.shape[1])])


def binary_at(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    pred = s >= threshold
    tp = float(np.sum(pred & (y > 0)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y > 0)))
    tn = float(np.sum(~pred & (y == 0)))

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    sens, spec, ppv = ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp)
    f1 = 2 * ppv * sens / (ppv + sens) if (ppv + sens) > 0 else float("nan")
    return {"sensitivity": sens, "specificity": spec, "ppv": ppv, "npv": ratio(tn, tn + fn), "f1": f1}


def predict_labels(p: np.ndarray, task: str, thresholds: list[float]) -> np.ndarray:
    """multiclass → (N,) argmax; multilabel → (N, C) 0/1 at the thresholds."""
    if task == "multiclass":
        return p.argmax(1)
    return (p >= np.asarray(thresholds)[None, :]).astype(int)


def confusion(y_idx: np.ndarray, pred_idx: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=int)
    np.add.at(m, (y_idx, pred_idx), 1)
    return m


def point_metrics(y: np.ndarray, p: np.ndarray, classes: list[str], task: str, thresholds: list[float]) -> dict:
    """Per class and macro: AUROC, AP, and sensitivity/specificity/PPV/NPV/F1 at the thresholds;
    accuracy and the confusion matrix for multiclass."""
    per_class = {}
    for j, c in enumerate(classes):
        row = {"auroc": auroc(y[:, j], p[:, j]), "average_precision": average_precision(y[:, j], p[:, j])}
        row.update(binary_at(y[:, j], p[:, j], thresholds[j]))
        row["threshold"] = float(thresholds[j])
        row["positives"] = int(np.nansum(y[:, j]))
        row["labelled"] = int(np.count_nonzero(~np.isnan(y[:, j])))
        per_class[c] = row
    keys = ["auroc", "average_precision", "sensitivity", "specificity", "ppv", "npv", "f1"]
    out = {"per_class": per_class, "macro": {k: macro([per_class[c][k] for c in classes]) for k in keys}}
    if task == "multiclass":
        yi, pi = y.argmax(1), p.argmax(1)
        out["accuracy"] = float(np.mean(yi == pi)) if len(yi) else float("nan")
        out["confusion_matrix"] = confusion(yi, pi, len(classes)).tolist()
    return out


# --- calibration ---------------------------------------------------------------------------------
def ece(y: np.ndarray, p: np.ndarray, task: str, bins: int = 10) -> float:
    """Expected calibration error with equal-mass bins: top-label for multiclass, all
    (class, image) pairs for multilabel."""
    conf, correct = _confidence(y, p, task)
    if len(conf) == 0:
        return float("nan")
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            total += len(chunk) * abs(conf[chunk].mean() - correct[chunk].mean())
    return float(total / len(conf))


def _confidence(y: np.ndarray, p: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs: top label for multiclass, every labelled (image, class) for multilabel."""
    if task == "multiclass":
        return p.max(1), (p.argmax(1) == y.argmax(1)).astype(float)
    keep = ~np.isnan(y.ravel())
    return p.ravel()[keep], y.ravel()[keep].astype(float)


def brier(y: np.ndarray, p: np.ndarray, task: str) -> float:
    if len(y) == 0:
        return float("nan")
    if task == "multiclass":
        return float(np.mean(np.sum((p - y) ** 2, axis=1)))
    return float(np.nanmean((p - y) ** 2)) if (~np.isnan(y)).any() else float("nan")


def reliability_curve(y: np.ndarray, p: np.ndarray, task: str, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    conf, correct = _confidence(y, p, task)
    order = np.argsort(conf, kind="stable")
    chunks = [c for c in np.array_split(order, min(bins, max(1, len(order)))) if len(c)]
    return (np.array([conf[c].mean() for c in chunks]), np.array([correct[c].mean() for c in chunks]), np.array([len(c) for c in chunks]))


def fit_temperature(logits: np.ndarray, y: np.ndarray, task: str) -> float:
    """One temperature minimising the validation NLL (Guo et al. 2017), searched on log T."""
    import torch

    z = torch.as_tensor(logits, dtype=torch.float64)
    t = torch.as_tensor(y, dtype=torch.float64)
    if len(z) == 0:
        return 1.0
    known = ~torch.isnan(t)  # multilabel: masked labels take no part in the fit
    t = torch.nan_to_num(t)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        if task == "multiclass":
            return float(-(t * torch.log_softmax(s, 1)).sum(1).mean())
        each = torch.nn.functional.binary_cross_entropy_with_logits(s, t, reduction="none")
        return float(each[known].mean()) if known.any() else 0.0

    # Golden-section search over log T in [-3, 3]: robust, no gradients, 60 evaluations.
    lo, hi = -3.0, 3.0
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    best = (lo + hi) / 2
    if best > 2.9:
        import logging

        logging.getLogger(__name__).warning(
            "temperature %.1f is at the search bound: the validation logits carry little information (a model near chance?); "
            "its probabilities will be near uniform", math.exp(best))
    return float(math.exp(best)) if nll(best) <= nll(0.0) else 1.0


def choose_thresholds(y: np.ndarray, p: np.ndarray, *, target_sensitivity: float | None = None) -> tuple[list[float], str]:
    """Per class, on validation: Youden's J (default) or the highest threshold reaching the target
    sensitivity. Classes without positives and negatives keep 0.5."""
    from sklearn.metrics import roc_curve

    out = []
    for j in range(y.shape[1]):
        yj, pj = labelled(y[:, j], p[:, j])
        if not _defined(yj):
            out.append(0.5)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fpr, tpr, thr = roc_curve(yj, pj)
        thr = np.clip(thr, 0.0, 1.0)
        if target_sensitivity is None:
            k = int(np.argmax(tpr - fpr))
        else:
            reach = np.nonzero(tpr >= target_sensitivity)[0]
            k = int(reach[0]) if len(reach) else len(thr) - 1
        out.append(float(thr[k]))
    method = "youden" if target_sensitivity is None else f"sensitivity>={target_sensitivity:g}"
    return out, method
