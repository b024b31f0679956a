"""The CSV manifest: schema, validation, folder scan.

Columns: `path` (relative to the manifest's folder or `data.root`), and labels as `label`
(multiclass), `labels` (`a|b`, multilabel) or one column per class; `patient_id`; optional
`split` (train/val/test); every other column is kept for subgroup analysis.

A per-class column holds a label *state*: `1` positive, `0` negative, `-1` uncertain (as CheXpert and
MIMIC-CXR's labellers write it) or blank (missing: the archive does not say). Multilabel only; the
`data.uncertain` policy turns states into training targets — uncertain as ones, zeros, or ignored —
and ignored or missing entries become NaN in `Manifest.targets`: masked in the loss, the metrics,
calibration, thresholds and the conformal fit (never read as negatives).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medres.errors import ManifestInvalid, PathOutsideRoot
from medres.files import resolve_under_root

SPLITS = ("train", "val", "test")
# Label states of a per-class column (Manifest.states).
POSITIVE, NEGATIVE, UNCERTAIN, MISSING = 1, 0, -1, -2
STATE_NAMES = {POSITIVE: "positive", NEGATIVE: "negative", UNCERTAIN: "uncertain", MISSING: "missing"}
_STATE_OF = {"1": POSITIVE, "1.0": POSITIVE, "true": POSITIVE, "yes": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "false": NEGATIVE,
             "no": NEGATIVE, "-1": UNCERTAIN, "-1.0": UNCERTAIN, "uncertain": UNCERTAIN, "": MISSING, "nan": MISSING}
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


@dataclass
class Manifest:
    """A validated manifest: `frame` has `path`, `patient_id`, optional `split` and extra columns;
    `targets` is (N, C) float32 — one-hot for multiclass, 0/1 for multilabel with NaN where the label is
    masked (missing, or uncertain under `ignore`); `states` (N, C) int8 keeps what the file said.
    A merged manifest (several CSVs) resolves each row against its own root (`roots[root_of[i]]`)."""

    frame: pd.DataFrame
    targets: np.ndarray
    classes: list[str]
    task: str
    root: Path
    source: str
    states: np.ndarray | None = None
    roots: list[Path] | None = None
    root_of: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.frame)

    def absolute(self, i: int) -> Path:
        root = self.roots[int(self.root_of[i])] if self.roots is not None else self.root
        return resolve_under_root(root, self.frame["path"].iloc[i])

    def subset(self, mask: np.ndarray) -> "Manifest":
        mask = np.asarray(mask)
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return Manifest(self.frame[mask].reset_index(drop=True), self.targets[mask], self.classes, self.task, self.root, self.source,
                        pick(self.states), self.roots, pick(self.root_of))

    @property
    def labelled(self) -> np.ndarray:
        """(N, C) bool: the entries that count (not masked)."""
        return ~np.isnan(self.targets)

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Per class: how many rows are positive, negative, uncertain, missing (as written in the file)."""
        states = self.states if self.states is not None else self.targets.astype(np.int8)
        return {c: {name: int((states[:, j] == s).sum()) for s, name in STATE_NAMES.items()} for j, c in enumerate(self.classes)}


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


def infer_classes(df: pd.DataFrame, task: str, src: str = "manifest") -> list[str]:
    if "label" in df.columns:
        return sorted({v.strip() for v in df["label"] if v.strip()})
    if "labels" in df.columns:
        return sorted({p.strip() for v in df["labels"] for p in v.split("|") if p.strip()})
    raise ManifestInvalid(f"{src}: no label column: use 'label', 'labels' or one column per class with data.classes set (columns: {', '.join(df.columns)})")


def load_manifest(
    path: str | Path,
    *,
    classes: list[str] | None = None,
    task: str = "multiclass",
    root: str | Path | None = None,
    require_labels: bool = True,
    uncertain: str | dict[str, str] = "ignore",
    absent_classes_missing: bool = False,
) -> Manifest:
    """Read and validate one manifest CSV. `uncertain`: the policy for `-1` labels (one for every class,
    or per class with an optional `default`). `absent_classes_missing`: a class with no column is
    missing on every row (when merging archives that lack a label) instead of an error."""
    path = Path(path)
    df = read_csv(path)
    src = str(path)
    root_given = root is not None
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
        return Manifest(df.reset_index(drop=True), targets, list(classes or []), task, root, src, **_row_roots(df, root_given))
    classes = list(classes) if classes else infer_classes(df, task, src)
    if not classes:
        raise ManifestInvalid(f"{src}: no classes found")
    states = _states(df, classes, task, src, absent_classes_missing)
    targets = apply_uncertain(states, classes, uncertain) if states is not None else _targets(df, classes, task, src)
    return Manifest(df.reset_index(drop=True), targets, classes, task, root, src, states=states, **_row_roots(df, root_given))


def _row_roots(df: pd.DataFrame, root_given: bool) -> dict:
    """A `root` column (what `manifest import` writes: the archive folder as downloaded) makes each row's
    path relative to its own root; `data.root`, when set, wins."""
    if root_given or "root" not in df.columns or (df["root"].str.strip() == "").all():
        return {}
    values = df["root"].str.strip()
    roots, root_of = np.unique(values.to_numpy(dtype=str), return_inverse=True)
    return {"roots": [Path(r) for r in roots], "root_of": root_of.astype(np.int32)}


def apply_uncertain(states: np.ndarray, classes: list[str], policy: str | dict[str, str]) -> np.ndarray:
    """Label states → float32 targets: positive 1, negative 0, missing NaN; uncertain by the class's policy
    (ones → 1, zeros → 0, ignore → NaN: U-Ones, U-Zeros and U-Ignore of the CheXpert paper)."""
    y = np.where(states == POSITIVE, 1.0, np.where(states == NEGATIVE, 0.0, np.nan)).astype(np.float32)
    for j, c in enumerate(classes):
        rule = policy if isinstance(policy, str) else policy.get(c, policy.get("default", "ignore"))
        if rule not in UNCERTAIN_POLICIES:
            raise ManifestInvalid(f"data.uncertain for {c!r} must be one of {', '.join(UNCERTAIN_POLICIES)}, got {rule!r}")
        if rule != "ignore":
            y[states[:, j] == UNCERTAIN, j] = 1.0 if rule == "ones" else 0.0
    return y


def _states(df: pd.DataFrame, classes: list[str], task: str, src: str, absent_missing: bool) -> np.ndarray | None:
    """Per-class columns → (N, C) int8 states; None when the manifest uses `label`/`labels` instead."""
    if ("label" in df.columns and task == "multiclass") or "labels" in df.columns:
        return None
    missing = [c for c in classes if c not in df.columns]
    if missing and not (absent_missing and task == "multilabel"):
        raise ManifestInvalid(f"{src}: no 'label'/'labels' column and no column for class {missing[0]!r}")
    states = np.full((len(df), len(classes)), MISSING, dtype=np.int8)
    for j, c in enumerate(classes):
        if c not in df.columns:
            continue
        values = df[c].str.strip().str.lower()
        code = values.map(_STATE_OF)
        bad = code.isna()
        if bad.any():
            row = int(np.nonzero(bad.to_numpy())[0][0])
            raise ManifestInvalid(f"{src}: column {c!r} must be 1, 0, -1 (uncertain) or blank (missing), got {df[c].iloc[row]!r} on row {row + 2}")
        states[:, j] = code.to_numpy(dtype=np.int8)
    if task == "multiclass":
        unsure = (states == UNCERTAIN) | (states == MISSING)
        if unsure.any():
            row, j = (int(v[0]) for v in np.nonzero(unsure))
            kind = "uncertain (-1)" if states[row, j] == UNCERTAIN else "blank (missing)"
            raise ManifestInvalid(f"{src}: column {classes[j]!r} is {kind} on row {row + 2}; uncertain and missing labels need data.task: multilabel")
        if ((states == POSITIVE).sum(1) != 1).any():
            row = int(np.nonzero((states == POSITIVE).sum(1) != 1)[0][0])
            raise ManifestInvalid(f"{src}: multiclass needs exactly one positive class column per row (row {row + 2})")
    return states


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
    raise AssertionError("unreachable: per-class columns are read by _states")


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
        for i, rel in enumerate(df["path"]):
            try:
                p = manifest.absolute(i)
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
        if np.nansum(manifest.targets[:, j]) == 0:
            problems.append(f"class {c!r} has no images")
    counts = []
    states = manifest.label_counts() if manifest.states is not None else {}
    for j, c in enumerate(manifest.classes):
        pos = manifest.targets[:, j] > 0
        counts.append({"class": c, "images": int(pos.sum()), "patients": int(df["patient_id"][pos].nunique()), **({"states": states[c]} if states else {})})
    return {
        "images": len(df),
        "patients": int(df["patient_id"].nunique()),
        "counts": counts,
        "problems": problems,
        "warnings": warnings,
        "missing": missing,
        "outside": outside,
    }


def build_manifest(folder: str | Path) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Class-per-subfolder layout → (manifest rows, files left out). Every file under a class folder is
    sniffed by content, as `predict` does (`io/listing.py`: no extension filter, so UID-named DICOMs
    count); files that are not images are returned with their error line. patient_id defaults to the
    file stem's prefix before the first '_' (NIH style), else the stem; edit it when your layout differs."""
    from medres.errors import IngestError
    from medres.io.listing import candidate_files
    from medres.io.load import sniff

    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestInvalid(f"not a folder: {folder}")
    rows, skipped = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f, _ in candidate_files(class_dir):
            rel = f.relative_to(folder).as_posix()
            try:
                sniff(f)
            except IngestError as err:
                skipped.append((rel, err.with_path(rel).one_line()))
                continue
            rows.append({"path": rel, "label": class_dir.name, "patient_id": f.stem.split("_")[0]})
    if not rows:
        raise ManifestInvalid(f"{folder}: no images found in class subfolders" + (f" ({len(skipped)} files are not images, first: {skipped[0][1]})" if skipped else ""))
    return pd.DataFrame(rows, columns=["path", "label", "patient_id"]), skipped


def write_manifest(folder: Path, out: Path, *, overwrite: bool = False) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """`medres manifest build`: scan a class-per-subfolder tree and write the manifest atomically, its
    paths relative to the manifest's own folder. Returns the rows and the files left out."""
    import os

    from medres.errors import OutputExists
    from medres.files import atomic_write, csv_text

    folder, out = Path(folder), Path(out)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} exists; pass --overwrite to replace it")
    df, skipped = build_manifest(folder)
    rel = os.path.relpath(folder.resolve(), out.resolve().parent)
    if rel != ".":
        df["path"] = [str(Path(rel) / p).replace(os.sep, "/") for p in df["path"]]
    atomic_write(out, csv_text(list(df.columns), df.values.tolist()))
    return df, skipped
