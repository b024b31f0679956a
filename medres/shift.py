"""Fail loudly on a new hospital: is a *folder* of scored files unlike the validation data, what are its
class priors, and how well is the model likely doing there — all without labels.

A per-image gate (gate.py) cannot see a shift in which every film still looks like a chest X-ray. A
folder can: following Rabanser, Günnemann & Lipton ("Failing loudly", NeurIPS 2019), two black-box
two-sample tests compare the scored files with the validation reference stored in the checkpoint:

- **KS per output**: a Kolmogorov–Smirnov test on each class's calibrated probability, Bonferroni-
  corrected over classes (it names the classes whose output distribution moved);
- **MMD on reduced features**: the penultimate (2048-d) features projected on the validation set's
  top principal components, an RBF-kernel maximum mean discrepancy (median-distance bandwidth) with a
  permutation test.

A shift is reported when either test's p-value is below α/2 (Bonferroni over the two). Then:

- **Class priors** of the new data by black-box shift estimation (BBSE, Lipton et al., ICML 2018; the
  soft-confusion variant): w = C⁻¹ μ, with C the validation confusion of calibrated probabilities and μ
  their mean on the new files (multiclass); the mean calibrated probability per label (multilabel).
- **Performance without labels**: accuracy by average thresholded confidence (ATC, Garg et al., ICLR
  2022: the confidence threshold at which validation's share above it equals its accuracy), and per
  class an expected AUROC from the calibrated probabilities (confidence-based performance estimation,
  as NannyML's CBPE), each with a bootstrap interval over the files.

These estimates assume the model's calibration transfers; under a real shift that is what is in doubt,
so they are hints, and `evaluate` prints them beside the real values so their error can be seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

PREFIX = "shift."
MIN_FILES = 50  # below this a folder-level test has too little power to say anything (docs/benchmarks.md)
ALPHA = 0.01
COMPONENTS = 16
MAX_REFERENCE = 1000


@dataclass
class ShiftReference:
    """What the checkpoint keeps of its validation split for the folder-level tests."""

    probs: np.ndarray  # (n, C) calibrated validation probabilities
    targets: np.ndarray  # (n, C) validation labels (NaN where masked)
    center: np.ndarray  # (D,) feature mean
    components: np.ndarray  # (k, D) principal axes of the validation features
    reduced: np.ndarray  # (n, k) validation features on them
    task: str
    atc_threshold: float | None  # multiclass: ATC's confidence threshold

    @classmethod
    def fit(cls, probs: np.ndarray, targets: np.ndarray, features: np.ndarray, task: str, *, k: int = COMPONENTS, seed: int = 0) -> "ShiftReference":
        probs, targets, features = np.asarray(probs, np.float64), np.asarray(targets, np.float32), np.asarray(features, np.float64)
        if len(probs) > MAX_REFERENCE:
            keep = np.sort(np.random.default_rng(seed).choice(len(probs), MAX_REFERENCE, replace=False))
            probs, targets, features = probs[keep], targets[keep], features[keep]
        center = features.mean(0)
        _, _, vt = np.linalg.svd(features - center, full_matrices=False)
        components = vt[: min(k, len(vt))]
        atc = None
        if task == "multiclass":
            correct = probs.argmax(1) == targets.argmax(1)
            atc = atc_threshold(probs.max(1), correct.mean())
        return cls(probs.astype(np.float32), targets, center.astype(np.float32), components.astype(np.float32),
                   ((features - center) @ components.T).astype(np.float32), task, atc)

    def reduce(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, np.float64) - self.center) @ self.components.T.astype(np.float64)).astype(np.float32)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))) for k in ("probs", "targets", "center", "components", "reduced")}

    def info(self) -> dict:
        return {"method": "ks+mmd", "n": int(len(self.probs)), "components": int(len(self.components)), "atc_threshold": self.atc_threshold,
                "min_files": MIN_FILES, "alpha": ALPHA}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], info: dict | None, task: str) -> "ShiftReference | None":
        if not info or PREFIX + "probs" not in tensors:
            return None
        get = lambda k: tensors[PREFIX + k].float().numpy()  # noqa: E731
        return cls(get("probs"), get("targets"), get("center"), get("components"), get("reduced"), task, info.get("atc_threshold"))


# --- the tests -------------------------------------------------------------------------------------
def ks_tests(ref: np.ndarray, new: np.ndarray) -> tuple[list[float], list[float]]:
    """Per column: (KS statistic, p-value) of reference vs new."""
    from scipy.stats import ks_2samp

    out = [ks_2samp(ref[:, j], new[:, j]) for j in range(ref.shape[1])]
    return [float(r.statistic) for r in out], [float(r.pvalue) for r in out]


def mmd_test(x: np.ndarray, y: np.ndarray, *, permutations: int = 500, seed: int = 0, max_rows: int = 500) -> tuple[float, float]:
    """(unbiased MMD², permutation p-value) with an RBF kernel at the median pairwise distance."""
    rng = np.random.default_rng(seed)
    x = x[rng.choice(len(x), max_rows, replace=False)] if len(x) > max_rows else x
    y = y[rng.choice(len(y), max_rows, replace=False)] if len(y) > max_rows else y
    z = np.concatenate([x, y]).astype(np.float64)
    sq = np.maximum((z * z).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2 * z @ z.T, 0)
    bandwidth = np.median(sq[np.triu_indices(len(z), 1)]) or 1.0
    kernel = np.exp(-sq / bandwidth)
    np.fill_diagonal(kernel, 0.0)
    n, m = len(x), len(y)
    # every permutation's statistic from one matrix product: with u the 0/1 indicator of the rows that
    # play x, Σxx = uᵀKu, Σxy = uᵀK1 − uᵀKu, Σyy = 1ᵀK1 − 2uᵀK1 + uᵀKu (K symmetric, zero diagonal)
    base = np.arange(n + m)
    orders = [base] + [rng.permutation(base) for _ in range(permutations)]
    u = np.zeros((len(orders), n + m))
    for row, order in zip(u, orders):
        row[order[:n]] = 1.0
    row_sums = kernel.sum(1)
    uku = np.einsum("pi,pi->p", u @ kernel, u)
    uk1 = u @ row_sums
    stats = uku / (n * (n - 1)) + (row_sums.sum() - 2 * uk1 + uku) / (m * (m - 1)) - 2 * (uk1 - uku) / (n * m)
    observed = stats[0]
    exceed = int((stats[1:] >= observed).sum())
    return float(observed), float((1 + exceed) / (1 + permutations))


# --- priors and performance without labels ---------------------------------------------------------
def bbse_priors(ref_probs: np.ndarray, ref_targets: np.ndarray, new_probs: np.ndarray) -> np.ndarray:
    """Class priors of the new data (multiclass), soft BBSE: solve C w = μ, q = w · p_val."""
    y = ref_targets.argmax(1)
    classes = ref_probs.shape[1]
    p_val = np.bincount(y, minlength=classes) / len(y)
    joint = np.stack([ref_probs[y == j].sum(0) / len(y) for j in range(classes)], axis=1)  # C[i, j] = E[p_i(x) 1{y=j}]
    mu = new_probs.mean(0)
    w = np.linalg.lstsq(joint, mu, rcond=None)[0] / np.maximum(p_val, 1e-12)
    q = np.clip(w, 0, None) * p_val
    return q / q.sum() if q.sum() > 0 else np.full(classes, 1 / classes)


def atc_threshold(confidence: np.ndarray, accuracy: float) -> float:
    """The threshold t with mean(confidence > t) = accuracy on validation."""
    return float(np.quantile(confidence, 1 - accuracy)) if len(confidence) else 0.5


def expected_auroc(p: np.ndarray) -> float:
    """AUROC expected when each case is positive with its calibrated probability p (ties count half):
    Σ_i p_i Σ_{j: p_j < p_i} (1 − p_j) over Σ_{i≠j} p_i (1 − p_j)."""
    p = np.asarray(p, np.float64)
    values, group = np.unique(p, return_inverse=True)
    pos = np.bincount(group, weights=p, minlength=len(values))  # Σ p per distinct value
    neg = np.bincount(group, weights=1 - p, minlength=len(values))
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # Σ (1 − p_j) over strictly smaller values
    self_pairs = (p * (1 - p)).sum()
    num = (pos * (below + 0.5 * neg)).sum() - 0.5 * self_pairs  # pairs within a tie count half; i = j not at all
    den = p.sum() * (1 - p).sum() - self_pairs
    return float(num / den) if den > 0 else float("nan")


def estimate_performance(ref: ShiftReference, probs: np.ndarray, classes: list[str], *, boot: int = 200, seed: int = 0) -> dict:
    """Accuracy (ATC; multiclass) and per-class expected AUROC (CBPE-style), with 95% bootstrap intervals."""
    rng = np.random.default_rng(seed)
    probs = np.asarray(probs, np.float64)
    idx = [rng.integers(0, len(probs), len(probs)) for _ in range(boot)]

    def interval(fn) -> dict:
        vals = [fn(probs[i]) for i in idx]
        vals = [v for v in vals if not math.isnan(v)]
        point = fn(probs)
        return {"estimate": point, "ci": [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if vals else None}

    out: dict = {"per_class_auroc": {c: interval(lambda p, j=j: expected_auroc(p[:, j])) for j, c in enumerate(classes)}}
    if ref.task == "multiclass" and ref.atc_threshold is not None:
        out["accuracy"] = interval(lambda p: float((p.max(1) > ref.atc_threshold).mean()))
        out["accuracy"]["method"] = "ATC (max calibrated probability)"
    return out


# --- the folder-level check --------------------------------------------------------------------------
def check(ref: ShiftReference, probs: np.ndarray, features: np.ndarray | None, classes: list[str], *, alpha: float = ALPHA,
          permutations: int = 500, seed: int = 0) -> dict:
    """Everything `shift.json` says about `probs` (N, C) (and reduced `features` (N, k)) of scored files."""
    probs = np.asarray(probs, np.float64)
    n = len(probs)
    result: dict = {"files": n, "reference_files": int(len(ref.probs)), "alpha": alpha, "min_files": MIN_FILES}
    if n < MIN_FILES:
        result.update(tested=False, reason=f"{n} files scored; the folder-level test needs at least {MIN_FILES}")
        return result
    stats, pvals = ks_tests(ref.probs.astype(np.float64), probs)
    adjusted = [min(1.0, p * len(classes)) for p in pvals]
    result["ks"] = {c: {"statistic": s, "p": p, "p_bonferroni": a} for c, s, p, a in zip(classes, stats, pvals, adjusted)}
    p_ks = min(adjusted)
    if features is not None and len(features) >= 2:
        mmd, p_mmd = mmd_test(ref.reduced.astype(np.float64), np.asarray(features, np.float64), permutations=permutations, seed=seed)
        result["mmd"] = {"mmd2": mmd, "p": p_mmd, "components": int(len(ref.components)), "permutations": permutations}
    else:
        p_mmd = 1.0
    tests = 2 if "mmd" in result else 1
    detected = bool(min(p_ks, p_mmd) < alpha / tests)
    moved = [c for c, a in zip(classes, adjusted) if a < alpha / tests]
    result.update(tested=True, detected=detected, p_min=float(min(p_ks, p_mmd)), moved_classes=moved)
    if ref.task == "multiclass":
        ref_targets = np.nan_to_num(ref.targets)
        priors = bbse_priors(ref.probs.astype(np.float64), ref_targets, probs)
        result["priors"] = {"method": "BBSE (soft confusion)", "new": dict(zip(classes, map(float, priors))),
                            "validation": dict(zip(classes, map(float, ref_targets.mean(0))))}
    else:
        result["priors"] = {"method": "mean calibrated probability", "new": dict(zip(classes, map(float, probs.mean(0)))),
                            "validation": dict(zip(classes, map(float, np.nanmean(ref.targets, 0))))}
    result["estimated_performance"] = estimate_performance(ref, probs, classes, seed=seed)
    result["guarantees_hold"] = not detected
    if detected:
        result["warning"] = warning(result)
    return result


def warning(result: dict) -> str:
    moved = ", ".join(result["moved_classes"]) or "the features (MMD) only"
    return (f"dataset shift detected on {result['files']} files (p = {result['p_min']:.2g} < {result['alpha']:g}; outputs moved: {moved}): "
            "the conformal sets' coverage and the operating points' sensitivity/specificity were fitted on validation data "
            "and are not guaranteed for these files; check a labelled sample before relying on them")


def summary_line(result: dict) -> str:
    if not result.get("tested"):
        return f"shift: not tested ({result.get('reason')})"
    est = result.get("estimated_performance", {})
    acc = est.get("accuracy")
    acc_text = f"; estimated accuracy {acc['estimate']:.2f} ({acc['ci'][0]:.2f}–{acc['ci'][1]:.2f})" if acc and acc.get("ci") else ""
    verdict = "SHIFT DETECTED" if result["detected"] else "no shift detected"
    return f"shift: {verdict} vs validation (p = {result['p_min']:.2g}, {result['files']} files){acc_text}"


class ShiftMonitor:
    """Collects the calibrated probabilities and reduced features of scored files; `window` > 0 also
    tests each consecutive block of exactly `window` files (long runs and streams) as it completes."""

    def __init__(self, ref: ShiftReference, classes: list[str], *, window: int = 0):
        self.ref, self.classes, self.window = ref, classes, window
        self.probs: list[np.ndarray] = []
        self.feats: list[np.ndarray] = []
        self.windows: list[dict] = []
        self._seen = 0  # files added so far
        self._open: list[tuple[np.ndarray, np.ndarray | None]] = []  # the current window's batches only

    def add(self, probs: np.ndarray, features: np.ndarray | None) -> None:
        if len(probs) == 0:
            return
        probs = np.asarray(probs, np.float32)
        reduced = self.ref.reduce(features) if features is not None else None
        self.probs.append(probs)
        if reduced is not None:
            self.feats.append(reduced)
        self._seen += len(probs)
        if self.window:
            self._open.append((probs, reduced))
            self._test_full_windows()

    def _test_full_windows(self) -> None:
        """Test each complete block of `window` files; only the open window's rows are concatenated, so a
        long run costs O(files), not O(files²)."""
        pending = sum(len(p) for p, _ in self._open)
        while pending >= self.window:
            p = np.concatenate([b[0] for b in self._open])
            f = np.concatenate([b[1] for b in self._open]) if all(b[1] is not None for b in self._open) else None
            w = check(self.ref, p[: self.window], None if f is None else f[: self.window], self.classes, permutations=200)
            end = self._seen - pending + self.window
            w["ending_at_file"] = end
            self.windows.append(w)
            if w.get("detected"):
                import logging

                logging.getLogger(__name__).warning("files %d–%d: %s", end - self.window + 1, end, w["warning"])
            rest = (p[self.window:], None if f is None else f[self.window:])
            self._open = [rest] if len(rest[0]) else []
            pending -= self.window

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        p = np.concatenate(self.probs) if self.probs else np.zeros((0, len(self.classes)), np.float32)
        f = np.concatenate(self.feats) if self.feats and sum(map(len, self.feats)) == len(p) else None
        return p, f

    def result(self) -> dict:
        p, f = self._arrays()
        out = check(self.ref, p, f, self.classes)
        if self.window:
            out["window"] = self.window
            out["windows"] = self.windows
        return out


def monitor_for(checkpoint, meta, scorer, *, window: int = 0) -> ShiftMonitor | None:
    """The shift monitor `predict` and `report` feed, or None when the checkpoint has no reference (older
    than this test: `medres calibrate` adds it) or the scorer returns no features (an old ONNX file)."""
    import logging
    from pathlib import Path

    ref = load_reference(checkpoint, meta)
    if ref is None:
        logging.getLogger(__name__).info("%s has no shift reference: run medres calibrate to add one", Path(checkpoint).name)
        return None
    if "features" not in getattr(scorer, "outputs", ["features"]):
        return None
    return ShiftMonitor(ref, meta.classes, window=window)


def load_reference(path, meta) -> ShiftReference | None:
    """The checkpoint's shift reference, or None (trained before it existed: `medres calibrate` adds it)."""
    from medres.model import read_extra

    info = getattr(meta, "shift", None)
    if not info:
        return None
    return ShiftReference.from_checkpoint(read_extra(path, PREFIX), info, meta.task)
