"""covid-chestxray-dataset (Cohen et al. 2020, github ieee8023), as cloned.

SOURCE holds `metadata.csv` (its header ends in a comma) and the images at `<folder>/<filename>`.
Only X-ray rows are imported (CT rows are counted and left out). `finding` is a path
(`Pneumonia/Viral/COVID-19`, `Pneumonia/Bacterial/Streptococcus`, `Tuberculosis`, `No Finding`): the
shared labels Pneumonia, COVID-19, Tuberculosis and No Finding are 1 when a component names them and 0
otherwise; the whole path is kept in `finding`. Rows whose finding is `todo` or `Unknown` have
every label missing.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medres.archives.common import Archive, Imported, assemble, find_file, label_frame, normalise_sex, normalise_view, parse_age, read_table
from medres.archives.vocabulary import COVID


def read(source: Path) -> Imported:
    table = find_file(source, ("metadata.csv",), "covid-chestxray-dataset metadata table")
    df = read_table(table, ["patientid", "sex", "age", "finding", "view", "modality", "folder", "filename"])
    xray = df["modality"].str.strip().str.lower().isin(["x-ray", "xray", "cr", "dx"])
    removed = {f"{m or '(blank)'} rows (not X-ray)": int(n) for m, n in df.loc[~xray, "modality"].str.strip().value_counts().items()}
    df = df[xray]
    parts = df["finding"].str.strip().str.split("/").map(lambda xs: {x.strip() for x in xs if x.strip()})
    unknown = parts.map(lambda s: not s or bool(s & {"todo", "Unknown"}))
    shared = {label: pd.Series(["" if u else "1" if name in s else "0" for s, u in zip(parts, unknown)], index=df.index)
              for name, label in COVID.items()}
    labels, names = label_frame(len(df), shared, {"finding": df["finding"].str.strip()})
    path = df["folder"].str.strip() + "/" + df["filename"].str.strip()
    frame = assemble({"path": path, "patient_id": df["patientid"].str.strip(), "study_id": "", "view": normalise_view(df["view"]),
                      "sex": normalise_sex(df["sex"]), "age": parse_age(df["age"]), "source": "covid-chestxray", "official_split": ""}, labels, len(df))
    notes = [f"{int(unknown.sum())} X-ray rows with finding todo/Unknown: all labels missing"]
    return Imported(frame, source.resolve(), names[:-1], removed={k: v for k, v in removed.items() if v}, notes=notes)


ARCHIVE = Archive("covid-chestxray", "covid-chestxray-dataset", "metadata.csv, images/…", {v: f"finding ∋ {k}" for k, v in COVID.items()}, read)
