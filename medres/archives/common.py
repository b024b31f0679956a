"""What every archive importer shares: finding the archive's files, reading its CSVs strictly, finding
images by name, normalising view/sex/age, label states, and writing the manifest with its report.

The manifest an import writes: `path` (relative to `root`, the archive folder as downloaded),
`root`, `patient_id`, `study_id`, `view` (PA, AP, LATERAL, OTHER or blank), `sex` (F, M or blank),
`age` (years, blank when unknown), `source` (the archive), `official_split` (train/val/test where the
archive has one), then every shared label (`vocabulary.VOCABULARY`: `1`, `0`, `-1` uncertain, blank
missing), then the archive's own labels.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from medres.archives.vocabulary import VOCABULARY
from medres.errors import ArchiveInvalid, OutputExists
from medres.files import atomic_write

BASE_COLUMNS = ["path", "root", "patient_id", "study_id", "view", "sex", "age", "source", "official_split"]
STATES = ("1", "0", "-1", "")


@dataclass
class Imported:
    """An archive read into manifest rows, before missing images are taken out."""

    frame: pd.DataFrame  # BASE_COLUMNS, then label columns
    root: Path
    labels: list[str]  # label columns, shared ones first
    malformed: list[str] = field(default_factory=list)  # "file:line: problem" for rows left out
    removed: dict[str, int] = field(default_factory=dict)  # other rows left out, by reason
    notes: list[str] = field(default_factory=list)  # how the archive's conventions were read


@dataclass(frozen=True)
class Archive:
    name: str
    title: str
    expects: str  # what SOURCE holds, for help and errors
    label_names: dict[str, str]  # shared label → the archive's own name (the README table)
    read: Callable[[Path], Imported]


# --- the archive's files -----------------------------------------------------------------------------
def find_file(source: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of `names` (also `.gz`) at SOURCE or anywhere below it, in sorted order."""
    for name in names:
        for candidate in (name, name + ".gz"):
            if (source / candidate).is_file():
                return source / candidate
    for name in names:
        for candidate in (name, name + ".gz"):
            hits = sorted(source.rglob(candidate))
            if hits:
                return hits[0]
    raise ArchiveInvalid(f"{source}: no {what} ({' or '.join(names)}) in this folder or below it")


def read_table(path: Path, required: list[str]) -> pd.DataFrame:
    """A CSV (plain or .gz) as text cells; trailing unnamed empty columns (a trailing comma in the header,
    as NIH's and ieee8023's files have) dropped; header cells stripped. A row with more cells than the
    header is an error naming the file and line; a missing column names the columns found."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], skipinitialspace=False)
    except pd.errors.ParserError as exc:
        where = re.search(r"line (\d+)", str(exc))
        raise ArchiveInvalid(f"{path.name}" + (f":{where[1]}" if where else "") + f": malformed CSV ({str(exc).splitlines()[0]})", path=str(path)) from None
    except (UnicodeDecodeError, pd.errors.EmptyDataError, OSError, EOFError) as exc:
        raise ArchiveInvalid(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    df.columns = [str(c).strip() for c in df.columns]
    unnamed = [c for c in df.columns if c.startswith("Unnamed:") and (df[c] == "").all()]
    df = df.drop(columns=unnamed)
    absent = [c for c in required if c not in df.columns]
    if absent:
        raise ArchiveInvalid(f"{path}: missing column {absent[0]!r} (columns: {', '.join(df.columns)}) — is this the archive's own file?")
    return df


def line_of(df: pd.DataFrame, i: int) -> int:
    """The file line of data row `i` (1 header line)."""
    return int(df.index[i]) + 2


def index_images(source: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    """File name → path relative to SOURCE for every file with one of `suffixes` anywhere below it
    (NIH's images_001/images/… or a flat folder alike). One walk; hidden folders skipped."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, source)
        for f in files:
            if f.lower().endswith(suffixes) and f not in found:
                found[f] = f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")
    return found


# --- values ------------------------------------------------------------------------------------------
_VIEWS = {
    "PA": "PA", "POSTEROANTERIOR": "PA", "POSTERO-ANTERIOR": "PA", "PA LLD": "PA", "PA RLD": "PA",
    "AP": "AP", "ANTEROPOSTERIOR": "AP", "ANTERO-POSTERIOR": "AP", "AP SUPINE": "AP", "AP_HORIZONTAL": "AP", "AP AXIAL": "AP",
    "AP LLD": "AP", "AP RLD": "AP", "APS": "AP",
    "L": "LATERAL", "LL": "LATERAL", "RL": "LATERAL", "LATERAL": "LATERAL", "LEFT LATERAL": "LATERAL", "XTABLE LATERAL": "LATERAL",
}


def normalise_view(values: pd.Series) -> pd.Series:
    """PA, AP (supine and horizontal AP included), LATERAL, OTHER (obliques, swimmer's, …) or blank."""
    v = values.astype(str).str.strip().str.upper()
    return v.map(lambda x: "" if x in ("", "NAN", "UNK", "UNKNOWN", "NONE") else _VIEWS.get(x, "OTHER"))


def normalise_sex(values: pd.Series) -> pd.Series:
    v = values.astype(str).str.strip().str.upper()
    return v.map(lambda x: {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(x, ""))


_AGE = re.compile(r"^0*(\d{1,3})(?:\.0+)?\s*([YMWD]?)$")


def parse_age(values: pd.Series) -> pd.Series:
    """Years as text: `58`, `58.0` and DICOM's `058Y` → `58`; `006M`, `003W`, `010D` → `0`; out-of-range
    (> 120) or unreadable → blank."""
    def one(x: str) -> str:
        m = _AGE.match(str(x).strip().upper())
        if not m:
            return ""
        n, unit = int(m[1]), m[2] or "Y"
        years = n if unit == "Y" else n // {"M": 12, "W": 52, "D": 365}[unit]
        return str(years) if years <= 120 else ""

    return values.map(one)


def chexpert_states(values: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """CheXpert-style cells (1.0 / 0.0 / -1.0 / blank) → states `1`/`0`/`-1`/`` and a mask of cells that
    are none of these."""
    v = values.astype(str).str.strip()
    mapped = v.map({"1.0": "1", "1": "1", "0.0": "0", "0": "0", "-1.0": "-1", "-1": "-1", "": "", "nan": "", "NaN": ""})
    bad = mapped.isna().to_numpy()
    return mapped.fillna(""), bad


def label_frame(rows: int, shared: dict[str, pd.Series], own: dict[str, pd.Series]) -> tuple[pd.DataFrame, list[str]]:
    """Every shared label (blank where the archive does not report it), then the archive's own."""
    cols = {name: (shared[name].to_numpy() if name in shared else np.full(rows, "", dtype=object)) for name in VOCABULARY}
    cols.update({name: s.to_numpy() for name, s in own.items()})
    return pd.DataFrame(cols), list(VOCABULARY) + list(own)


def assemble(base: dict[str, pd.Series | np.ndarray | str], labels: pd.DataFrame, n: int) -> pd.DataFrame:
    frame = pd.DataFrame({c: (np.asarray(base[c], dtype=object) if not isinstance(base.get(c, ""), str) else np.full(n, base.get(c, ""), dtype=object))
                          for c in BASE_COLUMNS})
    return pd.concat([frame.reset_index(drop=True), labels.reset_index(drop=True)], axis=1)


# --- writing -----------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    out: Path
    archive: str
    rows: int
    missing: int
    malformed: list[str]
    removed: dict[str, int]
    counts: dict[str, dict[str, int]]  # label → state → rows
    splits: dict[str, int]
    notes: list[str]

    def as_dict(self) -> dict:
        return {"archive": self.archive, "manifest": str(self.out), "rows": self.rows, "missing_images": self.missing,
                "malformed_rows": self.malformed, "removed": self.removed, "label_counts": self.counts, "official_split": self.splits, "notes": self.notes}


def write_import(imported: Imported, archive: str, out: Path, *, overwrite: bool = False) -> ImportReport:
    """Rows whose image is absent go to `<out>.missing.csv` (listed, counted, never silently dropped);
    the rest to `out`; counts per label and state to `<out>.import.json`. All written atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} exists; pass --overwrite to replace it")
    frame, root = imported.frame, imported.root
    present = np.fromiter((os.path.isfile(os.path.join(root, p)) for p in frame["path"]), dtype=bool, count=len(frame))
    missing = frame.loc[~present, ["path", "patient_id"]]
    kept = frame.loc[present].reset_index(drop=True)
    if len(kept) == 0:
        raise ArchiveInvalid(f"{root}: none of the {len(frame)} images listed by the archive's files was found below this folder (first expected: {frame['path'].iloc[0] if len(frame) else '-'})")
    kept = kept.assign(root=str(root))
    counts = {c: {name: int((kept[c] == s).sum()) for s, name in zip(STATES, ("positive", "negative", "uncertain", "missing"))} for c in imported.labels}
    splits = {k: int(v) for k, v in kept["official_split"].replace("", "(none)").value_counts().sort_index().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, kept.to_csv(index=False, lineterminator="\n"))
    report = ImportReport(out, archive, len(kept), len(missing), imported.malformed, imported.removed, counts, splits, imported.notes)
    side = out.with_name(out.stem + ".missing.csv")
    if len(missing):
        atomic_write(side, missing.to_csv(index=False, lineterminator="\n"))
    elif side.exists():
        side.unlink()
    atomic_write(out.with_name(out.stem + ".import.json"), json.dumps(report.as_dict(), indent=2))
    return report


def dicom_columns(source: Path, paths: pd.Series) -> dict[str, pd.Series]:
    """view, sex and age from each DICOM header (ViewPosition, PatientSex, PatientAge; pixels not read);
    blank where the file is absent or the tag is."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    tags = ["ViewPosition", "PatientSex", "PatientAge"]
    values = {t: [] for t in tags}
    for p in paths:
        full = source / p
        ds = None
        if full.is_file():
            try:
                ds = pydicom.dcmread(full, stop_before_pixels=True, specific_tags=tags)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                ds = None
        for t in tags:
            values[t].append(str(getattr(ds, t, "") or "") if ds is not None else "")
    index = paths.index
    return {"view": normalise_view(pd.Series(values["ViewPosition"], index=index, dtype=object)),
            "sex": normalise_sex(pd.Series(values["PatientSex"], index=index, dtype=object)),
            "age": parse_age(pd.Series(values["PatientAge"], index=index, dtype=object))}
