"""`medres evaluate --top-losses N`: the N highest-loss cases, recomputed here from per_case.csv."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from medres.top_losses import per_case_loss, top_loss_rows


def test_top_losses_are_the_largest_per_case_losses(trained_run, tmp_path):
    from medres.cli import app

    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", "--run", str(trained_run), "--split", "", "--bootstrap", "0", "--top-losses", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "top losses: 4 cases" in r.output

    # Independently: cross-entropy of each row's true class on per_case.csv's probabilities.
    table = pd.read_csv(out / "per_case.csv", dtype={"label": str})
    p_true = table.apply(lambda row: row[f"prob_{row['label']}"], axis=1).clip(1e-7, 1 - 1e-7)
    loss = -np.log(p_true.to_numpy(dtype=float))
    expected = np.sort(loss)[::-1][:4]
    by_path = dict(zip(table["path"], loss))

    report = json.loads((out / "top_losses" / "top_losses.json").read_text())
    cases = report["cases"]
    assert [c["rank"] for c in cases] == [1, 2, 3, 4]
    np.testing.assert_allclose([c["loss"] for c in cases], expected, rtol=1e-9)  # sorted, and the four largest
    for c in cases:
        assert math.isclose(c["loss"], by_path[c["path"]], rel_tol=1e-9)
        row = table[table["path"] == c["path"]].iloc[0]
        assert c["truth"] == [row["label"]] and c["prediction"] == [row["prediction"]]
        roles = {im["class"]: im["role"] for im in c["images"]}
        assert "truth" in roles[row["label"]] and "prediction" in roles[row["prediction"]]
        for im in c["images"]:
            assert (out / "top_losses" / im["file"]).read_bytes()[:4] == b"\x89PNG"
    page = (out / "top_losses" / "index.html").read_text()
    assert all(c["path"] in page for c in cases)
    assert json.loads((out / "metrics.json").read_text())["top_losses"]["cases"] == 4


def test_multilabel_loss_leaves_masked_labels_out():
    y = np.array([[1, 0, np.nan], [0, np.nan, np.nan], [1, 1, 0]], dtype=float)
    p = np.array([[0.9, 0.2, 0.99], [0.7, 0.5, 0.5], [0.5, 0.5, 0.5]])
    loss = per_case_loss(y, p, "multilabel")
    np.testing.assert_allclose(loss, [-math.log(0.9) - math.log(0.8), -math.log(0.3), 3 * math.log(2)])
    assert list(top_loss_rows(loss, 2)) == [2, 1]
    # multiclass: -log p(true), clipped so that p = 0 stays finite; ties keep the evaluated order
    mc = per_case_loss(np.eye(3)[[0, 1, 2]], np.array([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [0.2, 0.2, 0.6]]), "multiclass")
    np.testing.assert_allclose(mc, [-math.log(1e-7), -math.log(1e-7), -math.log(0.6)])
    assert list(top_loss_rows(mc, 3)) == [0, 1, 2]
