"""Patient-grouped, label-stratified, seeded splits and the leakage audit."""

from __future__ import annotations

import numpy as np
import pandas as pd

from medres.data.manifest import Manifest
from medres.errors import LeakageDetected, ManifestInvalid


# How archives name their splits (MIMIC-CXR: validate; CheXpert: valid).
_OFFICIAL = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test", "": ""}


def assign_splits(manifest: Manifest, *, val_fraction: float, test_fraction: float, seed: int, group_by: str = "patient_id",
                  split_column: str | None = None) -> np.ndarray:
    """Return an array of 'train'/'val'/'test'. An explicit `split` column wins.

    Patients are grouped (all images of a patient share a split), stratified by each patient's
    rarest label, shuffled with `seed`, and allocated per stratum so every class reaches every
    split when it has enough patients.

    `split_column` (an archive's official split, `data.split_column`): its val and test rows stay
    where the archive put them; its train (and blank) rows lend `val_fraction` of their patients to val
    when the archive has no val rows, and `test_fraction` to test when it has no test rows.
    """
    if split_column:
        return _official_splits(manifest, split_column, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, group_by=group_by)
    df = manifest.frame
    if "split" in df.columns and (df["split"] != "").all():
        return df["split"].to_numpy(dtype=object)
    if group_by not in df.columns:
        raise ManifestInvalid(f"{manifest.source}: data.group_by column {group_by!r} not in the manifest")
    groups = df[group_by].to_numpy()
    rng = np.random.default_rng(seed)
    prevalence = np.nansum(manifest.targets, 0) + 1e-9
    # Each patient's stratum: its rarest positive class (or "none").
    strata: dict[str, int] = {}
    for g, y in zip(groups, manifest.targets):
        pos = np.nonzero(y > 0)[0]
        s = int(pos[np.argmin(prevalence[pos])]) if len(pos) else -1
        prev = strata.get(g)
        if prev is None or (s >= 0 and (prev < 0 or prevalence[s] < prevalence[prev])):
            strata[g] = s
    split_of: dict[str, str] = {}
    for stratum in sorted(set(strata.values())):
        patients = sorted(p for p, s in strata.items() if s == stratum)
        rng.shuffle(patients)
        n = len(patients)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_test = max(n_test, 1) if test_fraction > 0 else 0
            n_val = max(n_val, 1) if val_fraction > 0 else 0
        for i, p in enumerate(patients):
            split_of[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    out = np.array([split_of[g] for g in groups], dtype=object)
    if "split" in df.columns:  # partially filled column: explicit values win
        explicit = df["split"].to_numpy(dtype=object)
        out = np.where(explicit != "", explicit, out)
    return out


def _official_splits(manifest: Manifest, column: str, *, val_fraction: float, test_fraction: float, seed: int, group_by: str) -> np.ndarray:
    if column not in manifest.frame.columns:
        raise ManifestInvalid(f"{manifest.source}: data.split_column {column!r} is not a column of the manifest")
    raw = manifest.frame[column].astype(str).str.strip().str.lower()
    unknown = sorted(set(raw) - set(_OFFICIAL))
    if unknown:
        raise ManifestInvalid(f"{manifest.source}: column {column!r} has {unknown[0]!r}; use train, val (valid, validate) or test")
    official = raw.map(_OFFICIAL).to_numpy(dtype=object)
    pool = (official == "train") | (official == "")
    has_val, has_test = (official == "val").any(), (official == "test").any()
    out = official.copy()
    if pool.any():
        sub = manifest.subset(pool)
        sub.frame = sub.frame.drop(columns=["split"], errors="ignore")
        out[pool] = assign_splits(sub, val_fraction=0.0 if has_val else val_fraction, test_fraction=0.0 if has_test else test_fraction,
                                  seed=seed, group_by=group_by)
    return out


def audit_leakage(manifest: Manifest, splits: np.ndarray, *, group_by: str = "patient_id", digests: list[str] | None = None, allow: bool = False) -> list[str]:
    """Find a patient (or identical pixel content, via `digests`) in two splits. Raises unless `allow`."""
    findings: list[str] = []
    df = pd.DataFrame({"g": manifest.frame[group_by].to_numpy(), "s": splits})
    per_group = df.groupby("g")["s"].nunique()
    crossing = per_group[per_group > 1].index.tolist()
    if crossing:
        findings.append(f"{len(crossing)} {group_by} value(s) appear in more than one split (e.g. {crossing[0]})")
    if digests is not None:
        d = pd.DataFrame({"d": digests, "s": splits, "p": manifest.frame["path"].to_numpy()})
        per_digest = d.groupby("d")["s"].nunique()
        dup = per_digest[per_digest > 1].index.tolist()
        if dup:
            example = d[d["d"] == dup[0]]["p"].tolist()[:2]
            findings.append(f"{len(dup)} identical file(s) appear in more than one split (e.g. {' and '.join(example)})")
    if findings and not allow:
        raise LeakageDetected("; ".join(findings) + " — fix the manifest or set data.allow_leakage=true")
    return findings


def splits_frame(manifest: Manifest, splits: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"path": manifest.frame["path"], "patient_id": manifest.frame["patient_id"], "split": splits})
