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

- **Which way up.** A rotated, upside-down or grey-level-inverted film still looks like a chest X-ray
  to a distance on features. So at the end of training medres learns, from the training images
  themselves and without any extra label, which of the 8 transforms (4 rotations × as is / inverted) a
  film has undergone: a logistic regression on the same pooled features (`OrientationCheck`). A film
  whose most likely transform is not "as trained" and whose "as trained" probability is below the
  1st percentile of the validation films' is marked ROTATED or INVERTED.

An OOD score is a screen, not a guarantee: it flags images unlike the training set's features; an
image the network maps near a class mean passes, whatever it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medres.errors import Inverted, OutOfDistribution, Rotated, UnexpectedBodyPart, UnexpectedModality, UnexpectedView, UsageError
from medres.io.record import clean_code_string

# Gated header key (a Record attribute) → its code. Laterality is recorded but never gated (a chest
# film's laterality is not a property of the task).
GATED = {"modality": UnexpectedModality.code, "body_part": UnexpectedBodyPart.code, "view": UnexpectedView.code}
OOD_CODE = OutOfDistribution.code
OOD_PREFIX = "ood."
ORIENT_PREFIX = OOD_PREFIX + "orient."
# The 8 transforms the orientation check tells apart: (quarter turns counter-clockwise, inverted).
TRANSFORMS = [(k, inv) for inv in (False, True) for k in range(4)]
ORIENTATION_IMAGES = 512  # training films the orientation check is fitted on (eval.orientation_images)
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


# What a chest X-ray model expects of a DICOM when its training images carried no header (PNG/JPEG sets):
# projection radiography of the chest. A CT or MR file is then refused by its header.
CHEST_RADIOGRAPHY = {"modality": sorted(PROJECTION_RADIOGRAPHY), "body_part": ["CHEST"]}


def header_profile(headers: list[dict]) -> dict[str, list[str]]:
    """Expectations learnt from the training images' headers: every value seen, per gated key (CR and DX
    count as one modality). Modality and body part no training image carried default to chest projection
    radiography (CHEST_RADIOGRAPHY); a view no image carried is not expected (`--expect` overrides all)."""
    seen: dict[str, set[str]] = {k: set() for k in GATED}
    for h in headers:
        for k in GATED:
            if h.get(k):
                seen[k].add(h[k])
    if seen["modality"] & PROJECTION_RADIOGRAPHY:  # CR and DX are one kind of image: a CR-trained model is not refused a DX film
        seen["modality"] |= PROJECTION_RADIOGRAPHY
    seen["modality"] = seen["modality"] or set(CHEST_RADIOGRAPHY["modality"])
    if seen["modality"] <= PROJECTION_RADIOGRAPHY:  # a chest X-ray model; another modality's body part is not guessed
        seen["body_part"] = seen["body_part"] or set(CHEST_RADIOGRAPHY["body_part"])
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
    orientation: "OrientationCheck | None" = None

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
        out = {OOD_PREFIX + "means": torch.from_numpy(self.means), OOD_PREFIX + "precision": torch.from_numpy(self.precision)}
        return {**out, **(self.orientation.tensors() if self.orientation else {})}

    def info(self) -> dict:
        return {"method": "mahalanobis-ledoitwolf", "threshold": self.threshold, "quantile": self.quantile,
                "n_train": self.n_train, "n_val": self.n_val, "shrinkage": self.shrinkage, "dim": int(self.means.shape[1]),
                **({"orientation": self.orientation.info()} if self.orientation else {})}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], info: dict | None) -> "OodDetector | None":
        if not info or OOD_PREFIX + "means" not in tensors:
            return None
        return cls(tensors[OOD_PREFIX + "means"].float().numpy(), tensors[OOD_PREFIX + "precision"].float().numpy(),
                   float(info["threshold"]), float(info["quantile"]), int(info["n_train"]), int(info["n_val"]), float(info.get("shrinkage", 0.0)),
                   OrientationCheck.from_checkpoint(tensors, info.get("orientation")))


# --- orientation and polarity ------------------------------------------------------------------------
def transformed(x: torch.Tensor, k: int, inverted: bool) -> torch.Tensor:
    """(B, S, S) pixels in [0, 1], turned `k` quarter turns counter-clockwise and/or grey-inverted. The
    inversion spares the letterbox padding (rows and columns of zeros at the edges), as a film inverted
    before it was letterboxed — a MONOCHROME1 mistake in an export — looks."""
    x = torch.rot90(x, k, dims=(1, 2)) if k else x
    if not inverted:
        return x
    rows, cols = (x > 0).any(2), (x > 0).any(1)  # (B, S) each

    def span(m: torch.Tensor) -> torch.Tensor:  # True from the first to the last True, per row
        return torch.cummax(m.int(), 1).values.bool() & torch.cummax(m.flip(1).int(), 1).values.flip(1).bool()

    content = span(rows)[:, :, None] & span(cols)[:, None, :]
    return torch.where(content, 1.0 - x, x)


def transform_label(k: int, inverted: bool) -> str:
    turn = f"rotated {90 * k}" if k else ""
    return " + ".join(p for p in (turn, "inverted" if inverted else "") if p) or "as trained"


@dataclass
class OrientationCheck:
    """Multinomial logistic regression from pooled features to the 8 transforms (TRANSFORMS), fitted on
    transformed training films; `threshold`: the 1st percentile of P(as trained) on validation films."""

    mean: np.ndarray  # (D,) feature standardisation
    scale: np.ndarray  # (D,)
    coef: np.ndarray  # (8, D)
    intercept: np.ndarray  # (8,)
    threshold: float
    n_train: int
    train_accuracy: float

    @classmethod
    def fit(cls, features_by_transform: list[np.ndarray], val_features: np.ndarray, *, quantile: float = 0.01, seed: int = 0) -> "OrientationCheck":
        from sklearn.linear_model import LogisticRegression

        x = np.concatenate(features_by_transform).astype(np.float64)
        y = np.concatenate([np.full(len(f), t) for t, f in enumerate(features_by_transform)])
        mean, scale = x.mean(0), x.std(0) + 1e-6
        # C = 1 and 512 films: measured on real films (bench/shift.py; docs/benchmarks.md): 128 films or a
        # stronger penalty flagged a third to two thirds of turned films at the same 2% false flags
        clf = LogisticRegression(max_iter=1000, C=1.0, random_state=seed).fit((x - mean) / scale, y)
        check = cls(mean.astype(np.float32), scale.astype(np.float32), clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32), 0.0,
                    len(features_by_transform[0]), float(clf.score((x - mean) / scale, y)))
        as_trained = check.probabilities(val_features if len(val_features) else features_by_transform[0])[:, 0]
        check.threshold = float(np.quantile(as_trained, quantile))
        return check

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.scale @ self.coef.T.astype(np.float64) + self.intercept
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def judge(self, features: np.ndarray) -> list[tuple[str | None, str]]:
        """Per film: (code or None, what it looks like: 'as trained', 'rotated 90', 'inverted', ...)."""
        out = []
        inverted_mask = np.array([inv for _, inv in TRANSFORMS])
        turns = np.array([k for k, _ in TRANSFORMS])
        for p in self.probabilities(features):
            # polarity and rotation decided on their marginals (a near-symmetric film confuses 0° with 180°
            # more than it confuses the grey scale)
            inv = bool(p[inverted_mask].sum() > 0.5)
            k = int(np.argmax([p[turns == t].sum() for t in range(4)]))
            if (k == 0 and not inv) or p[0] >= self.threshold:
                out.append((None, "as trained"))
            else:
                out.append((Inverted.code if inv else Rotated.code, transform_label(k, inv)))
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {ORIENT_PREFIX + k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))) for k in ("mean", "scale", "coef", "intercept")}

    def info(self) -> dict:
        return {"method": "logistic regression on pooled features, 4 rotations x inversion", "threshold": self.threshold, "n_train": self.n_train,
                "train_accuracy": self.train_accuracy}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], info: dict | None) -> "OrientationCheck | None":
        if not info or ORIENT_PREFIX + "coef" not in tensors:
            return None
        get = lambda k: tensors[ORIENT_PREFIX + k].float().numpy()  # noqa: E731
        return cls(get("mean"), get("scale"), get("coef"), get("intercept"), float(info["threshold"]), int(info["n_train"]), float(info.get("train_accuracy", 0)))


# --- one verdict per scored film ---------------------------------------------------------------------
@dataclass
class Verdict:
    """What the pixel checks say about one scored film: its OOD score, whether it is in distribution,
    what way up it looks, and — under `--gate reject` — the refusal (code, one-line message)."""

    ood_score: float | None = None
    in_distribution: bool | None = None
    orientation: str = ""
    refusal: tuple[str, str] | None = None

    @property
    def flagged(self) -> bool:
        """Out of distribution, or not the way up the training films were: what `--gate reject` refuses."""
        return flagged(self.in_distribution, self.orientation)


def flagged(in_distribution: bool | None, orientation: str) -> bool:
    return in_distribution is False or orientation not in ("", "as trained")


def verdicts(shown: list[str], ood: np.ndarray | None, orientation: list[tuple[str | None, str]] | None, detector: "OodDetector | None", gate: str) -> list[Verdict]:
    """The one place `predict` and `report` turn a batch's gate scores into per-film verdicts."""
    out = []
    for i, path in enumerate(shown):
        v = Verdict()
        code = None
        if orientation is not None:
            code, v.orientation = orientation[i]
        if ood is not None and detector is not None:
            v.ood_score = float(ood[i])
            v.in_distribution = v.ood_score <= detector.threshold
            if gate == "reject" and not v.in_distribution:
                # far from every training film: the orientation guess is only a hint then
                hint = f" (it looks {v.orientation})" if code else ""
                v.refusal = (OOD_CODE, ood_refusal(path, v.ood_score, detector.threshold) + hint)
        if code and gate == "reject" and v.refusal is None:  # a chest film, the wrong way up or inverted
            v.refusal = (code, f"[{code}] {path}: the film looks {v.orientation} against the training images")
        out.append(v)
    return out
