"""Scoring backends side by side: torch, ONNX Runtime and OpenVINO give the same probabilities within
their documented tolerance and the same error rows on a mixed folder; thread settings change no output."""

import importlib.util

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medres.cli import app
from medres.predict import predict

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
FP32_TOL = 1e-4  # |Δprob| between fp32 engines (reduction order); docs/reference.md, --backend
BF16_TOL = 0.05  # bf16 compute against fp32 (8-bit mantissa through 50 layers)


def table(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"error_code": str}, keep_default_na=False).set_index("path")


def probs(df: pd.DataFrame) -> np.ndarray:
    ok = df[df["status"] == "ok"]
    return ok[[c for c in df.columns if c.startswith("prob_")]].astype(float).to_numpy()


def test_backends_agree_on_probabilities_and_error_rows(trained_run, mixed, tmp_path):
    from medres.export import export

    ckpt = trained_run / "model.safetensors"
    export(ckpt, tmp_path / "m.onnx")
    runs = {
        "torch": {},
        "onnxruntime": {"backend": "onnx", "onnx_path": tmp_path / "m.onnx"},
        "openvino (file)": {"backend": "openvino", "onnx_path": tmp_path / "m.onnx"},
        "openvino (checkpoint)": {"backend": "openvino"},
    }
    tables = {}
    for name, options in runs.items():
        out = tmp_path / f"{name.replace(' ', '_')}.csv"
        predict(ckpt, [mixed], out, precision="fp32", workers=1, **options)
        tables[name] = table(out)
    ref = tables["torch"]
    assert (ref["status"] == "ok").sum() == 3 and (ref["status"] != "ok").sum() == 3
    for name, got in tables.items():
        assert list(got.index) == list(ref.index), name
        assert got["status"].tolist() == ref["status"].tolist() and got["error_code"].tolist() == ref["error_code"].tolist(), name
        assert np.abs(probs(got) - probs(ref)).max() <= FP32_TOL, name
        ok = ref["status"] == "ok"
        np.testing.assert_allclose(got.loc[ok, "ood_score"].astype(float), ref.loc[ok, "ood_score"].astype(float), rtol=1e-3, err_msg=name)


def test_openvino_bf16_within_its_tolerance(trained_run, phantoms, tmp_path):
    ckpt = trained_run / "model.safetensors"
    images = phantoms.parent / "images"
    predict(ckpt, [images], tmp_path / "t.csv", precision="fp32", workers=1)
    predict(ckpt, [images], tmp_path / "o.csv", precision="bf16", backend="openvino", workers=1)
    a, b = table(tmp_path / "t.csv"), table(tmp_path / "o.csv")
    assert len(a) == len(b) > 20
    assert np.abs(probs(a) - probs(b)).max() <= BF16_TOL


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_threads_change_no_output(trained_run, phantoms, tmp_path):
    """OpenVINO and ONNX Runtime take torch's thread count; 1 or 2 threads, 1 or 2 decoding workers:
    the same table, byte for byte."""
    import torch

    ckpt = trained_run / "model.safetensors"
    images = phantoms.parent / "images"
    before = torch.get_num_threads()
    outs = []
    try:
        for threads, workers in ((1, 1), (2, 2)):
            torch.set_num_threads(threads)
            out = tmp_path / f"t{threads}.csv"
            predict(ckpt, [images], out, precision="fp32", backend="openvino", workers=workers)
            outs.append(out.read_bytes())
    finally:
        torch.set_num_threads(before)
    assert outs[0] == outs[1]


def test_openvino_refusals(trained_run, phantoms, tmp_path, monkeypatch):
    ckpt = str(trained_run / "model.safetensors")
    images = str(phantoms.parent / "images")
    runner = CliRunner()
    base = ["predict", "--checkpoint", ckpt, images, "--backend", "openvino", "-q"]
    r = runner.invoke(app, [*base, "--device", "cuda", "--out", str(tmp_path / "a.csv")])
    assert r.exit_code == 2 and "--backend openvino runs on the CPU" in r.output
    r = runner.invoke(app, [*base, "--precision", "fp16", "--out", str(tmp_path / "b.csv")])
    assert r.exit_code == 2 and "fp16 is for CUDA" in r.output
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "c.csv")])
    assert r.exit_code == 2 and "pip install 'medres[openvino]'" in r.output
    assert not any(tmp_path.glob("*.csv"))


def test_openvino_graph_made_once_per_weights(trained_run, tmp_path, monkeypatch):
    """`--backend openvino` without --onnx exports the checkpoint's graph once (≈ 2 s) and reuses it;
    other weights get their own graph, and a store folder that cannot be written only costs the cache."""
    import torch

    from medres.model import load_checkpoint
    from medres.onnx import openvino_graph
    from medres.scoring import scorer_for

    monkeypatch.setenv("MEDRES_STORE_DIR", str(tmp_path / "store"))
    ckpt = trained_run / "model.safetensors"
    model, meta = load_checkpoint(ckpt)
    first = openvino_graph(model, meta)
    assert first is not None and first.parent == tmp_path / "store" / "openvino-graphs"
    stamp = first.stat().st_mtime_ns
    x = torch.rand(3, 96, 96)
    again = scorer_for(ckpt, model, meta, backend="openvino", precision="fp32").logits(x)
    assert first.stat().st_mtime_ns == stamp and len(list(first.parent.iterdir())) == 1  # reused, not rewritten
    ref = scorer_for(ckpt, model, meta, backend="torch", precision="fp32").logits(x)
    np.testing.assert_allclose(np.asarray(again), np.asarray(ref), atol=1e-3)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    assert openvino_graph(model, meta) != first
    (tmp_path / "ro").write_text("a file where the store folder should be")
    monkeypatch.setenv("MEDRES_STORE_DIR", str(tmp_path / "ro"))
    assert openvino_graph(model, meta) is None
    assert np.asarray(scorer_for(ckpt, model, meta, backend="openvino", precision="fp32").logits(x)).shape == (3, len(meta.classes))
