"""`medres predict` and `medres export` end to end."""

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medres.cli import app
from medres.predict import discover, predict, shard

runner = CliRunner()


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_mixed_folder(trained_run, mixed, tmp_path):
    out = tmp_path / "preds.csv"
    r = runner.invoke(app, ["predict", "--checkpoint", str(trained_run / "model.safetensors"), str(mixed), "--out", str(out), "--quiet", "--workers", "1"])
    assert r.exit_code == 1, r.output
    got = {row["path"]: row for row in rows(out)}
    assert len(got) == 6
    assert [row["path"] for row in rows(out)] == sorted(got)  # stable order
    assert got["good.png"]["status"] == "ok" and got["sub/good.jpg"]["status"] == "ok" and got["good.dcm"]["status"] == "ok"
    assert got["trunc.dcm"]["error_code"] == "PIXEL_DATA_SHORT"
    assert got["text.dcm"]["error_code"] == "NOT_AN_IMAGE"
    assert got["rgb.dcm"]["error_code"] == "UNSUPPORTED_PHOTOMETRIC"
    probs = [float(got["good.png"][f"prob_{c}"]) for c in ("normal", "opacity", "diffuse")]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert got["good.png"]["prediction"] in ("normal", "opacity", "diffuse")
    # existing output refused without --overwrite
    r2 = runner.invoke(app, ["predict", "--checkpoint", str(trained_run / "model.safetensors"), str(mixed), "--out", str(out), "--quiet"])
    assert r2.exit_code == 2 and "OUTPUT_EXISTS" in r2.output


def test_exit_codes(trained_run, mixed, tmp_path):
    ok_dir = tmp_path / "ok"
    ok_dir.mkdir()
    shutil.copy(mixed / "good.png", ok_dir)
    ckpt = str(trained_run / "model.safetensors")
    assert runner.invoke(app, ["predict", "--checkpoint", ckpt, str(ok_dir), "--out", str(tmp_path / "a.csv"), "-q"]).exit_code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.invoke(app, ["predict", "--checkpoint", ckpt, str(empty), "--out", str(tmp_path / "b.csv"), "-q"]).exit_code == 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    r = runner.invoke(app, ["predict", "--checkpoint", str(bad), str(ok_dir), "--out", str(tmp_path / "c.csv"), "-q"])
    assert r.exit_code == 3 and "CHECKPOINT_INVALID" in r.output


def test_resume_matches_uninterrupted(trained_run, mixed, tmp_path):
    ckpt = trained_run / "model.safetensors"
    full = predict(ckpt, [mixed], tmp_path / "full.csv", workers=0, batch_size=2)
    # An interrupted run: keep the first 3 rows only, as a crash after a flush would.
    partial = rows(tmp_path / "full.csv")[:3]
    pd.DataFrame(partial).to_csv(tmp_path / "part.csv", index=False)
    res = predict(ckpt, [mixed], tmp_path / "part.csv", workers=0, batch_size=2, resume=True)
    assert res.skipped_existing == 3
    assert (tmp_path / "part.csv").read_text() == (tmp_path / "full.csv").read_text()


def test_shards_partition(mixed):
    files = discover([mixed])
    parts = [shard(files, i, 3) for i in range(3)]
    keys = [f.shown for p in parts for f in p]
    assert sorted(keys) == sorted(f.shown for f in files) and len(keys) == len(set(keys))


def test_bf16_matches_fp32(trained_run, phantoms, tmp_path):
    ckpt = trained_run / "model.safetensors"
    images = phantoms.parent / "images"
    predict(ckpt, [images], tmp_path / "fp32.csv", precision="fp32", workers=0)
    predict(ckpt, [images], tmp_path / "bf16.csv", precision="bf16", workers=0)
    a, b = pd.read_csv(tmp_path / "fp32.csv"), pd.read_csv(tmp_path / "bf16.csv")
    cols = [c for c in a.columns if c.startswith("prob_")]
    diff = np.abs(a[cols].to_numpy() - b[cols].to_numpy())
    assert 0 < diff.max() < 0.05  # close, and not identical: bf16 really ran
    assert (a[cols].to_numpy().argmax(1) == b[cols].to_numpy().argmax(1)).mean() >= 0.95


def test_bf16_precision_runs_the_model_under_autocast(trained_run):
    import torch

    from medres.inference import Predictor
    from medres.model import load_checkpoint

    seen = []
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model, meta = load_checkpoint(trained_run / "model.safetensors")
        predictor = Predictor.create(model, meta, precision=precision)
        handle = predictor.model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        predictor.logits(torch.rand(2, 64, 64))
        handle.remove()
        assert seen[-1] == dtype


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_formats_and_tta_and_manifest_input(trained_run, phantoms, tmp_path):
    """--tta: the views differ from the image, and each row is the mean of the views' probabilities."""
    import torch

    from medres.inference import Predictor
    from medres.io import PreprocessSpec, load_image
    from medres.model import load_checkpoint
    from medres.predict import tta_views

    ckpt = trained_run / "model.safetensors"
    r = predict(ckpt, [phantoms], tmp_path / "p.jsonl", fmt="jsonl", workers=0, tta=True, precision="fp32")
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == r.total == len(pd.read_csv(phantoms))
    model, meta = load_checkpoint(ckpt)
    predictor = Predictor.create(model, meta, precision="fp32")
    x = torch.from_numpy(np.stack([load_image(phantoms.parent / row["path"], PreprocessSpec.from_dict(meta.preprocess)).pixels for row in rows[:4]]))
    views = tta_views(x)
    assert len(views) == 5 and torch.equal(views[0], x)
    assert all((v - x).abs().mean() > 1e-3 for v in views[1:])
    want = np.mean([predictor.probs(predictor.logits(v)) for v in views], axis=0)
    got = np.array([[float(row[f"prob_{c}"]) for c in meta.classes] for row in rows[:4]])
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert np.abs(got - predictor.probs(predictor.logits(x))).max() > 1e-6  # not the plain prediction
    predict(ckpt, [phantoms], tmp_path / "p.parquet", fmt="parquet", workers=0)
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == r.total


def test_onnx_export_parity_and_backend(trained_run, phantoms, tmp_path):
    pytest.importorskip("onnxruntime")
    from medres.export import export

    res = export(trained_run / "model.safetensors", tmp_path / "m.onnx")
    assert res["max_abs_prob_diff"] <= 1e-4
    images = phantoms.parent / "images"
    predict(trained_run / "model.safetensors", [images], tmp_path / "t.csv", precision="fp32", workers=0)
    predict(trained_run / "model.safetensors", [images], tmp_path / "o.csv", backend="onnx", onnx_path=tmp_path / "m.onnx", workers=0)
    a, b = pd.read_csv(tmp_path / "t.csv"), pd.read_csv(tmp_path / "o.csv")
    cols = [c for c in a.columns if c.startswith("prob_")]
    assert np.abs(a[cols].to_numpy() - b[cols].to_numpy()).max() <= 1e-4
    # The exported graph also returns the pooled features, so the OOD gate works on ONNX Runtime too.
    assert b["ood_score"].notna().all()
    np.testing.assert_allclose(b["ood_score"], a["ood_score"], rtol=1e-3)


def test_decoding_pools_give_the_same_table(trained_run, mixed, tmp_path, monkeypatch):
    """Threads (the default), processes and in-line decoding: the same rows, in the same order, bad
    files included; the thread pool really decodes off the scoring thread, the default asks for it."""
    import threading

    from medres import scoring

    ckpt = trained_run / "model.safetensors"
    decoders: set[str] = set()
    real = scoring._decode

    def spy(how, item):
        decoders.add(threading.current_thread().name)
        return real(how, item)

    tables = {}
    for pool, workers in (("thread", 2), ("process", 2), ("thread", 0)):
        with monkeypatch.context() as m:
            if pool == "thread":  # a spawned decoding process imports the real _decode (a test's spy does not pickle)
                m.setattr(scoring, "_decode", spy)
            predict(ckpt, [mixed], tmp_path / f"{pool}{workers}.csv", workers=workers, decode_pool=pool, precision="fp32")
        tables[pool, workers] = pd.read_csv(tmp_path / f"{pool}{workers}.csv", keep_default_na=False)
    ref = tables["thread", 0]
    assert (ref["status"] == "error").sum() >= 2 and (ref["status"] == "ok").sum() >= 3
    for key, t in tables.items():
        pd.testing.assert_frame_equal(t, ref, check_exact=False, atol=1e-6, obj=str(key))
    assert any(n.startswith("medres-decode") for n in decoders)  # the thread pool ran _decode
    r = runner.invoke(app, ["predict", "--help"])
    assert "--decode-pool" in r.output and scoring.DECODE_POOL == "thread"


def test_in_process_decoding_keeps_the_callers_threads(trained_run, mixed, tmp_path):
    """workers=0 decodes in the caller's process: it must not pin that process (and the inference
    after it) to one thread, as the worker initialiser does for decoding processes."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        predict(trained_run / "model.safetensors", [mixed], tmp_path / "p.csv", workers=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_torchrun_two_ranks_score_every_file_once(trained_run, phantoms, tmp_path):
    """`torchrun --nproc_per_node 2 -m medres predict`: each rank scores its hash share, rank 0 joins
    them into one table equal to a single-process run (2 gloo processes on CPU)."""
    import os
    import subprocess
    import sys

    ckpt = str(trained_run / "model.safetensors")
    images = phantoms.parent / "images"
    single = tmp_path / "single.csv"
    predict(ckpt, [images], single, precision="fp32", workers=0)
    out = tmp_path / "dist.csv"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541", "-m", "medres", "predict",
           "--checkpoint", ckpt, str(images), "--out", str(out), "-q", "--workers", "0", "--precision", "fp32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = pd.read_csv(out), pd.read_csv(single)
    assert list(a["path"]) == list(b["path"]) and a["path"].is_unique
    cols = [c for c in a.columns if c.startswith("prob_")]
    assert np.abs(a[cols].to_numpy() - b[cols].to_numpy()).max() < 1e-5
    assert f"{len(b)} files: {len(b)} scored" in r.stdout  # rank 0 prints the totals over both ranks
    assert not [p for p in tmp_path.iterdir() if ".part-" in p.name]


def test_monai_bundle_loads_with_monai_and_matches_predict(trained_run, phantoms, tmp_path):
    """`medres export --format monai-bundle`: MONAI's ConfigParser builds the bundle's network (the
    TorchScript file) and preprocessing from configs/inference.json, and its `infer` gives medres
    predict's probabilities (≤ 1e-4) on PNG and DICOM phantoms."""
    from monai.bundle import ConfigParser
    from monai.data import load_net_with_metadata

    ckpt = trained_run / "model.safetensors"
    r = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--format", "monai-bundle", "--out", str(tmp_path / "bundle")])
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "bundle"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "normal", "1": "opacity", "2": "diffuse"}
    assert meta["medres"]["preprocess"]["image_size"] == 96
    _, embedded, _ = load_net_with_metadata(str(bundle / "models" / "model.ts"))
    assert embedded["medres"]["classes"] == ["normal", "opacity", "diffuse"]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    infer = parser.get_parsed_content("infer")
    df = pd.read_csv(phantoms)
    dcm = df["path"].str.endswith(".dcm")
    df = pd.concat([df[dcm].head(4), df[~dcm].head(4)])
    assert len(df) == 8
    predict(ckpt, [phantoms.parent / p for p in df["path"]], tmp_path / "p.csv", precision="fp32", workers=0)
    want = pd.read_csv(tmp_path / "p.csv")[[f"prob_{c}" for c in parser["classes"]]].to_numpy()
    got = np.stack([infer(str(phantoms.parent / p)) for p in df["path"]])
    assert np.abs(got - want).max() <= 1e-4
