"""`evaluate` end to end on a trained phantom run."""

import json

import numpy as np
import pandas as pd
import pytest

from medres.evaluate import evaluate
from medres.model import load_checkpoint


def test_evaluate_run(trained_run, phantoms, tmp_path):
    out = tmp_path / "eval"
    res = evaluate(trained_run / "model.safetensors", phantoms, out, split="test", splits_csv=trained_run / "splits.csv", by=["site"], bootstrap=50)
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"] > 0 and m["patients"] > 0
    for c in ("normal", "opacity", "diffuse"):
        row = m["per_class"][c]
        assert {"auroc", "auroc_ci", "sensitivity", "specificity", "ppv", "npv", "f1", "average_precision"} <= set(row)
    assert "confusion_matrix" in m and "accuracy_ci" in m
    assert set(m["calibration"]) == {"temperature", "before", "after"}
    assert m["subgroups"][0]["column"] == "site" and set(m["subgroups"][0]["groups"]) <= {"A", "B"}
    # operating points come from the checkpoint (chosen on validation), not from the test split
    _, meta = load_checkpoint(trained_run / "model.safetensors")
    assert [m["operating_points"]["thresholds"][c] for c in meta.classes] == pytest.approx(meta.thresholds)
    per_case = pd.read_csv(out / "per_case.csv")
    test_paths = set(pd.read_csv(trained_run / "splits.csv").query("split == 'test'")["path"])
    assert set(per_case["path"]) == test_paths
    for name in ("roc.png", "pr.png", "reliability.png", "confusion.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "Research use only" in html and "roc.png" in html


def test_subgroup_shortcut_warning(trained_run, phantoms, tmp_path):
    """A column the model's outputs predict (here: hospital = which side of the median the model's
    opacity score falls) must raise the shortcut warning itself, not only per-group notes."""
    first = evaluate(trained_run / "model.safetensors", phantoms, tmp_path / "a", split=None, bootstrap=0, plots=False)
    per_case = pd.read_csv(tmp_path / "a" / "per_case.csv")
    score = per_case["prob_opacity"].to_numpy()
    source = dict(zip(per_case["path"], np.where(score > np.median(score), "hospital-x", "hospital-y")))
    df = pd.read_csv(phantoms)
    df["source"] = df["path"].map(source)
    m = phantoms.parent / "with_source.csv"
    df.to_csv(m, index=False)
    res = evaluate(trained_run / "model.safetensors", m, tmp_path / "e", split=None, by=["source"], bootstrap=20, plots=False)
    assert res["subgroups"][0]["predictability_auroc"] >= 0.8
    shortcut = [w for w in res["warnings"] if "is predictable from the model outputs" in w]
    assert len(shortcut) == 1 and shortcut[0].startswith("source is predictable") and first["warnings"] == [w for w in first["warnings"] if "predictable" not in w]


def test_column_predictability_detects_shortcut():
    from medres.evaluate import column_predictability

    rng = np.random.default_rng(0)
    values = np.array(["a"] * 50 + ["b"] * 50)
    logits = rng.normal(0, 1, (100, 3))
    logits[:50, 0] += 3
    assert column_predictability(logits, values, np.arange(100).astype(str)) > 0.9
    assert column_predictability(rng.normal(0, 1, (100, 3)), values, np.arange(100).astype(str)) < 0.75


def test_subgroup_differs_warning_on_toy_arrays():
    from medres.evaluate import subgroup_audit

    rng = np.random.default_rng(0)
    n = 200
    y = np.zeros((n, 2))
    y[np.arange(n), rng.integers(0, 2, n)] = 1
    p = np.where(y > 0, 0.9, 0.1)  # group B: perfect
    a = np.arange(n) < 100
    p[a] = rng.random((100, 2))  # group A: chance
    p = p / p.sum(1, keepdims=True)
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "site": np.where(a, "A", "B")})
    table, warns = subgroup_audit(y, p, np.log(p), frame, "site", ["x", "z"], "multiclass", [0.5, 0.5], 200, 0)
    assert table["groups"]["A"]["images"] == 100 and table["groups"]["A"]["patients"] == 100
    assert any(w.startswith("site=A: x AUROC") and "differs from the rest" in w for w in warns)
    assert not any(w.startswith("site=B") and "differs" in w for w in warns)  # perfect group: zero-width CI is not used
