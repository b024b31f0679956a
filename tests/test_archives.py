"""`medres manifest import`: one small fixture per archive, written in the archive's own header and value
conventions (the published files; see the module docstrings in medres/archives/), imported, and checked
row by row: paths, views, patients, splits, label states, missing images and malformed rows."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medres.archives import ARCHIVES, import_archive
from medres.archives.vocabulary import VOCABULARY, table_md
from medres.errors import ArchiveInvalid, OutputExists


def _png(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def _dicom(path, view="PA", sex="F", age="045Y"):
    from helpers import gradient, make_dicom

    path.parent.mkdir(parents=True, exist_ok=True)
    make_dicom(path, gradient(16, 16), ViewPosition=view, PatientSex=sex, PatientAge=age)


def _read(out):
    return pd.read_csv(out, dtype=str, keep_default_na=False)


# --- NIH ChestX-ray14 --------------------------------------------------------------------------------
NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"


def _nih(root, *, trailing_comma=False, bad_row=False):
    root.mkdir(parents=True, exist_ok=True)
    lines = [NIH_HEADER + ("," if trailing_comma else "")]
    rows = [("00000001_000.png", "Cardiomegaly", 0, 1, "57", "M", "PA"), ("00000001_001.png", "Cardiomegaly|Effusion", 1, 1, "058Y", "M", "AP"),
            ("00000002_000.png", "No Finding", 0, 2, "81", "F", "PA"), ("00000003_000.png", "Pleural_Thickening|Hernia", 0, 3, "7", "F", "PA"),
            ("00000004_000.png", "Mass", 0, 4, "40", "M", "PA")]
    if bad_row:
        rows.append(("00000005_000.png", "Cardiomegally", 0, 5, "33", "F", "PA"))
    for r in rows:
        lines.append(",".join(str(v) for v in r) + ",2500,2048,0.143,0.143" + ("," if trailing_comma else ""))
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    for i, name in enumerate(r[0] for r in rows[:3]):
        _png(root / "images_001" / "images" / name, 50 + i)
    _png(root / "images_002" / "images" / "00000003_000.png")
    if bad_row:
        _png(root / "images_002" / "images" / "00000005_000.png")
    # 00000004_000.png is listed but absent
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000003_000.png\n00000004_000.png\n")
    (root / "test_list.txt").write_text("00000002_000.png\n")


def test_nih_import(tmp_path):
    src = tmp_path / "nih"
    _nih(src, trailing_comma=True)
    rep = import_archive("nih", src, tmp_path / "nih.csv")
    df = _read(tmp_path / "nih.csv")
    assert list(df["path"]) == ["images_001/images/00000001_000.png", "images_001/images/00000001_001.png", "images_001/images/00000002_000.png",
                                "images_002/images/00000003_000.png"]
    assert set(df["root"]) == {str(src.resolve())}
    assert list(df["patient_id"]) == ["1", "1", "2", "3"] and list(df["view"]) == ["PA", "AP", "PA", "PA"]
    assert list(df["age"]) == ["57", "58", "81", "7"] and list(df["sex"]) == ["M", "M", "F", "F"]
    assert list(df["official_split"]) == ["train", "train", "test", "train"] and set(df["source"]) == {"nih"}
    assert list(df["Cardiomegaly"]) == ["1", "1", "0", "0"] and list(df["Effusion"]) == ["0", "1", "0", "0"]
    assert list(df["No Finding"]) == ["0", "0", "1", "0"] and list(df["Pleural Thickening"]) == ["0", "0", "0", "1"]
    # labels NIH does not report are missing (blank), never negative
    assert (df["Lung Opacity"] == "").all() and (df["Support Devices"] == "").all()
    assert rep.missing == 1 and rep.rows == 4
    assert _read(tmp_path / "nih.missing.csv")["path"].tolist() == ["images/00000004_000.png"]
    counts = json.loads((tmp_path / "nih.import.json").read_text())["label_counts"]
    assert counts["Cardiomegaly"] == {"positive": 2, "negative": 2, "uncertain": 0, "missing": 0}
    assert counts["Lung Opacity"]["missing"] == 4
    assert rep.splits == {"test": 1, "train": 3}


def test_nih_malformed_row_is_named_and_left_out(tmp_path):
    src = tmp_path / "nih"
    _nih(src, bad_row=True)
    rep = import_archive("nih", src, tmp_path / "nih.csv")
    assert rep.malformed == ["Data_Entry_2017.csv:7: unknown finding 'Cardiomegally' or empty Image Index"]
    assert "00000005_000.png" not in " ".join(_read(tmp_path / "nih.csv")["path"])


def test_import_errors(tmp_path):
    with pytest.raises(ArchiveInvalid, match="no NIH label table"):
        import_archive("nih", tmp_path, tmp_path / "x.csv")
    (tmp_path / "Data_Entry_2017.csv").write_text("Image,Labels\na.png,Mass\n")
    with pytest.raises(ArchiveInvalid, match="missing column 'Image Index'"):
        import_archive("nih", tmp_path, tmp_path / "x.csv")
    src = tmp_path / "nih"
    _nih(src)
    import_archive("nih", src, tmp_path / "n.csv")
    with pytest.raises(OutputExists):
        import_archive("nih", src, tmp_path / "n.csv")
    with pytest.raises(Exception, match="unknown archive format"):
        import_archive("nope", src, tmp_path / "m.csv")


# --- CheXpert ------------------------------------------------------------------------------------------
CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,"
                   "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices")


def _chexpert(root):
    base = root / "CheXpert-v1.0-small"
    base.mkdir(parents=True)
    train = [
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
        "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
        "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,Female,87,Lateral,,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
        "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Male,0,Frontal,PA,,,1.0,,,0.0,,,,,1.0,,,",
    ]
    valid = ["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0"]
    (base / "train.csv").write_text(CHEXPERT_HEADER + "\n" + "\n".join(train) + "\n")
    (base / "valid.csv").write_text(CHEXPERT_HEADER + "\n" + "\n".join(valid) + "\n")
    for line in train + valid:
        _png(root / line.split(",")[0])


def test_chexpert_import_states_views_and_no_finding(tmp_path):
    _chexpert(tmp_path / "cx")
    rep = import_archive("chexpert", tmp_path / "cx", tmp_path / "cx.csv")
    df = _read(tmp_path / "cx.csv")
    assert df["path"].iloc[0] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert list(df["patient_id"]) == ["patient00001", "patient00002", "patient00002", "patient00003", "patient64541"]
    assert list(df["study_id"])[1] == "patient00002/study2"
    assert list(df["view"]) == ["AP", "AP", "LATERAL", "PA", "AP"] and list(df["sex"]) == ["F", "F", "F", "M", "M"]
    assert list(df["age"]) == ["68", "87", "87", "", "73"]  # CheXpert's age 0 means unknown
    assert list(df["official_split"]) == ["train", "train", "train", "train", "val"]
    # 1.0 / 0.0 / -1.0 / blank → 1 / 0 / -1 / missing; "Pleural Effusion" is the shared "Effusion"
    assert list(df["Cardiomegaly"]) == ["0", "-1", "-1", "1", "1"]
    assert list(df["Effusion"]) == ["0", "-1", "-1", "1", "0"]
    assert list(df["Edema"]) == ["0", "-1", "-1", "0", "0"]
    assert df["Pneumonia"].iloc[3] == "" and df["Pneumothorax"].iloc[0] == "0"
    # No Finding = 1: its blank pathologies are negatives, Support Devices keeps its own value
    assert df["Support Devices"].iloc[0] == "1" and df["Lung Lesion"].iloc[0] == "0"
    assert (df["Nodule"] == "").all()  # not a CheXpert observation: missing
    assert rep.counts["Cardiomegaly"] == {"positive": 2, "negative": 1, "uncertain": 2, "missing": 0}


def test_chexpert_malformed_value(tmp_path):
    _chexpert(tmp_path / "cx")
    t = tmp_path / "cx" / "CheXpert-v1.0-small" / "train.csv"
    t.write_text(t.read_text().replace("Female,68,Frontal,AP,1.0,", "Female,68,Frontal,AP,2.0,"))
    rep = import_archive("chexpert", tmp_path / "cx", tmp_path / "cx.csv")
    assert rep.malformed == ["train.csv:2: column 'No Finding' is '2.0'; expected 1.0, 0.0, -1.0 or blank"] and rep.rows == 4


# --- MIMIC-CXR-JPG ---------------------------------------------------------------------------------
def _gz(path, text):
    with gzip.open(path, "wt") as fh:
        fh.write(text)


def test_mimic_import_joins_three_tables(tmp_path):
    src = tmp_path / "mimic"
    src.mkdir()
    _gz(src / "mimic-cxr-2.0.0-chexpert.csv.gz", "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
        "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
        "10000032,50414267,,,,,,,,,1.0,,,,,\n10000032,53189527,-1.0,1.0,,,,,,,,0.0,,,,\n")
    _gz(src / "mimic-cxr-2.0.0-metadata.csv.gz", "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
        "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning\n"
        "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect\n"
        "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect\n"
        "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PORTABLE AP),AP,3056,2544,21800626,165500.312,CHEST (PORTABLE AP),antero-posterior,\n"
        "ffffffff-00000000-00000000-00000000-00000000,10000099,59999999,CHEST,PA,10,10,21800101,0,CHEST,postero-anterior,Erect\n")
    _gz(src / "mimic-cxr-2.0.0-split.csv.gz", "dicom_id,study_id,subject_id,split\n"
        "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,50414267,10000032,train\n174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,50414267,10000032,train\n"
        "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,53189527,10000032,validate\nffffffff-00000000-00000000-00000000-00000000,59999999,10000099,test\n")
    for d, s in (("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "50414267"), ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "50414267"),
                 ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "53189527")):
        _png(src / "files" / "p10" / "p10000032" / f"s{s}" / f"{d}.jpg")
    rep = import_archive("mimic-cxr-jpg", src, tmp_path / "m.csv")
    df = _read(tmp_path / "m.csv")
    assert df["path"].iloc[0] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    assert list(df["view"]) == ["PA", "LATERAL", "AP"] and list(df["official_split"]) == ["train", "train", "val"]
    assert list(df["Atelectasis"]) == ["0", "0", "-1"] and list(df["Cardiomegaly"]) == ["0", "0", "1"] and list(df["Effusion"]) == ["0", "0", "0"]
    assert list(df["No Finding"]) == ["1", "1", ""] and (df["sex"] == "").all()
    assert rep.removed == {"images of studies without a CheXpert label row": 1}


# --- PadChest ----------------------------------------------------------------------------------------
def test_padchest_import(tmp_path):
    src = tmp_path / "pc"
    header = ("ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,Projection,MethodProjection,"
              "Labels,Localizations")
    rows = ['a_00-001.png,0,20140101,s1,p1,1950.0,M,POSTEROANTERIOR,PA,Manual review of DICOM fields,"[\'pleural effusion\', \'cardiomegaly\']",[]',
            'b_00-002.png,0,20150601,s2,p2,1980.0,F,LATERAL,L,Manual review of DICOM fields,"[\'normal\']",[]',
            'c_00-003.png,1,20160101,s3,p3,,O,,AP_horizontal,Manual review of DICOM fields,"[\'pacemaker\', \' chronic changes\']",[]',
            "d_00-004.png,1,20160101,s4,p4,1970.0,F,,PA,Manual review of DICOM fields,,[]"]
    src.mkdir()
    (src / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    _png(src / "0" / "a_00-001.png")
    _png(src / "flat" / "b_00-002.png")
    _png(src / "1" / "c_00-003.png")
    rep = import_archive("padchest", src, tmp_path / "pc.csv")
    df = _read(tmp_path / "pc.csv")
    assert list(df["path"]) == ["0/a_00-001.png", "flat/b_00-002.png", "1/c_00-003.png"]
    assert list(df["view"]) == ["PA", "LATERAL", "AP"] and list(df["age"]) == ["64", "35", ""] and list(df["sex"]) == ["M", "F", ""]
    assert list(df["Effusion"]) == ["1", "0", "0"] and list(df["Cardiomegaly"]) == ["1", "0", "0"] and list(df["No Finding"]) == ["0", "1", "0"]
    assert list(df["Support Devices"]) == ["0", "0", "1"] and (df["Lung Opacity"] == "").all()
    assert df["padchest_labels"].iloc[2] == "pacemaker|chronic changes"
    assert rep.removed == {"rows without findings (blank Labels)": 1}


# --- RSNA, VinDr-CXR, covid-chestxray-dataset ---------------------------------------------------------
def test_rsna_import_merges_box_rows_and_reads_headers(tmp_path):
    src = tmp_path / "rsna"
    src.mkdir()
    (src / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\n0004cfab,,,,,0\n00436515,264.0,152.0,213.0,379.0,1\n"
                                                  "00436515,562.0,152.0,256.0,453.0,1\n00704310,,,,,0\n")
    (src / "stage_2_detailed_class_info.csv").write_text("patientId,class\n0004cfab,No Lung Opacity / Not Normal\n00436515,Lung Opacity\n"
                                                         "00436515,Lung Opacity\n00704310,Normal\n")
    _dicom(src / "stage_2_train_images" / "0004cfab.dcm", view="PA", sex="F", age="51")
    _dicom(src / "stage_2_train_images" / "00436515.dcm", view="AP", sex="M", age="048Y")
    _dicom(src / "stage_2_train_images" / "00704310.dcm", view="PA", sex="M", age="155")
    import_archive("rsna-pneumonia", src, tmp_path / "r.csv")
    df = _read(tmp_path / "r.csv")
    assert list(df["patient_id"]) == ["0004cfab", "00436515", "00704310"] and list(df["path"])[1] == "stage_2_train_images/00436515.dcm"
    assert list(df["Pneumonia"]) == ["0", "1", "0"] and list(df["Lung Opacity"]) == ["0", "1", "0"] and list(df["No Finding"]) == ["0", "0", "1"]
    assert list(df["view"]) == ["PA", "AP", "PA"] and list(df["sex"]) == ["F", "M", "M"] and list(df["age"]) == ["51", "48", ""]


def test_vindr_import_majority_of_readers(tmp_path):
    src = tmp_path / "vindr"
    (src / "annotations").mkdir(parents=True)
    labels = ["Aortic enlargement", "Cardiomegaly", "Pleural effusion", "Rib fracture", "Clavicle fracture", "Other diseases", "No finding"]
    train = ["image_id,rad_id," + ",".join(labels),
             "img1,R1,1,1,0,0,0,0,0", "img1,R2,0,1,0,1,0,0,0", "img1,R3,1,0,0,0,0,1,0",
             "img2,R4,0,0,0,0,0,0,1", "img2,R5,0,0,1,0,0,0,1", "img2,R6,0,0,0,0,0,0,1"]
    (src / "annotations" / "image_labels_train.csv").write_text("\n".join(train) + "\n")
    test = ["image_id," + ",".join(labels).replace("Other diseases", "Other disease"), "img3,0,0,1,0,1,0,0"]
    (src / "annotations" / "image_labels_test.csv").write_text("\n".join(test) + "\n")
    for split, img in (("train", "img1"), ("train", "img2"), ("test", "img3")):
        _dicom(src / split / f"{img}.dicom")
    import_archive("vindr-cxr", src, tmp_path / "v.csv")
    df = _read(tmp_path / "v.csv")
    assert list(df["path"]) == ["train/img1.dicom", "train/img2.dicom", "test/img3.dicom"] and list(df["official_split"]) == ["train", "train", "test"]
    assert list(df["Cardiomegaly"]) == ["1", "0", "0"] and list(df["Aortic enlargement"]) == ["1", "0", "0"]  # 2 of 3 readers
    assert list(df["Effusion"]) == ["0", "0", "1"] and list(df["No Finding"]) == ["0", "1", "0"]
    assert list(df["Fracture"]) == ["0", "0", "1"]  # 1 of 3 readers marked the rib fracture; the test consensus marks the clavicle
    assert list(df["Other disease"]) == ["0", "0", "0"] and (df["Atelectasis"] == "").all() and list(df["sex"]) == ["F", "F", "F"]


def test_covid_chestxray_import(tmp_path):
    src = tmp_path / "covid"
    src.mkdir()
    header = ("patientid,offset,sex,age,finding,RT_PCR_positive,survival,intubated,intubation_present,went_icu,in_icu,needed_supplemental_O2,extubated,"
              "temperature,pO2_saturation,leukocyte_count,neutrophil_count,lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,"
              "clinical_notes,other_notes,")
    rows = ["2,0,M,65,Pneumonia/Viral/COVID-19,Y,,,,,,,,,,,,,PA,X-ray,2020,China,images,a.jpg,,,,,,",
            "3,,F,30,No Finding,,,,,,,,,,,,,,AP Supine,X-ray,2020,Italy,images,b.png,,,,,,",
            "4,,F,50,Pneumonia/Bacterial/Streptococcus,,,,,,,,,,,,,,L,X-ray,2020,Spain,images,c.png,,,,,,",
            "5,,M,70,Pneumonia/Viral/COVID-19,,,,,,,,,,,,,,Axial,CT,2020,China,volumes,d.nii.gz,,,,,,",
            "6,,,,todo,,,,,,,,,,,,,,PA,X-ray,2020,,images,e.png,,,,,,"]
    (src / "metadata.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    for name in ("a.jpg", "b.png", "c.png", "e.png"):
        _png(src / "images" / name)
    rep = import_archive("covid-chestxray", src, tmp_path / "c.csv")
    df = _read(tmp_path / "c.csv")
    assert list(df["path"]) == ["images/a.jpg", "images/b.png", "images/c.png", "images/e.png"] and list(df["view"]) == ["PA", "AP", "LATERAL", "PA"]
    assert list(df["COVID-19"]) == ["1", "0", "0", ""] and list(df["Pneumonia"]) == ["1", "0", "1", ""] and list(df["No Finding"]) == ["0", "1", "0", ""]
    assert rep.removed == {"CT rows (not X-ray)": 1}


def test_vocabulary_table_covers_every_archive():
    assert len(ARCHIVES) == 7
    for archive in ARCHIVES.values():
        assert set(archive.label_names) <= set(VOCABULARY), archive.name
    table = table_md()
    assert "| Effusion | Effusion | Pleural Effusion | Pleural Effusion |" in table


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_imported_manifest_trains_multilabel_with_uncertain_labels_and_evaluates(tmp_path):
    """End to end: a CheXpert-format archive → import → a multilabel run with U-Ones for one label and
    masked uncertain/missing labels for another → evaluate --run (its data.root-free, root-column paths)."""
    from typer.testing import CliRunner

    from medres.cli import app
    from medres.config import load_config
    from medres.data.synthetic import make_dataset
    from medres.train import fit

    phantoms = make_dataset(tmp_path / "ph", n_per_class=12, size=64, classes=("normal", "opacity"), seed=2)
    ph = pd.read_csv(phantoms)
    base = tmp_path / "cx"
    root = base / "CheXpert-v1.0-small"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [CHEXPERT_HEADER]
    for i, row in ph.iterrows():
        rel = f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.jpg"
        (base / rel).parent.mkdir(parents=True)
        (base / rel).write_bytes((phantoms.parent / row["path"]).read_bytes())
        opacity = "1.0" if row["label"] == "opacity" else "0.0"
        edema = rng.choice(["1.0", "0.0", "-1.0", ""])
        cells = {"Lung Opacity": opacity if i % 7 else "-1.0", "Edema": edema}
        lines.append(f"{rel},Female,50,Frontal,PA," + ",".join(cells.get(o, "") for o in CHEXPERT_HEADER.split(",")[5:]))
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["manifest", "import", "chexpert", str(base), "--out", str(tmp_path / "m" / "cx.csv")])
    assert result.exit_code == 0, result.output
    cfg = load_config(None, [  # defaults + overrides, as a user's YAML would set them
        f"data.manifest={tmp_path / 'm' / 'cx.csv'}", "data.classes=[Lung Opacity, Edema]", "data.task=multilabel", "data.image_size=64",
        "data.uncertain={Lung Opacity: ones}", "data.views=[PA]", "model.weights=none", "train.epochs=1", "train.batch_size=8", "train.freeze_epochs=0",
        "eval.bootstrap=20"])
    run = tmp_path / "run"
    fit(cfg, run, show_progress=False)
    sel = json.loads((run / "selection.json").read_text())
    assert sel["label_states"]["Edema"]["uncertain"] > 0 and sel["steps"][-1]["step"] == "rows with a label for at least one class"
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--split", "", "--out", str(out), "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    edema = metrics["per_class"]["Edema"]
    labelled = sum(1 for line in lines[1:] if line.split(",")[5 + CHEXPERT_HEADER.split(",")[5:].index("Edema")] in ("1.0", "0.0"))
    assert edema["labelled"] == labelled < len(ph)  # uncertain (ignored) and blank Edema labels are not counted
    assert metrics["per_class"]["Lung Opacity"]["labelled"] == len(ph)  # U-Ones: every Lung Opacity label counts
