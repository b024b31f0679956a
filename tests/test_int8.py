"""The int8 path: `medres export --quantize int8` (static, calibrated on the run's validation images)
and `medres predict --precision int8`, end to end through the CLI on a tiny trained model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")

from medres.cli import app  # noqa: E402
from medres import onnx as onnx_io  # noqa: E402

runner = CliRunner()
INT8_TOLERANCE = 0.05  # max |Δprob| int8 vs fp32 stated in the README (real models: 0.02–0.05)


@pytest.fixture(scope="module")
def int8_run(trained_run, tmp_path_factory):
    """A copy of the tiny run with its int8 model exported beside the checkpoint (the default place)."""
    run = tmp_path_factory.mktemp("int8") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("*.onnx", "eval*", "report*"))
    r = runner.invoke(app, ["export", "--checkpoint", str(run / "model.safetensors"), "--format", "onnx", "--quantize", "int8"])
    assert r.exit_code == 0, r.output
    assert "int8; calibrated on" in r.output
    return run


def test_int8_model_records_its_calibration_and_weights(int8_run):
    props = onnx_io.read_onnx_meta(int8_run / "model.int8.onnx")
    assert props["medres.precision"] == "int8"
    cal = json.loads(props["medres.calibration"])
    splits = pd.read_csv(int8_run / "splits.csv")
    val = sorted(splits.loc[splits["split"] == "val", "path"])
    assert cal["files"] == val and cal["count"] == len(val) and "split val" in cal["source"]
    settings = json.loads(props["medres.quantization"])
    assert settings["format"] == "QDQ" and "reduce_range" in settings["weights"]
    from medres.model import load_checkpoint

    assert props["medres.weights_digest"] == onnx_io.weights_digest(load_checkpoint(int8_run / "model.safetensors")[0])
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8_run / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantized, not the fp32 graph


def test_predict_int8_end_to_end_matches_fp32(int8_run, phantoms, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "cpu_flags", lambda: {"avx2"})  # the same path on any CI CPU
    images = phantoms.parent / "images"
    ckpt = str(int8_run / "model.safetensors")
    for precision in ("fp32", "int8"):
        r = runner.invoke(app, ["predict", "--checkpoint", ckpt, str(images), "--out", str(tmp_path / f"{precision}.csv"), "-q", "--workers", "0", "--precision", precision])
        assert r.exit_code == 0, r.output
    a, b = pd.read_csv(tmp_path / "fp32.csv"), pd.read_csv(tmp_path / "int8.csv")
    assert list(a["path"]) == list(b["path"]) and (b["status"] == "ok").all()
    cols = [c for c in a.columns if c.startswith("prob_")]
    diff = np.abs(a[cols].to_numpy() - b[cols].to_numpy())
    assert diff.max() <= INT8_TOLERANCE
    assert diff.max() > 0  # a different computation, not the fp32 model under another name
    # The OOD gate runs on the int8 model's own features, against the threshold refitted on them at
    # export (the same quantile of the validation images' scores).
    gate = json.loads(onnx_io.read_onnx_meta(int8_run / "model.int8.onnx")["medres.ood"])
    assert b["ood_score"].notna().all()
    assert ((b["ood_score"] <= gate["threshold"]).astype(int) == b["in_distribution"]).all()
    from sklearn.metrics import roc_auc_score

    far = (a["ood_score"] > a["ood_score"].median() * 10).to_numpy()  # what fp32 puts far from the training images
    print(gate, b["in_distribution"].mean(), a["in_distribution"].mean(), far.mean(), roc_auc_score(far, b["ood_score"]))
    assert 0 < far.mean() < 1 and roc_auc_score(far, b["ood_score"]) >= 0.9  # int8 puts the same images far


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_calibration_source_and_count(trained_run, phantoms, tmp_path):
    out = tmp_path / "m.int8.onnx"
    r = runner.invoke(app, ["export", "--checkpoint", str(trained_run / "model.safetensors"), "--quantize", "int8", "--out", str(out),
                            "--calibration", str(phantoms), "--calibration-count", "6"])
    assert r.exit_code == 0, r.output
    cal = json.loads(onnx_io.read_onnx_meta(out)["medres.calibration"])
    manifest = pd.read_csv(phantoms)
    assert cal["count"] == 6 and set(cal["files"]) <= set(manifest["path"]) and cal["source"] == str(phantoms)


@pytest.mark.slow  # ≥ 20 s on 2 cores: make test runs it, make test-fast does not
def test_failed_parity_keeps_the_worst_layers_in_fp32_then_names_them(trained_run, phantoms, tmp_path, monkeypatch):
    """A parity limit no model can meet: each round keeps the layers whose activations quantize worst
    in fp32 (they are no longer quantized in the graph), and the final error names the next ones."""
    import onnx

    from medres import quantize

    graphs = []  # each round's int8 graph: node name -> its inputs
    seen: list[list[dict]] = []
    real_scan = quantize.fragile_layers

    def scan(*args):
        out = real_scan(*args)
        seen.append(out)
        graphs.append({n.name: list(n.input) for n in onnx.load(str(args[1])).graph.node})
        return out

    monkeypatch.setattr(quantize, "INT8_PARITY_LIMIT", 0.0)
    monkeypatch.setattr(quantize, "fragile_layers", scan)
    r = runner.invoke(app, ["export", "--checkpoint", str(trained_run / "model.safetensors"), "--quantize", "int8", "--out", str(tmp_path / "m.int8.onnx"),
                            "--calibration", str(phantoms), "--calibration-count", "6"])
    assert r.exit_code != 0 and "EXPORT_PARITY" in r.output
    assert len(seen) == quantize.EXCLUDE_ROUNDS + 1
    first = seen[0]
    assert [f["sqnr_db"] for f in first] == sorted(f["sqnr_db"] for f in first) and len(first) > 20
    kept = [f["layer"] for f in first[: quantize.EXCLUDE_PER_ROUND]]
    assert f"with {quantize.EXCLUDE_ROUNDS * quantize.EXCLUDE_PER_ROUND} layers kept in fp32" in r.output
    assert all(layer in r.output for layer in kept) and "SQNR" in r.output
    # In the next round's int8 graph those layers' convolutions keep float weights (int8 before).
    convs = [n for f in first[: quantize.EXCLUDE_PER_ROUND] for n in f["nodes"] if n.endswith("/Conv")]
    assert convs and all(graphs[0][n][1].endswith("_DequantizeLinear_Output") for n in convs)
    assert not any(graphs[1][n][1].endswith("_DequantizeLinear_Output") for n in convs)
    assert {f["layer"] for f in seen[1]}.isdisjoint(kept)  # and no longer scanned as quantized activations
    assert not (tmp_path / "m.int8.onnx").exists()  # nothing half-written


def test_int8_isa_choice_and_refusal(int8_run, phantoms, tmp_path, monkeypatch):
    assert onnx_io.int8_isa({"sse4_2", "avx2", "avx512_vnni"}) == "avx512_vnni"
    assert onnx_io.int8_isa({"avx2", "amx_int8", "avx_vnni"}) == "amx_int8"
    assert onnx_io.int8_isa({"fp", "asimd", "asimddp"}) == "asimddp"
    monkeypatch.setattr(onnx_io.platform, "system", lambda: "Linux")
    assert onnx_io.int8_isa({"sse4_2", "avx"}) is None
    monkeypatch.setattr(onnx_io, "cpu_flags", lambda: {"sse4_2", "avx"})
    r = runner.invoke(app, ["predict", "--checkpoint", str(int8_run / "model.safetensors"), str(phantoms.parent / "images"), "--out", str(tmp_path / "p.csv"), "-q", "--precision", "int8"])
    assert r.exit_code == 2
    assert "[INT8_UNSUPPORTED]" in r.output and "AVX2" in r.output and "--precision fp32" in r.output
    assert not (tmp_path / "p.csv").exists()


def test_int8_refuses_missing_or_foreign_model(int8_run, phantoms, tmp_path, monkeypatch):
    import torch

    from medres.model import load_checkpoint, save_checkpoint

    monkeypatch.setattr(onnx_io, "cpu_flags", lambda: {"avx2"})
    images = str(phantoms.parent / "images")
    # No int8 file beside this checkpoint: the message says how to make it, and where it goes.
    model, meta = load_checkpoint(int8_run / "model.safetensors")
    with torch.no_grad():
        model.fc.bias.add_(0.5)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, model, meta)
    r = runner.invoke(app, ["predict", "--checkpoint", str(other), images, "--out", str(tmp_path / "p.csv"), "-q", "--precision", "int8"])
    assert r.exit_code == 2 and "medres export --checkpoint" in r.output and "other.int8.onnx" in r.output
    # The run's int8 model given for other weights: refused, never scored silently with the wrong model.
    r = runner.invoke(app, ["predict", "--checkpoint", str(other), images, "--out", str(tmp_path / "p.csv"), "-q", "--precision", "int8", "--onnx", str(int8_run / "model.int8.onnx")])
    assert r.exit_code == 2 and "other weights" in r.output
    r = runner.invoke(app, ["predict", "--checkpoint", str(int8_run / "model.safetensors"), images, "--out", str(tmp_path / "p.csv"), "-q", "--precision", "int8", "--device", "cuda"])
    assert r.exit_code == 2 and "runs on the CPU" in r.output


def test_missing_onnxruntime_is_a_clear_usage_error(trained_run, phantoms, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    r = runner.invoke(app, ["predict", "--checkpoint", str(trained_run / "model.safetensors"), str(phantoms.parent / "images"), "--out", str(tmp_path / "p.csv"), "-q", "--precision", "int8"])
    assert r.exit_code == 2 and "pip install 'medres[onnx]'" in r.output


def test_report_int8_explains_from_the_int8_maps(int8_run, phantoms, tmp_path, monkeypatch):
    """report --precision int8: layer4 maps from the int8 model, the head's gradient in torch; its
    probabilities are predict --precision int8's, its maps close to fp32 Grad-CAM's."""
    import re

    import torch

    from medres.cam import cam_from_features, compute_cam
    from medres.inference import Predictor
    from medres.onnx import OnnxPredictor
    from medres.io import PreprocessSpec, load_image
    from medres.model import load_checkpoint

    monkeypatch.setattr(onnx_io, "cpu_flags", lambda: {"avx2"})
    images = sorted((phantoms.parent / "images").glob("*.png"))[:6]
    ckpt = str(int8_run / "model.safetensors")
    r = runner.invoke(app, ["report", "--checkpoint", ckpt, *map(str, images), "--out", str(tmp_path / "r"), "--precision", "int8"])
    assert r.exit_code == 0, r.output
    data = json.loads(re.search(r'type="application/json"[^>]*>(.*?)</script>', (tmp_path / "r" / "index.html").read_text(), re.S).group(1))
    r = runner.invoke(app, ["predict", "--checkpoint", ckpt, *map(str, images), "--out", str(tmp_path / "p.csv"), "-q", "--workers", "0", "--precision", "int8"])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "p.csv").set_index("path")
    model, meta = load_checkpoint(ckpt)
    for row in data["rows"]:
        np.testing.assert_allclose(row["probs"], table.loc[row["file"], [f"prob_{c}" for c in meta.classes]].to_numpy(float), atol=2e-6)
    assert len(list((tmp_path / "r" / "cases").glob("*_heat_*.png"))) == len(images) * len(meta.classes)
    # The int8 maps against fp32 Grad-CAM on the same pixels and targets.
    x = torch.from_numpy(np.stack([load_image(str(p), PreprocessSpec.from_dict(meta.preprocess)).pixels for p in images]))
    pred = Predictor.create(model, meta, precision="fp32")
    t = torch.from_numpy(pred.logits(x).argmax(1))[:, None]
    ref = compute_cam(model, pred.prepare(x), t, score="log_odds").maps.flatten(1).numpy()
    got = cam_from_features(model, torch.from_numpy(OnnxPredictor(int8_run / "model.int8.onnx", meta).maps(x)), t, score="log_odds").maps.flatten(1).numpy()
    r = [np.corrcoef(a, b)[0, 1] for a, b in zip(ref, got) if a.std() > 0 and b.std() > 0]
    assert r and np.mean(r) > 0.98  # measured 0.999 here, 0.999 on real cxr images (bench/int8.py)
    for bad in (["--method", "occlusion"], ["--layer", "layer3"]):
        res = runner.invoke(app, ["report", "--checkpoint", ckpt, str(images[0]), "--out", str(tmp_path / "x"), "--precision", "int8", *bad])
        assert res.exit_code == 2 and "int8 explains with gradcam" in res.output
