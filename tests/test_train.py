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


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_loss_falls_and_auroc_beats_chance(easy, tmp_path):
    s = fit(cfg_for(easy, "data.image_size=48", "train.batch_size=8", "train.epochs=8", "train.lr=0.001", "train.deterministic=true"), tmp_path, show_progress=False)
    e = s["epochs"]
    assert e[-1]["train_loss"] < e[0]["train_loss"]
    assert max(x["val_macro_auroc"] for x in e) > 0.75


def _killed_at_epoch_3_then_resumed(cfg, out, monkeypatch) -> dict:
    """fit() killed as the third epoch starts, then resumed in the same folder: the resumed summary."""
    import medres.train as T

    real = T.epoch_order

    def crash(n, y, cfg, epoch, rank, world):
        if epoch == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(n, y, cfg, epoch, rank, world)

    monkeypatch.setattr(T, "epoch_order", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out, show_progress=False)
    monkeypatch.setattr(T, "epoch_order", real)
    return fit(cfg, out, resume=True, show_progress=False)


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_resume_equals_uninterrupted(easy, tmp_path, monkeypatch):
    args = ("train.epochs=3", "train.deterministic=true", "train.max_steps_per_epoch=3")
    full = fit(cfg_for(easy, *args), tmp_path / "full", show_progress=False)
    resumed = _killed_at_epoch_3_then_resumed(cfg_for(easy, *args), tmp_path / "part", monkeypatch)
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


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
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


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
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


RECIPE = ("train.optimizer=sgd", "train.momentum=0.9", "train.nesterov=true", "train.schedule=onecycle", "train.ema=0.9", "train.lr=0.01")


def test_ema_equals_a_hand_computed_average(easy, tmp_path, monkeypatch):
    """Each step: ema ← d·ema + (1 − d)·weights, from the initial weights; checked against the live
    weights seen after every step."""
    import medres.train as T

    seen, real = [], T.update_ema

    def spy(ema, model, decay):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in ema.state_dict().items()})
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        real(ema, model, decay)

    monkeypatch.setattr(T, "update_ema", spy)
    fit(cfg_for(easy, *RECIPE, "train.epochs=1", "train.max_steps_per_epoch=3", "train.deterministic=true"), tmp_path, show_progress=False)
    assert len(seen) == 4  # the initial weights + 3 steps
    want = dict(seen[0])
    for w in seen[1:]:
        want = {k: (0.9 * e + 0.1 * w[k]) if e.is_floating_point() else w[k] for k, e in want.items()}
    got = torch.load(tmp_path / "state.pt", weights_only=True)["ema"]
    assert set(got) == set(want)
    moved = 0
    for k, e in want.items():
        assert torch.allclose(got[k].float(), e.float(), rtol=1e-5, atol=1e-6), k
        moved += bool(e.is_floating_point() and not torch.equal(e, seen[0][k]))
    assert moved > 0


def test_better_of_live_and_ema_becomes_best_and_is_named(easy, tmp_path, monkeypatch):
    import medres.train as T

    monkeypatch.setattr(T, "_validate", lambda run, model: {"val_loss": 1.0, "val_macro_auroc": 0.9 if model is run.ema else 0.6})
    s = fit(cfg_for(easy, *RECIPE, "train.epochs=1", "train.max_steps_per_epoch=2"), tmp_path, show_progress=False)
    assert s["best_weights"] == "ema" and s["epochs"][0]["better_weights"] == "ema" and s["epochs"][0]["ema_val_macro_auroc"] == 0.9
    best, meta = load_checkpoint(tmp_path / "model.safetensors")
    ema = torch.load(tmp_path / "state.pt", weights_only=True)["ema"]
    for k, v in best.state_dict().items():
        assert torch.equal(v.float(), ema[k].float()), k
    assert meta.val_auroc == 0.9
    assert "from the ema weights" in (tmp_path / "train.log").read_text()


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_resume_with_ema_onecycle_sgd_equals_uninterrupted(easy, tmp_path, monkeypatch):
    args = (*RECIPE, "train.epochs=3", "train.deterministic=true", "train.max_steps_per_epoch=2")
    full = fit(cfg_for(easy, *args), tmp_path / "full", show_progress=False)
    resumed = _killed_at_epoch_3_then_resumed(cfg_for(easy, *args), tmp_path / "part", monkeypatch)
    assert resumed["epochs"][-1]["train_loss"] == pytest.approx(full["epochs"][-1]["train_loss"], rel=1e-5)
    assert resumed["epochs"][-1]["ema_val_loss"] == pytest.approx(full["epochs"][-1]["ema_val_loss"], rel=1e-5)
    assert resumed["best_weights"] == full["best_weights"]
    for name in ("last.safetensors", "model.safetensors"):
        a, _ = load_checkpoint(tmp_path / "full" / name)
        b, _ = load_checkpoint(tmp_path / "part" / name)
        for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.allclose(x.float(), y.float(), atol=1e-6), (name, n)
    sa, sb = (torch.load(tmp_path / d / "state.pt", weights_only=True) for d in ("full", "part"))
    for n, x in sa["ema"].items():
        assert torch.allclose(x.float(), sb["ema"][n].float(), atol=1e-6), n
    mom = lambda s: [v["momentum_buffer"] for v in s["optimizer"]["state"].values()]  # noqa: E731
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(mom(sa), mom(sb)))


def test_schedules():
    from medres.train import _onecycle_factor, _step_factor

    total, warmup = 100, 20
    f = [_onecycle_factor(s, total, warmup) for s in range(total + 1)]
    assert f[0] == pytest.approx(1 / 25) and f[warmup] == pytest.approx(1.0) and max(f) == pytest.approx(1.0)
    assert f[-1] == pytest.approx(1 / 25e4) and all(a <= b for a, b in zip(f[:warmup], f[1 : warmup + 1]))
    assert _onecycle_factor(30, 100, 0) == pytest.approx(1.0)  # no warm-up: 30% of the steps going up
    s = [_step_factor(i, 0, 10, 0.5) for i in range(30)]
    assert s[:10] == [1.0] * 10 and s[10:20] == [0.5] * 10 and s[20] == 0.25


def test_recipe_config_errors():
    from medres.errors import ConfigInvalid

    with pytest.raises(ConfigInvalid, match="train.nesterov needs train.optimizer: sgd"):
        load_config(None, ["train.nesterov=true"])
    with pytest.raises(ConfigInvalid, match="train.ema"):
        load_config(None, ["train.ema=1.5"])
    with pytest.raises(ConfigInvalid, match="train.schedule"):
        load_config(None, ["train.schedule=linear"])
