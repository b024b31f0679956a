"""The CSV manifest: schema, validation, folder scan.

Columns: `path` (relative to the manifest's folder or `data.root`), and labels as `label`
(multiclass), `labels` (`a|b`, multilabel) or one 0/1 column per class; `patient_id`; optional
`split` (train/val/test); every other column is kept for subgroup analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medres.errors import ManifestInvalid, PathOutsideRoot
from medres.files import resolve_under_root

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ""}
SPLITS = ("train", "val", "test")


@dataclass
class Manifest:
    """A validated manifest: `frame` has `path`, `patient_id`, optional `split` and extra columns;
    `targets` is (N, C) float32 — one-hot for multiclass, 0/1 for multilabel."""

    frame: pd.DataFrame
    targets: np.ndarray
    classes: list[str]
    task: str
    root: Path
    source: str

    def __len__(self) -> int:
        return len(self.frame)

    def absolute(self, i: int) -> Path:
        return resolve_under_root(self.root, self.frame["path"].iloc[i])

    def subset(self, mask: np.ndarray) -> "Manifest":
        return Manifest(self.frame[mask].reset_index(drop=True), self.targets[mask], self.classes, self.task, self.root, self.source)


def read_csv(path: Path) -> pd.DataFrame:
    if not Path(path).is_file():
        raise ManifestInvalid(f"manifest not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ManifestInvalid(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    if "path" not in df.columns:
        raise ManifestInvalid(f"{path}: missing column 'path' (columns: {', '.join(df.columns)})")
    if len(df) == 0:
        raise ManifestInvalid(f"{path}: the manifest is empty")
    return df


def infer_classes(df: pd.DataFrame, task: str) -> list[str]:
    if "label" in df.columns:
        return sorted({v.strip() for v in df["label"] if v.strip()})
    if "labels" in df.columns:
        return sorted({p.strip() for v in df["labels"] for p in v.split("|") if p.strip()})
    raise ManifestInvalid("no label column: use 'label', 'labels' or one 0/1 column per class with data.classes set")


def load_manifest(
    path: str | Path,
    *,
    classes: list[str] | None = None,
    task: str = "multiclass",
    root: str | Path | None = None,
    require_labels: bool = True,
) -> Manifest:
    path = Path(path)
    df = read_csv(path)
    src = str(path)
    root = Path(root) if root is not None else path.resolve().parent
    df["path"] = df["path"].astype(str)
    empty = df.index[df["path"].str.strip() == ""].tolist()
    if empty:
        raise ManifestInvalid(f"{src}: column 'path' is empty on row {empty[0] + 2}")
    if "patient_id" not in df.columns:
        # Without patient ids every image is its own patient; splits cannot group a patient's images.
        df["patient_id"] = [f"image-{i}" for i in range(len(df))]
        df.attrs["patient_id_missing"] = True
    else:
        blank = df.index[df["patient_id"].str.strip() == ""].tolist()
        if blank:
            raise ManifestInvalid(f"{src}: column 'patient_id' is empty on row {blank[0] + 2}")
    if "split" in df.columns:
        bad = sorted(set(df["split"]) - set(SPLITS) - {""})
        if bad:
            raise ManifestInvalid(f"{src}: column 'split' has {bad[0]!r}; use train, val or test")
    if not require_labels:
        targets = np.zeros((len(df), len(classes or [])), dtype=np.float32)
        return Manifest(df.reset_index(drop=True), targets, list(classes or []), task, root, src)
    classes = list(classes) if classes else infer_classes(df, task)
    if not classes:
        raise ManifestInvalid(f"{src}: no classes found")
    targets = _targets(df, classes, task, src)
    return Manifest(df.reset_index(drop=True), targets, classes, task, root, src)


def _targets(df: pd.DataFrame, classes: list[str], task: str, src: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(df), len(classes)), dtype=np.float32)
    if "label" in df.columns and task == "multiclass":
        for row, value in enumerate(df["label"]):
            value = value.strip()
            if value.lower() in ("", "nan", "none", "null"):
                raise ManifestInvalid(f"{src}: column 'label' is empty or NaN on row {row + 2}")
            if value not in index:
                raise ManifestInvalid(f"{src}: column 'label' has unknown class {value!r} on row {row + 2} (classes: {', '.join(classes)})")
            y[row, index[value]] = 1.0
        return y
    if "labels" in df.columns:
        for row, value in enumerate(df["labels"]):
            if value.strip().lower() in ("nan", "none", "null"):
                raise ManifestInvalid(f"{src}: column 'labels' is NaN on row {row + 2}")
            for part in (p.strip() for p in value.split("|")):
                if not part:
                    continue
                if part not in index:
                    raise ManifestInvalid(f"{src}: column 'labels' has unknown class {part!r} on row {row + 2}")
                y[row, index[part]] = 1.0
        if task == "multiclass":
            counts = y.sum(1)
            if (counts != 1).any():
                row = int(np.nonzero(counts != 1)[0][0])
                raise ManifestInvalid(f"{src}: multiclass needs exactly one label per row, row {row + 2} has {int(counts[row])}")
        return y
    missing = [c for c in classes if c not in df.columns]
    if missing:
        raise ManifestInvalid(f"{src}: no 'label'/'labels' column and no column for class {missing[0]!r}")
    for j, c in enumerate(classes):
        for row, value in enumerate(df[c]):
            v = value.strip().lower()
            if v in ("1", "1.0", "true", "yes"):
                y[row, j] = 1.0
            elif v in ("0", "0.0", "false", "no"):
                pass
            else:
                raise ManifestInvalid(f"{src}: column {c!r} must be 0 or 1, got {value!r} on row {row + 2}")
    if task == "multiclass" and (y.sum(1) != 1).any():
        row = int(np.nonzero(y.sum(1) != 1)[0][0])
        raise ManifestInvalid(f"{src}: multiclass needs exactly one positive class column per row (row {row + 2})")
    return y


def check_manifest(manifest: Manifest, *, check_files: bool = True) -> dict:
    """Validation report: missing files, duplicates, paths outside the root; class × patient counts."""
    problems: list[str] = []
    warnings: list[str] = []
    df = manifest.frame
    dup_mask = df["path"].duplicated(keep=False)
    if dup_mask.any():
        key = pd.DataFrame(manifest.targets[dup_mask.to_numpy()]).astype(str).agg("".join, axis=1).to_numpy()
        per_path = pd.DataFrame({"path": df["path"][dup_mask].to_numpy(), "y": key, "p": df["patient_id"][dup_mask].to_numpy()})
        conflicting = per_path.groupby("path")[["y", "p"]].nunique().max(axis=1)
        bad = conflicting[conflicting > 1].index.tolist()
        same = conflicting[conflicting == 1].index.tolist()
        if bad:
            problems.append(f"{len(bad)} path(s) listed with different labels or patients, first: {bad[0]}")
        if same:
            warnings.append(f"{len(same)} path(s) repeated with identical label and patient (each repeat weighs the image again), first: {same[0]}")
    missing, outside = [], []
    if check_files:
        for rel in df["path"]:
            try:
                p = resolve_under_root(manifest.root, rel)
            except PathOutsideRoot:
                outside.append(rel)
                continue
            if not p.is_file():
                missing.append(rel)
    if outside:
        problems.append(f"{len(outside)} path(s) outside the data root, first: {outside[0]}")
    if missing:
        problems.append(f"{len(missing)} missing file(s), first: {missing[0]}")
    for j, c in enumerate(manifest.classes):
        if manifest.targets[:, j].sum() == 0:
            problems.append(f"class {c!r} has no images")
    counts = []
    for j, c in enumerate(manifest.classes):
        pos = manifest.targets[:, j] > 0
        counts.append({"class": c, "images": int(pos.sum()), "patients": int(df["patient_id"][pos].nunique())})
    return {
        "images": len(df),
        "patients": int(df["patient_id"].nunique()),
        "counts": counts,
        "problems": problems,
        "warnings": warnings,
        "missing": missing,
        "outside": outside,
    }


def build_manifest(folder: str | Path) -> pd.DataFrame:
    """Class-per-subfolder layout → manifest rows. patient_id defaults to the file stem's prefix
    before the first '_' (NIH style), else the stem; edit it when your layout differs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestInvalid(f"not a folder: {folder}")
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES:
                rel = f.relative_to(folder).as_posix()
                rows.append({"path": rel, "label": class_dir.name, "patient_id": f.stem.split("_")[0]})
    if not rows:
        raise ManifestInvalid(f"{folder}: no images found in class subfolders")
    return pd.DataFrame(rows, columns=["path", "label", "patient_id"])


def write_manifest(folder: Path, out: Path, *, overwrite: bool = False) -> pd.DataFrame:
    """`medres manifest build`: scan a class-per-subfolder tree and write the manifest atomically, its
    paths relative to the manifest's own folder."""
    import os

    from medres.errors import OutputExists
    from medres.files import atomic_write, csv_text

    folder, out = Path(folder), Path(out)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} exists; pass --overwrite to replace it")
    df = build_manifest(folder)
    rel = os.path.relpath(folder.resolve(), out.resolve().parent)
    if rel != ".":
        df["path"] = [str(Path(rel) / p).replace(os.sep, "/") for p in df["path"]]
    atomic_write(out, csv_text(list(df.columns), df.values.tolist()))
    return df
