import numpy as np
import pandas as pd
import pytest

from medres.data.manifest import build_manifest, check_manifest, load_manifest
from medres.data.splits import assign_splits, audit_leakage
from medres.errors import LeakageDetected, ManifestInvalid


def write(tmp_path, rows, name="m.csv"):
    p = tmp_path / name
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def test_label_forms(tmp_path):
    mc = load_manifest(write(tmp_path, [{"path": "a.png", "label": "x", "patient_id": "1"}, {"path": "b.png", "label": "y", "patient_id": "2"}]))
    assert mc.classes == ["x", "y"] and mc.targets.tolist() == [[1, 0], [0, 1]]
    ml = load_manifest(write(tmp_path, [{"path": "a.png", "labels": "x|y", "patient_id": "1"}, {"path": "b.png", "labels": "", "patient_id": "2"}]), classes=["x", "y"], task="multilabel")
    assert ml.targets.tolist() == [[1, 1], [0, 0]]
    cols = load_manifest(write(tmp_path, [{"path": "a.png", "x": 1, "y": 0, "patient_id": "1"}]), classes=["x", "y"], task="multilabel")
    assert cols.targets.tolist() == [[1, 0]]


@pytest.mark.parametrize("rows,match", [
    ([{"path": "a.png", "label": "zebra", "patient_id": "1"}], "unknown class 'zebra'"),
    ([{"path": "a.png", "label": "", "patient_id": "1"}], "column 'label' is empty"),
    ([{"path": "a.png", "label": "nan", "patient_id": "1"}], "NaN"),
    ([{"label": "x", "patient_id": "1"}], "missing column 'path'"),
    ([{"path": "a.png", "label": "x", "patient_id": "1", "split": "holdout"}], "column 'split'"),
])
def test_invalid_manifests_name_the_column(tmp_path, rows, match):
    with pytest.raises(ManifestInvalid, match=match):
        load_manifest(write(tmp_path, rows), classes=["x"])


def test_empty_manifest(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text("path,label,patient_id\n")
    with pytest.raises(ManifestInvalid, match="empty"):
        load_manifest(p)


def test_build_and_check(tmp_path):
    from PIL import Image

    for cls in ("normal", "covid"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4), 50 * i + 10, np.uint8)).save(tmp_path / "data" / cls / f"p{i}_{cls}.png")
    df, skipped = build_manifest(tmp_path / "data")
    assert skipped == []
    assert len(df) == 6 and set(df["label"]) == {"normal", "covid"}
    p = tmp_path / "data" / "manifest.csv"
    df.to_csv(p, index=False)
    m = load_manifest(p)
    rep = check_manifest(m)
    assert rep["problems"] == [] and rep["images"] == 6
    df.loc[0, "path"] = "missing.png"
    df.loc[1, "path"] = "../escape.png"
    df.to_csv(p, index=False)
    rep = check_manifest(load_manifest(p))
    assert any("missing" in x for x in rep["problems"]) and any("outside" in x for x in rep["problems"])


def _many(n_patients=60, per=2, classes=("a", "b", "c")):
    rows = []
    for i in range(n_patients):
        for k in range(per):
            rows.append({"path": f"{i}_{k}.png", "label": classes[i % len(classes)], "patient_id": f"P{i}"})
    return rows


def test_splits_grouped_stratified_seeded(tmp_path):
    m = load_manifest(write(tmp_path, _many()))
    s1 = assign_splits(m, val_fraction=0.2, test_fraction=0.2, seed=3)
    s2 = assign_splits(m, val_fraction=0.2, test_fraction=0.2, seed=3)
    s3 = assign_splits(m, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert (s1 == s2).all() and not (s1 == s3).all()
    df = pd.DataFrame({"p": m.frame["patient_id"], "s": s1})
    assert (df.groupby("p")["s"].nunique() == 1).all()  # no patient crosses splits
    for split in ("train", "val", "test"):
        labels = set(m.frame["label"][s1 == split])
        assert labels == {"a", "b", "c"}, split
    assert audit_leakage(m, s1) == []


def test_explicit_split_column_wins(tmp_path):
    rows = _many(6, 1)
    for i, r in enumerate(rows):
        r["split"] = ["train", "val", "test"][i % 3]
    m = load_manifest(write(tmp_path, rows))
    s = assign_splits(m, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert list(s) == [r["split"] for r in rows]


def test_leakage_patient_and_content(tmp_path):
    rows = [{"path": "a.png", "label": "x", "patient_id": "1", "split": "train"}, {"path": "b.png", "label": "x", "patient_id": "1", "split": "test"}, {"path": "c.png", "label": "x", "patient_id": "2", "split": "val"}]
    m = load_manifest(write(tmp_path, rows))
    splits = m.frame["split"].to_numpy()
    with pytest.raises(LeakageDetected, match="patient_id"):
        audit_leakage(m, splits)
    assert audit_leakage(m, splits, allow=True)
    m2 = load_manifest(write(tmp_path, [dict(r, patient_id=str(i)) for i, r in enumerate(rows)], "m2.csv"))
    with pytest.raises(LeakageDetected, match="identical"):
        audit_leakage(m2, splits, digests=["d1", "d1", "d2"])


def test_shared_cxr_manifest_checks():
    from conftest import shared

    m = load_manifest(shared("cxr") / "manifest.csv", classes=["normal", "pneumonia", "covid"])
    rep = check_manifest(m)
    assert rep["problems"] == [] and rep["images"] == 1182
    assert any("repeated" in w for w in rep["warnings"])  # one ieee8023 image is listed 4 times
    counts = {r["class"]: r["images"] for r in rep["counts"]}
    assert counts == {"normal": 414, "pneumonia": 462, "covid": 306}
