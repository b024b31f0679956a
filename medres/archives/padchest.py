"""PadChest (Bustos et al., Medical Image Analysis 2020), as distributed by BIMCV.

SOURCE holds `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)` and the 16-bit PNGs, either in
their numbered download folders (`ImageDir`/`ImageID`) or in one flat folder (found by name).
`Labels` is a Python-list-like string of lower-case report findings (`['pleural effusion', 'cardiomegaly']`);
a shared label is positive when one finding contains its name or a synonym (torchxrayvision's rule,
`vocabulary.PADCHEST`), `normal` is No Finding, and the full finding list is kept in `padchest_labels`
(`|`-separated). PadChest states findings as present or absent: mapped labels are 1 or 0, never
uncertain. Rows with no `Labels` value are left out and counted. Age = study year − birth year.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd

from medres.archives.common import Archive, Imported, assemble, find_file, index_images, label_frame, line_of, normalise_sex, normalise_view, parse_age, read_table
from medres.archives.vocabulary import PADCHEST

TABLE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
COLUMNS = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM", "Projection", "Labels"]


def _findings(cell: str) -> list[str] | None:
    cell = cell.strip()
    if not cell or cell.lower() == "nan":
        return None
    try:
        items = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(items, (list, tuple)):
        return None
    return [str(x).strip().lower() for x in items if str(x).strip()]


def read(source: Path) -> Imported:
    table = find_file(source, (TABLE,), "PadChest label table")
    df = read_table(table, COLUMNS)
    findings = df["Labels"].map(_findings)
    bad = findings.isna().to_numpy()
    malformed = [f"{table.name}:{line_of(df, i)}: Labels is {df['Labels'].iloc[i]!r}, not a list of findings" for i in np.nonzero(bad & (df["Labels"].str.strip() != "").to_numpy())[0]]
    removed = {"rows without findings (blank Labels)": int((bad & (df["Labels"].str.strip() == "").to_numpy()).sum())}
    df, findings = df[~bad], findings[~bad]
    shared = {label: findings.map(lambda fs, keys=keys: "1" if any(k in f for f in fs for k in keys) else "0") for label, keys in PADCHEST.items()}
    own = {"padchest_labels": findings.map("|".join)}
    labels, names = label_frame(len(df), shared, own)
    images = index_images(source, (".png",))
    image = df["ImageID"].str.strip()
    path = [images.get(i, f"{d.strip()}/{i}") for i, d in zip(image, df["ImageDir"])]
    year = pd.to_numeric(df["StudyDate_DICOM"].str.strip().str[:4], errors="coerce")
    birth = pd.to_numeric(df["PatientBirth"].str.strip().str[:4], errors="coerce")
    age = (year - birth).map(lambda a: "" if pd.isna(a) or a < 0 else str(int(a)))
    frame = assemble({"path": path, "patient_id": df["PatientID"].str.strip(), "study_id": df["StudyID"].str.strip(), "view": normalise_view(df["Projection"]),
                      "sex": normalise_sex(df["PatientSex_DICOM"]), "age": parse_age(age), "source": "padchest", "official_split": ""}, labels, len(df))
    notes = ["shared labels by substring of the report findings (torchxrayvision's PadChest rule); all findings in padchest_labels"]
    return Imported(frame, source.resolve(), names[:-1], malformed, {k: v for k, v in removed.items() if v}, notes)


ARCHIVE = Archive("padchest", "PadChest", f"{TABLE}[.gz] and the PNGs (numbered folders or flat)",
                  {label: " / ".join(keys) for label, keys in PADCHEST.items()}, read)
