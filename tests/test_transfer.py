"""The pretrained path on real training steps: a donor file made here (torchvision layout), the
linear-probe stage, the discriminative learning rate, resume across the stage change, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from medres.config import load_config
from medres.model import build_model, read_weight_file
from medres.train import _lr_factor, fit

from helpers import ROOT  # noqa: E402
FAST = ["data.image_size=32", "train.batch_size=16", "train.precision=fp32", "train.calibrate=false", "train.warmup_epochs=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from medres.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("tl"), n_per_class=40, size=48, classes=("normal", "opacity"), seed=4, dicom_fraction=0.1)


@pytest.fixture(scope="module")
def donor(tmp_path_factory):
    """A ResNet50 backbone in torchvision layout (plain state dict, 1000-class fc), with non-trivial
    BatchNorm statistics so a frozen stage that let them move would show."""
    torch.manual_seed(7)
    model = build_model(1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("donor") / "resnet50-donor.pth"
    torch.save(model.state_dict(), path)
    return path


def cfg(data, donor, *extra):
    return load_config(ROOT / "configs" / "smoke.yaml", [f"data.manifest={data}", "data.classes=[normal,opacity]", f"model.weights={donor}",
                                                         "train.backbone_lr_mult=0.1", "train.weight_decay=0.1", *FAST, *extra])


def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def test_frozen_stage_keeps_every_backbone_tensor_and_trains_the_head(data, donor, tmp_path):
    """freeze_epochs=1: after a frozen epoch every backbone parameter and BatchNorm statistic equals
    the donor's bit for bit (weight decay 0.1 included: frozen parameters get none), while the head
    moved away from where a zero-learning-rate run leaves it."""
    donor_state = torch.load(donor, weights_only=True)
    args = ("train.epochs=2", "train.freeze_epochs=2", "train.max_steps_per_epoch=3")
    fit(cfg(data, donor, *args), tmp_path / "run", show_progress=False)
    trained, _ = read_weight_file(tmp_path / "run" / "last.safetensors")
    for k, v in _backbone(donor_state).items():
        assert torch.equal(trained[k], v), k
    torch.manual_seed(0)  # fit seeds torch with train.seed, then builds the model: the head's initial values
    initial = build_model(2).fc.weight.detach()
    assert trained["fc.weight"].shape == initial.shape and (trained["fc.weight"] - initial).abs().max() > 1e-4
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["frozen"] for e in lines] == [True, True]


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_discriminative_learning_rate_through_warmup_and_cosine(data, donor, tmp_path, monkeypatch):
    """After unfreezing, every step's backbone group runs at lr × backbone_lr_mult and the head at lr,
    both following warm-up then cosine; the backbone starts moving only in the unfrozen epoch."""
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **kw):  # observes the real optimizer; the step itself runs unchanged
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    steps = 3
    fit(cfg(data, donor, "train.epochs=3", "train.freeze_epochs=1", f"train.max_steps_per_epoch={steps}", "train.lr=0.01"), tmp_path, show_progress=False)
    assert len(seen) == 3 * steps
    for step, (backbone_lr, head_lr) in enumerate(seen):
        factor = _lr_factor(step, 3 * steps, warmup=steps)
        assert head_lr == pytest.approx(0.01 * factor, rel=1e-9)
        assert backbone_lr == pytest.approx(0.001 * factor, rel=1e-9)
    assert seen[0][1] < seen[steps - 1][1] and seen[-1][1] < seen[steps][1]  # warm-up rises, cosine falls


RESUME_ARGS = ("train.epochs=3", "train.freeze_epochs=2", "train.max_steps_per_epoch=2", "train.deterministic=true")


@pytest.fixture(scope="module")
def uninterrupted(data, donor, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    fit(cfg(data, donor, *RESUME_ARGS), out, show_progress=False)
    return read_weight_file(out / "last.safetensors")[0]


@pytest.mark.parametrize("crash_epoch", [1, 2])
def test_resume_inside_and_after_the_frozen_stage_equals_uninterrupted(data, donor, uninterrupted, tmp_path, monkeypatch, crash_epoch):
    """freeze_epochs=2 of 3: a run killed at the start of epoch 1 (inside the frozen stage) or epoch 2
    (after it) and resumed ends with the uninterrupted run's weights."""
    import medres.train as T

    args = RESUME_ARGS
    real = T.epoch_order

    def crash(n, y, c, epoch, rank, world):
        if epoch == crash_epoch:
            raise KeyboardInterrupt("simulated kill")
        return real(n, y, c, epoch, rank, world)

    monkeypatch.setattr(T, "epoch_order", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg(data, donor, *args), tmp_path / "part", show_progress=False)
    monkeypatch.setattr(T, "epoch_order", real)
    fit(cfg(data, donor, *args), tmp_path / "part", resume=True, show_progress=False)
    a = uninterrupted
    b, _ = read_weight_file(tmp_path / "part" / "last.safetensors")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


@pytest.mark.slow  # ≥ 20 s on 2 cores: make test runs it, make test-fast does not
def test_ddp_with_a_donor_through_frozen_and_unfrozen_stages(data, donor, tmp_path):
    """2 gloo processes, freeze_epochs=1 of 2: the stage change under DistributedDataParallel works
    (the wrapper is rebuilt), the frozen epoch leaves the backbone equal to the donor, and every rank
    ends with identical weights (checked inside fit across ranks)."""
    overrides = [f"data.manifest={data}", "data.classes=[normal,opacity]", f"model.weights={donor}", "train.epochs=2", "train.freeze_epochs=1",
                 "train.max_steps_per_epoch=2", *FAST]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547", "-m", "medres", "--verbose", "train",
           "--config", str(ROOT / "configs" / "smoke.yaml"), "--quiet", *sum((["--set", a] for a in overrides), []), "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all 2 ranks hold identical weights" in r.stderr
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["frozen"] for e in lines] == [True, False]
    trained, _ = read_weight_file(tmp_path / "last.safetensors")
    donor_state = torch.load(donor, weights_only=True)
    assert any(not torch.equal(trained[k], v) for k, v in _backbone(donor_state).items())  # unfrozen epoch moved it


def test_no_validation_split_still_writes_the_best_checkpoint(data, donor, tmp_path):
    """Without a validation split the best checkpoint follows the training loss; a loss above 1 in
    the first epoch must still produce model.safetensors (best started at -1.0 before)."""
    run = fit(cfg(data, donor, "data.val_fraction=0", "train.epochs=2", "train.max_steps_per_epoch=1", "train.early_stopping=1",
                  "train.label_smoothing=0.9", "train.lr=0.5", "train.freeze_epochs=0"), tmp_path, show_progress=False)
    assert (tmp_path / "model.safetensors").exists()
    assert "val_macro_auroc" not in run["epochs"][0]


def _reference_resnet50(sd: dict, x: torch.Tensor, prefix: str = "model.") -> torch.Tensor:
    """ResNet50 v1.5 written out from a raw state dict (torchvision names under `prefix`): the
    reference a loaded medres model must reproduce."""
    import torch.nn.functional as F

    def g(k):
        return sd[prefix + k]

    def bn(t, p):
        return F.batch_norm(t, g(p + ".running_mean"), g(p + ".running_var"), g(p + ".weight"), g(p + ".bias"), False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, g("conv1.weight"), stride=2, padding=3), "bn1")), 3, 2, 1)
    for layer, (blocks, stride) in enumerate([(3, 1), (4, 2), (6, 2), (3, 2)], 1):
        for b in range(blocks):
            p, s = f"layer{layer}.{b}", stride if b == 0 else 1
            out = F.relu(bn(F.conv2d(x, g(p + ".conv1.weight")), p + ".bn1"))
            out = F.relu(bn(F.conv2d(out, g(p + ".conv2.weight"), stride=s, padding=1), p + ".bn2"))
            out = bn(F.conv2d(out, g(p + ".conv3.weight")), p + ".bn3")
            identity = bn(F.conv2d(x, g(p + ".downsample.0.weight"), stride=s), p + ".downsample.1") if b == 0 else x
            x = F.relu(out + identity)
    return F.linear(x.mean((2, 3)), g("fc.weight"), g("fc.bias"))


def test_torchxrayvision_layout_and_input_scaling(tmp_path):
    """A file in torchxrayvision's resnet50-res512-all layout (`model.` prefix, 1-channel conv1, 18
    outputs): keys remapped, its [-1024, 1024] input scaling reproduced by the stored normalisation,
    and the loaded model's logits equal a reference forward on the raw state dict."""
    from medres.inference import normalise
    from medres.model import load_backbone_weights, load_source_weights

    torch.manual_seed(3)
    raw = {f"model.{k}": v for k, v in build_model(18, in_channels=1).state_dict().items()}
    for k in raw:
        if k.endswith("running_var"):
            raw[k] = torch.rand_like(raw[k]) + 0.5
    torch.save(raw, tmp_path / "xrv.pth")
    src = load_source_weights(str(tmp_path / "xrv.pth"))
    assert src.layout == "torchxrayvision" and src.mean == (0.5,) and src.std == (1 / 2048,)
    model = build_model(18, in_channels=1).eval()
    load_backbone_weights(model, src, include_head=True)
    pixels = torch.rand(2, 64, 64)
    x = normalise(pixels, list(src.mean), list(src.std), 1)
    assert torch.allclose(x, 2048 * pixels.unsqueeze(1) - 1024, atol=1e-3)  # torchxrayvision's scaling
    with torch.no_grad():
        got, want = model(x), _reference_resnet50(raw, 2048 * pixels.unsqueeze(1) - 1024)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_one_channel_model_from_a_three_channel_donor(tmp_path):
    """model.in_channels: 1 from a 3-channel donor: conv1's filters are summed, so on a grey image the
    1-channel model equals the 3-channel one fed the image three times — exactly when the donor's
    normalisation is the same for the three channels (a medres checkpoint here)."""
    from medres.inference import normalise
    from medres.model import ModelMeta, load_backbone_weights, load_source_weights, norm_for_channels, save_checkpoint

    torch.manual_seed(5)
    donor = build_model(2, in_channels=3)
    save_checkpoint(tmp_path / "d.safetensors", donor, ModelMeta(classes=["a", "b"], task="multiclass", preprocess={"image_size": 64}, mean=[0.5] * 3, std=[0.25] * 3))
    src = load_source_weights(str(tmp_path / "d.safetensors"))
    one, three = build_model(2, in_channels=1).eval(), build_model(2, in_channels=3).eval()
    load_backbone_weights(one, src, include_head=True)
    load_backbone_weights(three, src, include_head=True)
    pixels = torch.rand(2, 64, 64)
    m1, s1 = norm_for_channels(src.mean, src.std, 1)
    with torch.no_grad():
        a = one(normalise(pixels, m1, s1, 1))
        b = three(normalise(pixels, list(src.mean), list(src.std), 3))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
