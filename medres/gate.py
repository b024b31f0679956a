"""The input gate of `predict` and `report`: should the model answer for this file at all?

Two independent checks, both stored in the checkpoint so scoring needs nothing else:

- **What the file says.** DICOM header tags (Modality, BodyPartExamined, ViewPosition) against
  expectations: by default the values the training images had; `--expect view=PA,AP` overrides one
  key, `--expect view=*` switches it off. A contradicting tag → status `rejected` with
  UNEXPECTED_MODALITY / UNEXPECTED_BODY_PART / UNEXPECTED_VIEW. An absent tag never rejects (PNG and
  JPEG inputs have none).
- **What the pixels say.** Class-conditional Mahalanobis distance with one shared covariance on the
  penultimate (pooled 2048-d) features (Lee et al., NeurIPS 2018, "A simple unified framework for
  detecting out-of-distribution samples"), the covariance shrunk by Ledoit–Wolf (scikit-learn's
  `LedoitWolf`) because a few hundred images cannot pin down 2048² entries. Fitted on the training
  split; the threshold is a quantile (default 99%) of the validation split's scores, so about 1% of
  in-distribution images are flagged by construction. The score is the smallest squared distance to
  a class mean, divided by the feature dimension (≈ 1 for typical in-distribution images).

An OOD score is a screen, not a guarantee: it flags images unlike the training set's features; an
image the network maps near a class mean passes, whatever it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medres.errors import OutOfDistribution, UnexpectedBodyPart, UnexpectedModality, UnexpectedView, UsageError
from medres.io.record import clean_code_string

# Gated header key (a Record attribute) → its code. Laterality is recorded but never gated (a chest
# film's laterality is not a property of the task).
GATED = {"modality": UnexpectedModality.code, "body_part": UnexpectedBodyPart.code, "view": UnexpectedView.code}
OOD_CODE = OutOfDistribution.code
OOD_PREFIX = "ood."
# Computed and digital radiography: the same projection image from two detector technologies.
PROJECTION_RADIOGRAPHY = {"CR", "DX"}  # checkpoint tensors of the detector, beside the model's own


# --- header expectations ---------------------------------------------------------------------------
def parse_expect(items: list[str] | None) -> dict[str, list[str] | None]:
    """`["view=PA,AP", "modality=*"]` → {"view": ["PA", "AP"], "modality": None (off)}."""
    out: dict[str, list[str] | None] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or key not in GATED:
            raise UsageError(f"--expect expects KEY=V1,V2 with KEY one of {', '.join(GATED)}, got {item!r}")
        vals = [clean_code_string(v) for v in values.split(",")]
        if values.strip() == "*":
            out[key] = None
        elif not all(vals):
            raise UsageError(f"--expect {key}: give one or more values (or * for any), got {values!r}")
        else:
            out[key] = sorted(set(vals))
    return out


def resolve_expect(stored: dict | None, overrides: dict[str, list[str] | None]) -> dict[str, list[str]]:
    """The checkpoint's expectations with the command line's overrides; keys switched off dropped."""
    merged = {k: list(v) for k, v in (stored or {}).items() if v}
    for k, v in overrides.items():
        if v is None:
            merged.pop(k, None)
        else:
            merged[k] = v
    return merged


def header_profile(headers: list[dict]) -> dict[str, list[str]]:
    """Expectations learnt from the training images' headers: every value seen, per gated key (CR and DX
    count as one modality). Keys no training image carried are left out (so PNG/JPEG training sets
    expect nothing)."""
    seen: dict[str, set[str]] = {k: set() for k in GATED}
    for h in headers:
        for k in GATED:
            if h.get(k):
                seen[k].add(h[k])
    if seen["modality"] & PROJECTION_RADIOGRAPHY:  # CR and DX are one kind of image: a CR-trained model is not refused a DX film
        seen["modality"] |= PROJECTION_RADIOGRAPHY
    return {k: sorted(v) for k, v in seen.items() if v}


def check_header(header: dict, expect: dict[str, list[str]]) -> tuple[str, str] | None:
    """(code, message) for the first expectation the header contradicts; None when none does."""
    for key, allowed in expect.items():
        value = header.get(key)
        if value and value not in allowed:
            return GATED[key], f"{key} {value} is not one of the expected {', '.join(allowed)} (--expect {key}=... to change)"
    return None


def ood_refusal(path: str, score: float, threshold: float) -> str:
    """The one-line message of a file `--gate reject` refuses."""
    return f"[{OOD_CODE}] {path}: OOD score {score:.3f} > threshold {threshold:.3f}"


# --- out-of-distribution score ---------------------------------------------------------------------
@dataclass
class OodDetector:
    means: np.ndarray  # (K, D) class means (K = 1 for multilabel)
    precision: np.ndarray  # (D, D) shrunk inverse covariance
    threshold: float
    quantile: float
    n_train: int
    n_val: int
    shrinkage: float

    @classmethod
    def fit(cls, train_features: np.ndarray, train_labels: np.ndarray | None, val_features: np.ndarray, *, quantile: float = 0.99) -> "OodDetector":
        """`train_labels`: class index per row (multiclass) or None (one Gaussian, multilabel)."""
        from sklearn.covariance import LedoitWolf

        f = np.asarray(train_features, dtype=np.float64)
        labels = np.zeros(len(f), dtype=int) if train_labels is None else np.asarray(train_labels)
        classes = [k for k in np.unique(labels)]
        means = np.stack([f[labels == k].mean(0) for k in classes])
        centred = f - means[np.searchsorted(classes, labels)]
        lw = LedoitWolf(assume_centered=True).fit(centred)
        det = cls(means.astype(np.float32), lw.precision_.astype(np.float32), 0.0, quantile, len(f), len(val_features), float(lw.shrinkage_))
        val = det.score(val_features)
        det.threshold = float(np.quantile(val, quantile)) if len(val) else float(np.quantile(det.score(f), quantile))
        return det

    def score(self, features: np.ndarray) -> np.ndarray:
        """Smallest squared Mahalanobis distance to a class mean, divided by the dimension."""
        # fPf − 2 fPμ + μPμ: one (B, D) × (D, D) product for all classes. In float64, because in float32
        # the terms' cancellation moved a file's score with the batch it was scored in.
        f = torch.as_tensor(np.asarray(features, dtype=np.float64))
        p, mu = self._p64, self._mu64
        fp = f @ p
        d = (fp * f).sum(1, keepdim=True) - 2 * fp @ mu.T + self._mpm[None, :]
        return (d.min(1).values.clamp_min(0) / f.shape[1]).numpy()

    def __post_init__(self) -> None:
        self._p64 = torch.from_numpy(np.asarray(self.precision, dtype=np.float64))
        self._mu64 = torch.from_numpy(np.asarray(self.means, dtype=np.float64))
        self._mpm = ((self._mu64 @ self._p64) * self._mu64).sum(1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {OOD_PREFIX + "means": torch.from_numpy(self.means), OOD_PREFIX + "precision": torch.from_numpy(self.precision)}

    def info(self) -> dict:
        return {"method": "mahalanobis-ledoitwolf", "threshold": self.threshold, "quantile": self.quantile,
                "n_train": self.n_train, "n_val": self.n_val, "shrinkage": self.shrinkage, "dim": int(self.means.shape[1])}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], info: dict | None) -> "OodDetector | None":
        if not info or OOD_PREFIX + "means" not in tensors:
            return None
        return cls(tensors[OOD_PREFIX + "means"].float().numpy(), tensors[OOD_PREFIX + "precision"].float().numpy(),
                   float(info["threshold"]), float(info["quantile"]), int(info["n_train"]), int(info["n_val"]), float(info.get("shrinkage", 0.0)))
