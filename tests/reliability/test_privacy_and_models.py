"""Reliability cases 17–21: no identifiers leak; checkpoints never execute code."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import IDENTIFIERS, gradient, make_dicom
from medres.cli import app
from medres.errors import CheckpointInvalid
from medres.model import ModelMeta, build_model, load_checkpoint, read_weight_file, save_checkpoint

runner = CliRunner()


def secrets(ds_path):
    import pydicom

    ds = pydicom.dcmread(ds_path)
    values = list(IDENTIFIERS.values()) + ["19491231", "20240229", str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    return [v for v in values if v]


# 17 -----------------------------------------------------------------------------------------------
def test_no_identifiers_in_any_output(trained_run, phantoms, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    dcm = make_dicom(d / "study.dcm", gradient(80, 64), identifiers=True, WindowCenter=2000, WindowWidth=4000)
    bad = make_dicom(d / "broken.dcm", gradient(80, 64), identifiers=True)
    bad.write_bytes(bad.read_bytes()[:-50])
    secret = secrets(dcm) + secrets(bad)
    out = tmp_path / "out"
    ckpt = str(trained_run / "model.safetensors")
    outputs = []
    r1 = runner.invoke(app, ["--verbose", "predict", "--checkpoint", ckpt, str(d), "--out", str(out / "p.csv"), "-q", "--workers", "0"])
    r2 = runner.invoke(app, ["--verbose", "report", "--checkpoint", ckpt, str(d), "--out", str(out / "report"), "--dicom-sc"])
    m = d / "m.csv"
    m.write_text("path,label,patient_id\nstudy.dcm,normal,p1\nbroken.dcm,opacity,p2\n")
    r3 = runner.invoke(app, ["--verbose", "evaluate", "--checkpoint", ckpt, "--manifest", str(m), "--split", "", "--bootstrap", "10", "--out", str(out / "eval")])
    # predict and report: some inputs failed (broken.dcm) → 1; evaluate skips the bad row → 0.
    for r, code in ((r1, 1), (r2, 1), (r3, 0)):
        outputs.append(r.output)
        assert r.exit_code == code, r.output
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) > 5
    for s in secret:
        for text in outputs:
            assert s not in text
        for f in files:
            assert s not in f.name
            assert s.encode() not in f.read_bytes(), (f, s)


def test_identifiers_only_with_opt_in(trained_run, tmp_path):
    import pydicom

    d = tmp_path / "in"
    d.mkdir()
    make_dicom(d / "study.dcm", gradient(80, 64), identifiers=True, WindowCenter=2000, WindowWidth=4000)
    r = runner.invoke(app, ["report", "--checkpoint", str(trained_run / "model.safetensors"), str(d), "--out", str(tmp_path / "r"), "--dicom-sc", "--include-identifiers"])
    assert r.exit_code == 0
    sc = pydicom.dcmread(next((tmp_path / "r" / "cases").glob("*.dcm")))
    assert sc.PatientName == IDENTIFIERS["PatientName"]


# 18 -----------------------------------------------------------------------------------------------
def test_overlay_planes_not_rendered(tmp_path):
    import numpy as np
    import pydicom

    from medres.io import PreprocessSpec, load_image

    a = gradient(32, 32)
    plain = make_dicom(tmp_path / "plain.dcm", a, WindowCenter=2000, WindowWidth=4000)
    over = make_dicom(tmp_path / "over.dcm", a, WindowCenter=2000, WindowWidth=4000)
    ds = pydicom.dcmread(over)
    ds.add_new(0x60000010, "US", 32)
    ds.add_new(0x60000011, "US", 32)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", np.packbits(np.ones(32 * 32, np.uint8), bitorder="little").tobytes())
    ds.save_as(over)
    a1 = load_image(plain, PreprocessSpec(32))
    a2 = load_image(over, PreprocessSpec(32))
    assert np.array_equal(a1.pixels, a2.pixels)
    assert any("overlay" in w for w in a2.record.warnings)


# 19 -----------------------------------------------------------------------------------------------
class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_payload_refused_and_never_runs(tmp_path, monkeypatch):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": Evil(str(target))}, fh)
    with pytest.raises(CheckpointInvalid, match="refused"):
        read_weight_file(path)
    assert not target.exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("path,label,patient_id\na.png,a,1\n")
    r = runner.invoke(app, ["train", "--set", f"model.weights={path}", "--set", "data.manifest=m.csv", "--set", "data.classes=[a]", "-q"])
    assert r.exit_code == 3 and "CHECKPOINT_INVALID" in r.output and "refused" in r.output, r.output
    assert not target.exists()


# 20 -----------------------------------------------------------------------------------------------
def test_corrupt_checkpoints_exit_3(trained_run, tmp_path):
    from PIL import Image

    Image.new("L", (8, 8), 50).save(tmp_path / "a.png")
    ckpt = trained_run / "model.safetensors"
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    # wrong head: metadata says 2 classes, tensors have 3
    model, meta = load_checkpoint(ckpt)
    meta.classes = ["a", "b"]
    wrong_head = tmp_path / "head.safetensors"
    save_checkpoint(wrong_head, model, meta)
    # wrong architecture: tensors of another network with medres metadata
    from safetensors.torch import save_file
    import json
    from dataclasses import asdict

    wrong_arch = tmp_path / "arch.safetensors"
    save_file({"features.0.weight": torch.zeros(4, 3, 3, 3)}, str(wrong_arch), metadata={"medres": json.dumps(asdict(meta))})
    for bad, needle in ((truncated, "CHECKPOINT_INVALID"), (wrong_head, "shape mismatch"), (wrong_arch, "missing")):
        r = runner.invoke(app, ["predict", "--checkpoint", str(bad), str(tmp_path / "a.png"), "--out", str(tmp_path / f"{bad.stem}.csv"), "-q"])
        assert r.exit_code == 3, (bad, r.output)
        assert needle in r.output


# 21 -----------------------------------------------------------------------------------------------
def test_old_torch_refused():
    import medres

    with pytest.raises(ImportError, match="torch >= 2.10"):
        medres._check_torch_version("2.9.1+cpu")
    medres._check_torch_version("2.10.0")
    medres._check_torch_version("2.13.0+cpu")
