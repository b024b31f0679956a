"""Split conformal prediction sets: a set of labels that holds the true one with a stated coverage.

Calibrated on the validation split (exchangeable with new data from the same source), stored in the
checkpoint, applied by `predict`/`report`, checked by `evaluate` on the test split.

- Multiclass **APS** (adaptive prediction sets; Romano, Sesia & Candès, NeurIPS 2020) with the
  randomisation fixed at U = 0, so the same image always gets the same set: the score of a label is
  the probability mass of the labels ranked above it; the set keeps labels in rank order while that
  mass is ≤ q̂ (the top label, score 0, always). Sets grow where the model is unsure. (The inclusive
  variant, U = 1, gives score 1.0 to every last-ranked label and over-covers badly with few classes.)
- Multiclass **LAC** (least ambiguous set-valued classifier; Sadinle, Lei & Wasserman, JASA 2019):
  score 1 − p(true label); the set is every label with p ≥ 1 − q̂ (smallest sets on average, may be
  empty).
- Multilabel: one LAC threshold per label, fitted on that label's positive validation images, so each
  label is in the set for ≥ coverage of the images that have it (label-conditional coverage).

q̂ is the ⌈(n+1)(1−α)⌉/n empirical quantile of the n validation scores ("higher" interpolation), which
gives P(true label ∈ set) ≥ 1 − α over exchangeable draws (Vovk et al. 2005; Angelopoulos & Bates,
"A gentle introduction to conformal prediction", 2021, §1). With n < 1/α − 1 the quantile is +∞ and
every set holds every label: too few validation images to promise anything smaller.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("aps", "lac")


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The finite-sample-corrected (1 − α) quantile of calibration scores (+inf when n is too small)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    k = math.ceil((n + 1) * coverage)
    if n == 0 or k > n:
        return math.inf
    return float(np.sort(scores)[k - 1])


def _aps_scores(probs: np.ndarray) -> np.ndarray:
    """(N, C) → (N, C): for each label, the mass of the labels ranked above it (ties by index)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    cum = np.cumsum(ranked, axis=1) - ranked
    out = np.empty_like(cum)
    np.put_along_axis(out, order, cum, axis=1)
    return out


def label_scores(probs: np.ndarray, method: str) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return _aps_scores(probs) if method == "aps" else 1.0 - probs


def fit(probs: np.ndarray, y: np.ndarray, task: str, *, coverage: float = 0.9, method: str = "aps") -> dict:
    """Calibrate on validation probabilities (already temperature-scaled) and one-hot/multi-hot `y`."""
    if method not in METHODS:
        raise ValueError(f"conformal method must be one of {METHODS}, got {method!r}")
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    if task == "multiclass":
        s = label_scores(probs, method)[np.arange(len(y)), y.argmax(1)]
        q = conformal_quantile(s, coverage)
        return {"method": method, "coverage": coverage, "n": int(len(y)), "qhat": None if math.isinf(q) else q}
    qs = [conformal_quantile(1.0 - probs[y[:, j] == 1, j], coverage) for j in range(y.shape[1])]
    # y == 1 leaves masked (NaN) labels out: a label's threshold is fitted on its labelled positives only
    return {"method": "lac-per-label", "coverage": coverage, "n": [int(v) for v in (y == 1).sum(0)], "qhat": [None if math.isinf(q) else q for q in qs]}


def sets(probs: np.ndarray, conformal: dict, task: str) -> np.ndarray:
    """(N, C) boolean membership of each label in each image's prediction set."""
    probs = np.asarray(probs, dtype=np.float64)
    if task == "multiclass":
        q = conformal["qhat"]
        if q is None:
            return np.ones(probs.shape, dtype=bool)
        method = conformal["method"]
        return label_scores(probs, method) <= q + 1e-12
    q = np.array([np.inf if v is None else v for v in conformal["qhat"]])
    return (1.0 - probs) <= q[None, :] + 1e-12


def ordered_set(probs: np.ndarray, member: np.ndarray, classes: list[str]) -> list[str]:
    """One image's set as class names, most probable first (what predict writes and the report shows)."""
    return [classes[j] for j in np.argsort(-np.asarray(probs), kind="stable") if member[j]]


def covered(member: np.ndarray, y: np.ndarray, task: str) -> np.ndarray:
    """Per image: is the true label in the set (multiclass); per image × label for positives
    (multilabel, NaN where the label is absent)."""
    y = np.asarray(y)
    if task == "multiclass":
        return member[np.arange(len(y)), y.argmax(1)]
    return np.where(y == 1, member, np.nan)


def coverage_tolerance(coverage: float, n_cal: int, n_test: int) -> float:
    """How far below the target a test split's empirical coverage may fall by chance alone: the
    calibration draw moves the realised coverage by about sqrt(a(1-a)/(n_cal+2)) (it is
    Beta(k, n_cal+1-k) distributed, Angelopoulos & Bates §3.2), and the test split's own sampling by
    sqrt(a(1-a)/n_test); 2.5 standard deviations of both (a one-sided false alarm rate of about 1% for
    a normal law; measured 1.5–2.5% on exchangeable synthetic data (tests/test_conformal.py), the
    calibration law being skewed)."""
    a = coverage * (1 - coverage)
    var = a / (max(n_cal, 1) + 2) + a / max(n_test, 1)
    return 2.5 * math.sqrt(var)
