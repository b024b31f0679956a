"""RSNA Pneumonia Detection Challenge (Kaggle 2018, stage 2), as downloaded.

SOURCE holds `stage_2_train_labels.csv` (`patientId,x,y,width,height,Target`, one row per box: an image
with three opacities has three rows), optionally `stage_2_detailed_class_info.csv` (`patientId,class`:
`Lung Opacity`, `No Lung Opacity / Not Normal`, `Normal`), and `stage_2_train_images/<patientId>.dcm`.
`patientId` names an image (one per "patient"); it is both patient_id and study_id. Target 1 is
Pneumonia and Lung Opacity (the challenge's definition, as torchxrayvision maps it); class `Normal` is
No Finding. View, sex and age come from each DICOM header (read without pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medres.archives.common import Archive, Imported, assemble, dicom_columns, find_file, label_frame, line_of, read_table
from medres.errors import ArchiveInvalid


def read(source: Path) -> Imported:
    table = find_file(source, ("stage_2_train_labels.csv", "stage_1_train_labels.csv"), "RSNA label table")
    df = read_table(table, ["patientId", "Target"])
    target = df["Target"].str.strip()
    bad = ~target.isin(["0", "1"]).to_numpy()
    malformed = [f"{table.name}:{line_of(df, i)}: Target is {df['Target'].iloc[i]!r}; expected 0 or 1" for i in np.nonzero(bad)[0]]
    per_image = pd.DataFrame({"id": df["patientId"].str.strip()[~bad], "t": target[~bad].astype(int)}).groupby("id", sort=False)["t"].max()
    ids = pd.Series(per_image.index, dtype=object)
    positive = per_image.to_numpy().astype(str)
    shared = {"Pneumonia": pd.Series(positive), "Lung Opacity": pd.Series(positive)}
    try:
        info = read_table(find_file(source, ("stage_2_detailed_class_info.csv", "stage_1_detailed_class_info.csv"), "class table"), ["patientId", "class"])
        cls = info.drop_duplicates("patientId").set_index("patientId")["class"].str.strip()
        shared["No Finding"] = ids.map(lambda i: "" if i not in cls.index else "1" if cls[i] == "Normal" else "0")
    except ArchiveInvalid:
        pass  # without the class table No Finding stays missing
    labels, names = label_frame(len(ids), shared, {})
    folder = next((d.name for d in (source / "stage_2_train_images", source / "stage_1_train_images") if d.is_dir()), "stage_2_train_images")
    path = folder + "/" + ids + ".dcm"
    header = dicom_columns(source, path)
    frame = assemble({"path": path, "patient_id": ids, "study_id": ids, **header, "source": "rsna-pneumonia", "official_split": ""}, labels, len(ids))
    notes = [f"{len(df)} box rows → {len(ids)} images (Target: the maximum over an image's rows); view/sex/age from DICOM headers"]
    return Imported(frame, source.resolve(), names, malformed, notes=notes)


ARCHIVE = Archive("rsna-pneumonia", "RSNA Pneumonia", "stage_2_train_labels.csv, stage_2_detailed_class_info.csv, stage_2_train_images/*.dcm",
                  {"Pneumonia": "Target", "Lung Opacity": "Target", "No Finding": "class Normal"}, read)
