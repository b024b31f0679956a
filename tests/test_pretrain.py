"""`medres pretrain` (VICReg on films without labels): the backbone loads strictly and `train` starts
from it, a resumed run equals an uninterrupted one, MedAug same-patient pairs, and a collapsed
embedding is reported instead of a useless backbone being written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import smoke_config

FAST = ["data.image_size=32", "pretrain.batch_size=8", "pretrain.max_steps_per_epoch=3", "pretrain.projector_dim=64", "train.precision=fp32"]


def _unlabelled(phantoms, tmp_path):
    """Only a path column (and patient ids): no labels at all."""
    df = pd.read_csv(phantoms)[["path", "patient_id"]]
    out = phantoms.parent / "unlabelled.csv"
    df.to_csv(out, index=False)
    return out


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_pretrained_backbone_loads_strictly_and_train_starts_from_it(phantoms, tmp_path):
    from medres.model import build_model, load_backbone_weights, load_source_weights
    from medres.pretrain import pretrain
    from medres.train import fit

    m = _unlabelled(phantoms, tmp_path)
    summary = pretrain(smoke_config(m, *FAST, "pretrain.epochs=2"), tmp_path / "ssl", show_progress=False)
    assert not summary["collapsed"] and summary["films"] == len(pd.read_csv(m)) and summary["embedding_spread"] > 1e-3
    backbone = tmp_path / "ssl" / "backbone.safetensors"
    state = load_file(str(backbone))
    assert not any(k.startswith("fc.") for k in state) and "layer4.2.bn3.running_var" in state
    assert len((tmp_path / "ssl" / "metrics.jsonl").read_text().splitlines()) == 2 and (tmp_path / "ssl" / "curves.png").exists()
    source = load_source_weights(str(backbone))
    model = build_model(3)
    load_backbone_weights(model, source)  # strict: raises on any missing or unexpected key
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert not torch.equal(build_model(3).conv1.weight, state["conv1.weight"])  # not random
    run = fit(smoke_config(phantoms, f"model.weights={backbone}", "data.image_size=32", "train.epochs=1", "train.freeze_epochs=0",
                           "train.calibrate=false"), tmp_path / "ft", show_progress=False)
    assert run["epochs"] and (tmp_path / "ft" / "model.safetensors").exists()


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_resume_equals_an_uninterrupted_run(phantoms, tmp_path):
    from medres.pretrain import pretrain

    m = _unlabelled(phantoms, tmp_path)
    pretrain(smoke_config(m, *FAST, "pretrain.epochs=2"), tmp_path / "full", show_progress=False)
    pretrain(smoke_config(m, *FAST, "pretrain.epochs=1"), tmp_path / "part", show_progress=False)
    pretrain(smoke_config(m, *FAST, "pretrain.epochs=2"), tmp_path / "part", resume=True, show_progress=False)
    full = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [e["train_loss"] for e in part] == pytest.approx([e["train_loss"] for e in full], rel=1e-5)
    a, b = load_file(str(tmp_path / "full" / "backbone.safetensors")), load_file(str(tmp_path / "part" / "backbone.safetensors"))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_same_patient_pairs():
    from medres.pretrain import _partner

    patients = np.array(["a", "a", "a", "b", "c"])
    rows = np.arange(5)
    seen = np.stack([_partner(patients, rows, np.random.default_rng(s)) for s in range(50)])
    assert (seen[:, 3] == 3).all() and (seen[:, 4] == 4).all()  # alone: itself
    assert set(seen[:, 0]) == {0, 1, 2}  # another film of the same patient, about half of the time
    assert 0.4 < (seen[:, 0] != 0).mean() < 0.9


def test_a_collapsed_embedding_is_reported(tmp_path):
    """Every film the same image: whatever the views, the films' embeddings are one point — the run
    says it collapsed and writes no backbone."""
    from PIL import Image

    from medres.cli import app

    (tmp_path / "same").mkdir()
    img = (np.indices((48, 48)).sum(0) % 7 * 30).astype(np.uint8)
    for i in range(10):
        Image.fromarray(img).save(tmp_path / "same" / f"f{i}.png")
    res = CliRunner().invoke(app, ["pretrain", "--config", "smoke", "--set", f"data.manifest={tmp_path / 'same'}", *sum((["--set", a] for a in FAST), []),
                                   "--set", "pretrain.epochs=1", "--out", str(tmp_path / "ssl"), "-q"])
    assert res.exit_code == 1 and "[TRAINING_FAILED] pretraining collapsed" in res.output
    assert not (tmp_path / "ssl" / "backbone.safetensors").exists()
    assert json.loads((tmp_path / "ssl" / "pretrain.json").read_text())["collapsed"] is True
