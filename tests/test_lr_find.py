"""`medres lr-find`: the LR range test on the real training pipeline (tiny phantoms, few steps)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from helpers import ROOT, smoke_config
from typer.testing import CliRunner

from medres.lr_find import DIVERGE, SUGGESTION_RULE, lr_find, lr_schedule, smooth, suggest


def _sha(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_sweep_follows_the_schedule_and_suggests_inside_it(phantoms, tmp_path):
    cfg = smoke_config(phantoms, "data.image_size=32", "train.batch_size=8")
    res = lr_find(cfg, tmp_path / "lr", steps=25, start_lr=1e-6, end_lr=1.0)
    n = res["steps_run"]
    assert 2 <= n <= 25 and len(res["lrs"]) == len(res["losses"]) == len(res["smoothed"]) == n
    np.testing.assert_allclose(res["lrs"], lr_schedule(1e-6, 1.0, 25)[:n])  # exponential, from start_lr on
    if res["stopped"] == "end_lr reached":
        assert n == 25 and res["lrs"][-1] == 1.0
    else:  # may diverge on the very last step too (fp32 on one thread did, at lr 1)
        assert res["stopped"].startswith("diverged"), res["stopped"]
        if "smoothed loss" in res["stopped"]:
            assert res["smoothed"][-1] > DIVERGE * min(res["smoothed"][:-1])
    assert res["lrs"][0] <= res["suggestion"] <= res["lrs"][-1]
    assert res["rule"] == SUGGESTION_RULE
    assert res["set"] == f"--set train.lr={res['suggestion']:.3g}"
    assert json.loads((tmp_path / "lr" / "lr_find.json").read_text())["suggestion"] == res["suggestion"]
    assert (tmp_path / "lr" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_huge_end_lr_stops_on_divergence(phantoms, tmp_path):
    cfg = smoke_config(phantoms, "data.image_size=32", "train.batch_size=8")
    res = lr_find(cfg, tmp_path / "lr", steps=60, start_lr=1e-5, end_lr=1e7)
    assert res["steps_run"] < 60 and res["stopped"].startswith("diverged"), res["stopped"]
    assert res["lrs"][-1] < 1e7
    if "smoothed loss" in res["stopped"]:  # else the next loss was not finite (and was not recorded)
        assert res["smoothed"][-1] > DIVERGE * min(res["smoothed"][:-1])
    assert res["lrs"][0] <= res["suggestion"] <= res["lrs"][-1]


def test_smoothing_and_rule_by_hand():
    np.testing.assert_allclose(smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])  # bias-corrected: no pull towards 0 at the start
    np.testing.assert_allclose(smooth([1.0, 3.0])[1], (0.98 * 0.02 * 1 + 0.02 * 3) / (1 - 0.98**2))
    lrs = list(lr_schedule(1e-4, 1.0, 21))
    smoothed = [0.1, 0.5] + [1.0, 0.98, 0.9, 0.6, 0.45, 0.4, 0.38, 0.4, 0.5, 1.0] + [2.0] * 9
    lr, rule = suggest(lrs, smoothed)
    assert rule == SUGGESTION_RULE and lr == lrs[8] / 10  # the minimum after the first tenth (noisy 0.1 left out), / 10
    lr, _ = suggest(lrs[:4], [1.0, 2.0, 3.0, 4.0])
    assert lr == lrs[0]  # minimum at the start: its lr / 10 would be below the sweep; kept inside it


def test_cli_leaves_the_run_and_its_weights_untouched(trained_run, phantoms, tmp_path):
    """Fine-tuning from a run's checkpoint, frozen backbone: the donor run is byte-identical afterwards
    and nothing but the plot and the JSON is written."""
    from medres.cli import app

    before = _sha(trained_run)
    out = tmp_path / "lr"
    r = CliRunner().invoke(app, ["lr-find", "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", f"data.manifest={phantoms}",
                                 "--set", "data.image_size=32", "--set", "train.batch_size=8", "--set", f"model.weights={trained_run / 'model.safetensors'}",
                                 "--set", "train.freeze_epochs=1", "--set", "train.backbone_lr_mult=0.1", "--steps", "8", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "train with: --set train.lr=" in r.output and "head only" in r.output
    assert _sha(trained_run) == before
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".safetensors", ".pt", ".pth", ".ckpt")]
