"""VinDr-CXR 1.0.0 (Nguyen et al., Scientific Data 2022), as distributed on PhysioNet.

SOURCE holds `annotations/image_labels_train.csv` (`image_id,rad_id,<28 labels>`: three rows per image,
one per radiologist), `annotations/image_labels_test.csv` (one consensus row per image, no rad_id), and
`train/<image_id>.dicom`, `test/<image_id>.dicom`. A training image's label is the majority of its
readers (positive when more than half marked it); the test labels are the consensus as given. The
train file's `Other diseases` and the test file's `Other disease` are one label (`Other disease`).
Images carry no patient id: each image is its own patient. Sex and age come from the DICOM headers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medres.archives.common import Archive, Imported, assemble, dicom_columns, find_file, label_frame, line_of, read_table
from medres.archives.vocabulary import VINDR, VINDR_ANY, shared as shared_name


def _read(table: Path) -> tuple[pd.DataFrame, list[str], list[str]]:
    df = read_table(table, ["image_id"]).rename(columns={"Other diseases": "Other disease"})
    labels = [c for c in df.columns if c not in ("image_id", "rad_id")]
    bad = np.zeros(len(df), dtype=bool)
    messages = []
    for c in labels:
        b = ~df[c].str.strip().isin(["0", "1", "0.0", "1.0"]).to_numpy()
        messages += [f"{table.name}:{line_of(df, i)}: column {c!r} is {df[c].iloc[i]!r}; expected 0 or 1" for i in np.nonzero(b & ~bad)[0]]
        bad |= b
    df = df[~bad].copy()
    for c in labels:
        df[c] = df[c].str.strip().astype(float).astype(int)
    return df, labels, messages


def read(source: Path) -> Imported:
    train_csv = find_file(source, ("image_labels_train.csv",), "VinDr-CXR image label table")
    frames, malformed, readers = [], [], []
    for table, split, folder in ((train_csv, "train", "train"), (train_csv.with_name("image_labels_test.csv"), "test", "test")):
        if not table.is_file():
            continue
        df, labels, messages = _read(table)
        malformed += messages
        votes = df.groupby("image_id", sort=False)[labels].mean()
        readers.append(df.groupby("image_id", sort=False).size())
        states = (votes > 0.5).astype(int).astype(str).reset_index()
        states["official_split"], states["folder"] = split, folder
        frames.append(states)
    rows = pd.concat(frames, ignore_index=True).fillna("")
    ids = rows["image_id"].str.strip()
    own_names = [c for c in rows.columns if c not in ("image_id", "official_split", "folder")]
    shared = {shared_name(c, VINDR): rows[c] for c in own_names if shared_name(c, VINDR)}
    for label, parts in VINDR_ANY.items():
        present = [rows[p] for p in parts if p in rows.columns]
        if present:
            shared[label] = pd.concat(present, axis=1).eq("1").any(axis=1).map({True: "1", False: "0"})
    own = {c: rows[c] for c in own_names if not shared_name(c, VINDR)}
    labels, names = label_frame(len(rows), shared, own)
    path = rows["folder"] + "/" + ids + ".dicom"
    header = dicom_columns(source, path)
    frame = assemble({"path": path, "patient_id": ids, "study_id": ids, **header, "source": "vindr-cxr", "official_split": rows["official_split"]}, labels, len(rows))
    per_image = pd.concat(readers)
    notes = [f"training labels: majority of {int(per_image.min())}–{int(per_image.max())} readers per image; test labels: consensus",
             "no patient ids in VinDr-CXR: each image is its own patient"]
    return Imported(frame, source.resolve(), names, malformed, notes=notes)


ARCHIVE = Archive("vindr-cxr", "VinDr-CXR", "annotations/image_labels_{train,test}.csv, train/*.dicom, test/*.dicom",
                  {**{v: k for k, v in VINDR.items()}, "Fracture": "Rib fracture / Clavicle fracture", **{n: n for n in ("Atelectasis", "Cardiomegaly",
                   "Consolidation", "Edema", "Emphysema", "Infiltration", "Lung Opacity", "Pneumothorax", "Pneumonia", "Tuberculosis")}}, read)
