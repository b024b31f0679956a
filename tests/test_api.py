"""The Python API (medres/api.py): the same scoring path as `medres predict`, DataFrames back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medres import api


def test_load_predict_explain(trained_run, phantoms, tmp_path):
    from medres.predict import predict

    model = api.load(trained_run)  # a run folder
    assert model.classes == ["normal", "opacity", "diffuse"]
    table = model.predict([phantoms])
    predict(trained_run / "model.safetensors", [phantoms], tmp_path / "p.csv", workers=0)
    cli = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == list(cli.columns) and table["path"].tolist() == cli["path"].tolist()
    assert table["prob_normal"].tolist() == cli["prob_normal"].tolist()  # identical to the command's table
    frame = pd.read_csv(phantoms).head(3)
    frame["path"] = [str(phantoms.parent / p) for p in frame["path"]]
    assert model.predict(frame)["prob_opacity"].tolist() == cli.set_index("path").loc[pd.read_csv(phantoms).head(3)["path"], "prob_opacity"].tolist()
    out = model.explain(frame["path"][0])
    assert set(out["probs"]) == set(model.classes) and abs(sum(out["probs"].values()) - 1) < 1e-5
    (cls, cam), = out["maps"].items()
    assert cls == max(out["probs"], key=out["probs"].get) and cam.shape == (96, 96) and np.isfinite(cam).all()
    assert model.explain(frame["path"][0], target="diffuse")["maps"].keys() == {"diffuse"}


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_train_and_evaluate(phantoms, tmp_path):
    summary = api.train("smoke", [f"data.manifest={phantoms}", "data.image_size=32", "train.epochs=1", "eval.bootstrap=10"], out=tmp_path / "run")
    assert summary["epochs"] and (tmp_path / "run" / "model.safetensors").exists()
    metrics = api.evaluate(tmp_path / "run", out=tmp_path / "eval", bootstrap=10)
    assert metrics["images"] > 0 and (tmp_path / "eval" / "metrics.json").exists()
