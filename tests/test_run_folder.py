"""The run folder (medres/run.py) and the paths into a run: `evaluate --run` on a run trained with
`data.root` (issue: it resolved paths against the manifest's folder and crashed), clear errors for an
evaluation set with no readable image, `--checkpoint RUN_FOLDER`, shipped configs by name, and
`manifest build` sniffing every file by content."""

from __future__ import annotations

import json
import os
import shutil
import tomllib

import pandas as pd
import pytest
from typer.testing import CliRunner

from medres.cli import app
from medres.config import find_config, load_config, shipped_configs
from medres.errors import ConfigInvalid

from helpers import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def rooted_run(tmp_path_factory, phantoms):
    """A 1-epoch run whose manifest lives apart from its images: paths are relative to data.root."""
    from medres.train import fit

    base = tmp_path_factory.mktemp("rooted")
    df = pd.read_csv(phantoms)
    (base / "manifests").mkdir()
    df.to_csv(base / "manifests" / "m.csv", index=False)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.manifest={base / 'manifests' / 'm.csv'}", f"data.root={phantoms.parent}",
                                                       "train.epochs=1", "eval.bootstrap=10"])
    fit(cfg, base / "run", show_progress=False)
    return base / "run"


def test_evaluate_run_uses_the_runs_data_root(rooted_run, tmp_path):
    res = CliRunner().invoke(app, ["evaluate", "--run", str(rooted_run), "--out", str(tmp_path / "e"), "--bootstrap", "10"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    splits = pd.read_csv(rooted_run / "splits.csv")
    assert m["images"] == int((splits["split"] == "test").sum()) > 0


def test_evaluate_with_no_readable_image_is_one_line(rooted_run, tmp_path):
    """The run's images moved away: a one-line error naming the split and the row count, no traceback."""
    run = tmp_path / "run"
    shutil.copytree(rooted_run, run)
    cfg = (run / "config.yaml").read_text()
    gone = tmp_path / "gone"
    gone.mkdir()
    (run / "config.yaml").write_text(cfg.replace(f"root: {load_config(rooted_run / 'config.yaml').data.root}", f"root: {gone}"))
    res = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--out", str(tmp_path / "e"), "--bootstrap", "10", "--store-dir", str(tmp_path / "s")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "[MANIFEST_INVALID]" in res.output and "split test:" in res.output and "none of their images could be read" in res.output
    res = CliRunner().invoke(app, ["evaluate", "--run", str(rooted_run), "--split", "nope", "--out", str(tmp_path / "e2")])
    assert res.exit_code == 2 and "no rows with split=nope" in res.output


def test_checkpoint_may_be_a_run_folder(rooted_run, phantoms, tmp_path):
    res = CliRunner().invoke(app, ["predict", str(phantoms), "--checkpoint", str(rooted_run), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "p.csv")) > 0


def test_recorded_config_works_from_any_folder(rooted_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(rooted_run / "config.yaml")
    assert cfg.data.manifest.is_absolute() and cfg.data.manifest.is_file()


def test_shipped_configs_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository
    assert find_config("covid_xray.yaml") == find_config("covid_xray") == shipped_configs()["covid_xray"]
    assert load_config("chexpert5").data.classes == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion"]
    with pytest.raises(ConfigInvalid, match="shipped configs: .*covid_xray"):
        find_config("nope.yaml")
    res = CliRunner().invoke(app, ["configs"])
    assert res.exit_code == 0 and "nih14" in res.output and "covid_xray" in res.output


def test_packaging_lists_every_package():
    """pyproject lists packages explicitly (configs/ is installed as medres.configs): none may be forgotten."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(p.parent, ROOT).replace(os.sep, ".") for p in (ROOT / "medres").rglob("__init__.py")}
    assert found | {"medres.configs"} == listed


def test_manifest_build_sniffs_content_not_extensions(tmp_path):
    """A class folder of UID-named DICOMs (no extension, as PACS exports them) is kept; a stray text file
    is listed with its code; sidecars are skipped by predict's rule."""
    from helpers import gradient, make_dicom
    from PIL import Image

    (tmp_path / "d" / "normal").mkdir(parents=True)
    (tmp_path / "d" / "covid").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(gradient(8, 8, 200).astype("uint8")).save(tmp_path / "d" / "normal" / f"n{i}.png")
        make_dicom(tmp_path / "d" / "covid" / f"1.2.840.113619.2.55.{i}", gradient(8, 8))
    (tmp_path / "d" / "covid" / "notes").write_text("not an image")
    (tmp_path / "d" / "covid" / "index.json").write_text("{}")
    res = CliRunner().invoke(app, ["manifest", "build", str(tmp_path / "d"), "--out", str(tmp_path / "d" / "m.csv")])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "d" / "m.csv")
    assert sorted(df["label"].unique()) == ["covid", "normal"] and (df["label"] == "covid").sum() == 2
    assert "2 classes" in res.output and "1 non-image files skipped" in res.output and "[NOT_AN_IMAGE] covid/notes" in res.output


def test_newcomer_messages_name_the_folder_and_the_file(tmp_path, rooted_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("sidecar")
    res = CliRunner().invoke(app, ["predict", str(empty), "--checkpoint", str(rooted_run), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 2 and f"[NO_INPUTS] no input files found in {empty}" in res.output
    m = tmp_path / "m.csv"
    m.write_text("path,patient_id\na.png,p1\n")
    res = CliRunner().invoke(app, ["manifest", "check", str(m)])
    assert res.exit_code == 2 and f"{m}: no label column" in res.output
