"""`medres predict --benchmark`: per-stage figures on the user's own files, with the machine they were
measured on (never asserted as timings: only that every stage ran on the files given)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from medres.cli import app


def test_predict_benchmark_reports_every_stage(trained_run, phantoms, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["predict", str(phantoms.parent / "images"), "--checkpoint", str(trained_run / "model.safetensors"),
                                   "--out", str(out), "--benchmark", "--benchmark-files", "20", "--workers", "1"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["files"] == 20 and data["decoded_ok"] == 20
    assert set(data["stages"]) == {"decode", "forward", "write", "end_to_end"}
    assert all(s["images_per_s"] > 0 and s["seconds"] >= 0 for s in data["stages"].values())
    assert data["stages"]["forward"]["ood_features"] is True  # the path predict really runs, gate included
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch_isa"] and data["machine"]["cpu"]
    assert data["bottleneck"] in ("decode", "forward", "write")
    for stage in ("decode", "forward", "write", "end_to_end"):
        assert stage in res.output
    assert not (tmp_path / "e2e.csv").exists()  # the timed end-to-end run writes into a temporary folder
