"""Training on phantoms: learning, resume, non-finite detection, multilabel, DDP."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from medres.config import load_config
from medres.errors import NonFiniteLoss
from medres.model import load_checkpoint
from medres.train import fit

from helpers import ROOT  # noqa: E402
FAST = ["data.image_size=32", "train.batch_size=16", "train.precision=fp32", "train.calibrate=false"]


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    """Two well-separated phantom classes, enough images for a few dozen steps."""
    from medres.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("easy"), n_per_class=64, size=64, classes=("normal", "opacity"), seed=2, dicom_fraction=0.1)


def cfg_for(manifest, *extra, classes="[normal,opacity]"):
    return load_config(ROOT / "configs" / "smoke.yaml", [f"data.manifest={manifest}", f"data.classes={classes}", *FAST, *extra])


def test_smoke_config_writes_a_complete_run(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"model.safetensors", "last.safetensors", "state.pt", "config.yaml", "splits.csv", "metrics.jsonl", "train.log"} <= names
    lines = [json.loads(l) for l in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all("val_macro_auroc" in l for l in lines)  # the fixture trains 6 epochs
    model, meta = load_checkpoint(trained_run / "model.safetensors")
    assert meta.classes == ["normal", "opacity", "diffuse"] and meta.preprocess["image_size"] == 96
    assert meta.thresholds and meta.temperature > 0 and meta.config_sha256 and meta.manifest_sha256
    splits = pd.read_csv(trained_run / "splits.csv")
    assert set(splits["split"]) == {"train", "val", "test"}
    state = torch.load(trained_run / "state.pt", weights_only=True)
    assert state["epoch"] == 5  # 0-based: the last of 6 epochs


def test_loss_falls_and_auroc_beats_chance(easy, tmp_path):
    s = fit(cfg_for(easy, "data.image_size=48", "train.batch_size=8", "train.epochs=8", "train.lr=0.001", "train.deterministic=true"), tmp_path, show_progress=False)
    e = s["epochs"]
    assert e[-1]["train_loss"] < e[0]["train_loss"]
    assert max(x["val_macro_auroc"] for x in e) > 0.75


def test_resume_equals_uninterrupted(easy, tmp_path, monkeypatch):
    args = ("train.epochs=3", "train.deterministic=true", "train.max_steps_per_epoch=3")
    full = fit(cfg_for(easy, *args), tmp_path / "full", show_progress=False)
    import medres.train as T

    real = T._epoch_order

    def crash(n, y, cfg, epoch, rank, world):
        if epoch == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(n, y, cfg, epoch, rank, world)

    monkeypatch.setattr(T, "_epoch_order", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg_for(easy, *args), tmp_path / "part", show_progress=False)
    monkeypatch.setattr(T, "_epoch_order", real)
    resumed = fit(cfg_for(easy, *args), tmp_path / "part", resume=True, show_progress=False)
    assert resumed["epochs"][-1]["train_loss"] == pytest.approx(full["epochs"][-1]["train_loss"], rel=1e-5)
    a, _ = load_checkpoint(tmp_path / "full" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "part" / "last.safetensors")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), n


def test_non_finite_loss_stops_and_keeps_last_good(easy, tmp_path):
    fit(cfg_for(easy, "train.epochs=1", "train.max_steps_per_epoch=1"), tmp_path, show_progress=False)
    good = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at epoch 1 step \d+"):
        fit(cfg_for(easy, "train.epochs=2", "train.lr=1e12", "train.grad_clip=0", "train.backbone_lr_mult=1"), tmp_path, show_progress=False)
    assert (tmp_path / "model.safetensors").read_bytes() == good
    load_checkpoint(tmp_path / "model.safetensors")


def test_multilabel(easy, tmp_path):
    df = pd.read_csv(easy)
    df["labels"] = ["opacity|bright" if l == "opacity" else "" for l in df["label"]]
    df = df.drop(columns=["label"])
    m = easy.parent / "ml.csv"
    df.to_csv(m, index=False)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.manifest={m}", "data.classes=[opacity,bright]", "data.task=multilabel", *FAST, "train.epochs=1", "train.calibrate=true"])
    fit(cfg, tmp_path, show_progress=False)
    model, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta.task == "multilabel" and len(meta.thresholds) == 2


def test_same_seed_same_metrics_with_workers(easy, tmp_path):
    args = ("train.epochs=1", "train.max_steps_per_epoch=2", "train.deterministic=true")
    a = fit(cfg_for(easy, *args, "train.num_workers=0"), tmp_path / "w0", show_progress=False)
    b = fit(cfg_for(easy, *args, "train.num_workers=2"), tmp_path / "w2", show_progress=False)
    assert a["epochs"][0]["train_loss"] == b["epochs"][0]["train_loss"]
    assert a["epochs"][0]["val_macro_auroc"] == b["epochs"][0]["val_macro_auroc"]


@pytest.mark.slow
def test_ddp_two_cpu_processes(easy, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m", "medres", "train", "--config", str(ROOT / "configs" / "smoke.yaml"), "--quiet",
           "--set", f"data.manifest={easy}", "--set", "data.classes=[normal,opacity]", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", *sum((["--set", a] for a in FAST), []), "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 writes once
    load_checkpoint(tmp_path / "model.safetensors")


def test_deterministic_flag_is_restored_after_fit(easy, tmp_path):
    import torch

    assert not torch.are_deterministic_algorithms_enabled()
    fit(cfg_for(easy, "train.epochs=1", "train.max_steps_per_epoch=1", "train.deterministic=true"), tmp_path, show_progress=False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_each_run_log_holds_only_its_own_run(easy, tmp_path):
    """Two runs in one process (a notebook sweep): the first train.log must not receive the second
    run's lines — fit detaches its log file when it returns."""
    args = ("train.epochs=1", "train.max_steps_per_epoch=1")
    fit(cfg_for(easy, *args), tmp_path / "a", show_progress=False)
    size = (tmp_path / "a" / "train.log").stat().st_size
    fit(cfg_for(easy, *args), tmp_path / "b", show_progress=False)
    assert (tmp_path / "a" / "train.log").stat().st_size == size
    assert "epoch" in (tmp_path / "b" / "train.log").read_text()
