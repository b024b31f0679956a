"""NIH ChestX-ray14 (Wang et al., CVPR 2017), as downloaded from the NIH Clinical Center.

SOURCE holds `Data_Entry_2017_v2020.csv` (or the original `Data_Entry_2017.csv`, whose header ends in
a comma), the PNGs anywhere below it (`images_001/images/00000001_000.png`, or one flat folder), and
the official patient-wise split lists `train_val_list.txt` / `test_list.txt` (one file name a line).

`Finding Labels` is `|`-separated (`Cardiomegaly|Effusion`) or `No Finding`; every one of the 14
findings is definite for every image (1 or 0), the shared labels NIH does not report are blank.
The official train_val rows are `train` (NIH has no validation list: `data.split_column` takes
validation patients from them), test_list rows are `test`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medres.archives.common import Archive, Imported, assemble, find_file, index_images, label_frame, line_of, normalise_sex, normalise_view, parse_age, read_table
from medres.archives.vocabulary import NIH
from medres.errors import ArchiveInvalid

FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass",
            "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
COLUMNS = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]


def read(source: Path) -> Imported:
    table = find_file(source, ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"), "NIH label table")
    df = read_table(table, COLUMNS)
    parts = df["Finding Labels"].str.split("|")
    known = set(FINDINGS) | {"No Finding"}
    unknown = parts.map(lambda xs: next((x for x in xs if x.strip() not in known), None))
    bad = unknown.notna().to_numpy() | (df["Image Index"].str.strip() == "").to_numpy()
    malformed = [f"{table.name}:{line_of(df, i)}: unknown finding {unknown.iloc[i]!r} or empty Image Index" for i in np.nonzero(bad)[0]]
    df, parts = df[~bad], parts[~bad]
    sets = parts.map(lambda xs: {x.strip() for x in xs})
    shared = {NIH.get(f, f): sets.map(lambda s, f=f: "1" if f in s else "0") for f in FINDINGS}
    shared["No Finding"] = sets.map(lambda s: "1" if s == {"No Finding"} else "0")
    labels, names = label_frame(len(df), shared, {})
    images = index_images(source, (".png",))
    name = df["Image Index"].str.strip()
    frame = assemble({
        "path": name.map(lambda n: images.get(n, f"images/{n}")), "patient_id": df["Patient ID"].str.strip(),
        "study_id": name.str.rsplit(".", n=1).str[0], "view": normalise_view(df["View Position"]), "sex": normalise_sex(df["Patient Gender"]),
        "age": parse_age(df["Patient Age"]), "source": "nih", "official_split": _official_split(source, name),
    }, labels, len(df))
    notes = [f"labels from {table.name}; images found by file name below {source}"]
    return Imported(frame, source.resolve(), names, malformed, notes=notes)


def _official_split(source: Path, names: pd.Series) -> np.ndarray:
    split = np.full(len(names), "", dtype=object)
    for file, value in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        try:
            listed = find_file(source, (file,), "split list")
        except ArchiveInvalid:  # the lists are optional: without them there is no official split
            continue
        members = {line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()}
        split[names.isin(members).to_numpy()] = value
    return split


ARCHIVE = Archive(
    "nih", "NIH ChestX-ray14", "Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv), images_*/images/*.png, train_val_list.txt, test_list.txt",
    {**{NIH.get(f, f): f for f in FINDINGS}, "No Finding": "No Finding"}, read,
)
