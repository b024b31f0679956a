"""CheXpert (Irvin et al., AAAI 2019) and MIMIC-CXR-JPG (Johnson et al. 2019), which share the CheXpert
labeller's 14 observations and its conventions: `1.0` positive, `0.0` negative, `-1.0` uncertain, blank
not mentioned (missing). A study labelled `No Finding` = 1 had no pathology positive or uncertain, so
its blank pathologies (all but Support Devices) are negatives, as torchxrayvision reads them.

CheXpert: SOURCE is the folder holding `CheXpert-v1.0/` or `CheXpert-v1.0-small/` (or that folder
itself); `train.csv` and `valid.csv` inside it; `Path` is relative to SOURCE
(`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`). train.csv rows are `train`,
valid.csv rows (radiologist consensus) `val`.

MIMIC-CXR-JPG 2.0.0: SOURCE holds `mimic-cxr-2.0.0-chexpert.csv(.gz)` (one row per study),
`-metadata.csv(.gz)` (one row per image: dicom_id, subject_id, study_id, ViewPosition) and
`-split.csv(.gz)` (train / validate / test), and `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`. MIMIC-CXR-JPG
has no sex or age (they are in MIMIC-IV's patients table): those columns stay blank.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medres.archives.common import Archive, Imported, assemble, chexpert_states, find_file, label_frame, line_of, normalise_sex, normalise_view, parse_age, read_table
from medres.archives.vocabulary import CHEXPERT
from medres.errors import ArchiveInvalid

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")
NOT_PATHOLOGY = ("No Finding", "Support Devices")


def _labels(df: pd.DataFrame, table: Path) -> tuple[pd.DataFrame, list[str], list[str], np.ndarray]:
    """States of the 14 observations → (label columns, their names, malformed messages, bad-row mask)."""
    states, bad = {}, np.zeros(len(df), dtype=bool)
    messages = []
    for obs in OBSERVATIONS:
        s, b = chexpert_states(df[obs])
        states[obs] = s
        for i in np.nonzero(b & ~bad)[0]:
            messages.append(f"{table.name}:{line_of(df, i)}: column {obs!r} is {df[obs].iloc[i]!r}; expected 1.0, 0.0, -1.0 or blank")
        bad |= b
    normal = states["No Finding"] == "1"
    for obs in OBSERVATIONS:
        if obs not in NOT_PATHOLOGY:
            states[obs] = states[obs].where(~(normal & (states[obs] == "")), "0")
    shared = {CHEXPERT.get(o, o): states[o] for o in OBSERVATIONS}
    labels, names = label_frame(len(df), shared, {})
    return labels, names, messages, bad


def read_chexpert(source: Path) -> Imported:
    folder = source if source.name.startswith("CheXpert-v1.0") else next(iter(sorted(source.glob("CheXpert-v1.0*"))), source)
    root = folder.parent if folder.name.startswith("CheXpert-v1.0") else source
    frames, malformed = [], []
    for name, split in (("train.csv", "train"), ("valid.csv", "val")):
        try:
            table = find_file(folder, (name,), "CheXpert label table")
        except ArchiveInvalid:
            if name == "train.csv":
                raise
            continue  # valid.csv is optional
        df = read_table(table, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS])
        labels, names, messages, bad = _labels(df, table)
        malformed += messages
        df, labels = df[~bad], labels[~bad]
        path = df["Path"].str.strip()
        parts = path.str.split("/")
        patient = parts.map(lambda p: next((x for x in p if x.startswith("patient")), ""))
        study = parts.map(lambda p: "/".join(x for x in p if x.startswith(("patient", "study"))))
        frontal = df["Frontal/Lateral"].str.strip().str.lower() == "frontal"
        view = normalise_view(df["AP/PA"].where(frontal, "LATERAL"))
        frames.append(assemble({"path": path, "patient_id": patient, "study_id": study, "view": view, "sex": normalise_sex(df["Sex"]),
                                "age": parse_age(df["Age"].where(df["Age"].str.strip() != "0", "")), "source": "chexpert", "official_split": split},
                               labels, len(df)))
    notes = ["No Finding = 1: blank pathologies read as 0 (the labeller's definition); -1.0 kept as uncertain (data.uncertain decides)"]
    return Imported(pd.concat(frames, ignore_index=True), root.resolve(), names, malformed, notes=notes)


def read_mimic(source: Path) -> Imported:
    labels_csv = find_file(source, ("mimic-cxr-2.0.0-chexpert.csv",), "MIMIC-CXR-JPG CheXpert label table")
    meta_csv = find_file(source, ("mimic-cxr-2.0.0-metadata.csv",), "MIMIC-CXR-JPG metadata table")
    split_csv = find_file(source, ("mimic-cxr-2.0.0-split.csv",), "MIMIC-CXR-JPG split table")
    lab = read_table(labels_csv, ["subject_id", "study_id", *OBSERVATIONS])
    meta = read_table(meta_csv, ["dicom_id", "subject_id", "study_id", "ViewPosition"])
    split = read_table(split_csv, ["dicom_id", "study_id", "subject_id", "split"])
    labels, names, malformed, bad = _labels(lab, labels_csv)
    lab = pd.concat([lab[["subject_id", "study_id"]].reset_index(drop=True), labels.reset_index(drop=True)], axis=1)[~bad]
    rows = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="left").merge(lab, on=["subject_id", "study_id"], how="left", indicator=True)
    unlabelled = int((rows["_merge"] == "left_only").sum())
    rows = rows[rows["_merge"] == "both"].reset_index(drop=True)
    subject = rows["subject_id"].str.strip()
    path = "files/p" + subject.str[:2] + "/p" + subject + "/s" + rows["study_id"].str.strip() + "/" + rows["dicom_id"].str.strip() + ".jpg"
    official = rows["split"].fillna("").str.strip().replace({"validate": "val"})
    frame = assemble({"path": path, "patient_id": subject, "study_id": rows["study_id"].str.strip(), "view": normalise_view(rows["ViewPosition"]),
                      "sex": "", "age": "", "source": "mimic-cxr-jpg", "official_split": official}, rows[names], len(rows))
    removed = {"images of studies without a CheXpert label row": unlabelled} if unlabelled else {}
    notes = ["one label row per study, joined to its images on (subject_id, study_id); split 'validate' written as val",
             "No Finding = 1: blank pathologies read as 0; sex and age are not part of MIMIC-CXR-JPG"]
    return Imported(frame, source.resolve(), names, malformed, removed, notes)


_NAMES = {CHEXPERT.get(o, o): o for o in OBSERVATIONS}
CHEXPERT_ARCHIVE = Archive("chexpert", "CheXpert", "CheXpert-v1.0[-small]/train.csv, valid.csv and the images they list", _NAMES, read_chexpert)
MIMIC_ARCHIVE = Archive("mimic-cxr-jpg", "MIMIC-CXR-JPG", "mimic-cxr-2.0.0-{chexpert,metadata,split}.csv[.gz], files/pXX/…/*.jpg", _NAMES, read_mimic)
