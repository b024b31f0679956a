"""`medres manifest import` at the archives' real sizes: a 112,120-row NIH table and a 224,316-row
CheXpert table (synthetic rows in the published formats; every image an empty placeholder file in the
archive's layout), each imported in a fresh process (wall time and peak RSS), beside the plain
baseline of reading the same table with `pandas.read_csv` in its own process.

    .venv/bin/python bench/import.py [--nih 112120] [--chexpert 224316] [--keep DIR]

Target (issue "public archives"): under 60 s and under 2 GB per archive on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, machine, save, table

NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass",
                "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,"
                   "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices")


def make_nih(folder: Path, n: int, rng) -> None:
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"]
    names = []
    patient, follow = 1, 0
    for i in range(n):
        if rng.random() < 0.25:
            patient, follow = patient + 1, 0
        name = f"{patient:08d}_{follow:03d}.png"
        follow += 1
        k = rng.integers(0, 3)
        labels = "|".join(rng.choice(NIH_FINDINGS, size=k, replace=False)) if k else "No Finding"
        lines.append(f"{name},{labels},{follow},{patient},{rng.integers(1, 95)},{'MF'[i % 2]},{'PA' if rng.random() < 0.6 else 'AP'},2500,2048,0.143,0.143")
        names.append(name)
    folder.mkdir(parents=True)
    (folder / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    for k in range(12):
        (folder / f"images_{k + 1:03d}" / "images").mkdir(parents=True)
    for i, name in enumerate(names):
        (folder / f"images_{i * 12 // n + 1:03d}" / "images" / name).touch()
    cut = int(n * 0.77)
    (folder / "train_val_list.txt").write_text("\n".join(names[:cut]) + "\n")
    (folder / "test_list.txt").write_text("\n".join(names[cut:]) + "\n")


def make_chexpert(folder: Path, n: int, rng) -> None:
    base = folder / "CheXpert-v1.0-small"
    lines = [CHEXPERT_HEADER]
    values = np.array(["1.0", "0.0", "-1.0", "", "", "", ""])
    patient, study, view = 1, 1, 1
    for i in range(n):
        r = rng.random()
        if r < 0.3:
            patient, study, view = patient + 1, 1, 1
        elif r < 0.6:
            study, view = study + 1, 1
        else:
            view += 1
        frontal = view == 1
        path = f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/view{view}_{'frontal' if frontal else 'lateral'}.jpg"
        cells = rng.choice(values, size=14)
        lines.append(f"{path},{'Female' if i % 2 else 'Male'},{rng.integers(18, 90)},{'Frontal' if frontal else 'Lateral'},{('AP' if r < 0.8 else 'PA') if frontal else ''},"
                     + ",".join(cells))
    base.mkdir(parents=True)
    (base / "train.csv").write_text("\n".join(lines) + "\n")
    for line in lines[1:]:
        p = folder / line.split(",", 1)[0]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()


def in_child(code: str) -> tuple[float, float]:
    """Run `code` in a fresh Python; (wall seconds including start-up, that process's peak RSS in MB)."""
    t0 = time.perf_counter()
    probe = "; import resource; print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    done = subprocess.run([sys.executable, "-c", code + probe], check=True, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    peak_kb = int(done.stdout.strip().splitlines()[-1].split()[1])
    return wall, peak_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nih", type=int, default=112120)
    ap.add_argument("--chexpert", type=int, default=224316)
    ap.add_argument("--keep", type=Path, default=None, help="build the synthetic archives here and keep them")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="medres-import-"))
    rng = np.random.default_rng(0)
    print(f"machine: {machine()}")
    rows = []
    for fmt, n, make, table_path in (("nih", args.nih, make_nih, "Data_Entry_2017_v2020.csv"),
                                     ("chexpert", args.chexpert, make_chexpert, "CheXpert-v1.0-small/train.csv")):
        src = work / fmt
        if not src.exists():
            t0 = time.perf_counter()
            make(src, n, rng)
            print(f"{fmt}: built {n} rows + placeholder images in {time.perf_counter() - t0:.0f} s")
        base_s, base_mb = in_child(f"import pandas as pd; pd.read_csv({str(src / table_path)!r}, dtype=str, keep_default_na=False)")
        imp_s, imp_mb = in_child(f"from medres.archives import import_archive; import_archive({fmt!r}, {str(src)!r}, {str(work / (fmt + '.csv'))!r}, overwrite=True)")
        rows.append((fmt, n, f"{imp_s:.1f}", f"{imp_mb:.0f}", f"{base_s:.1f}", f"{base_mb:.0f}", f"{imp_s / base_s:.1f}x"))
    print(table(rows, ("archive", "rows", "import s", "import peak MB", "read_csv s", "read_csv peak MB", "import / read_csv")))
    save("import", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
