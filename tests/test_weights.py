"""`medres weights` and the hash check of `model.weights: imagenet` (files made here, never downloaded)."""

from __future__ import annotations

import pickle

import pytest
import torch
from typer.testing import CliRunner

import medres.model as M
import medres.weights as W
from medres.cli import app
from medres.errors import WeightsError
from medres.model import build_model, load_source_weights, sha256_of

runner = CliRunner()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def donor_file(tmp_path_factory):
    """A torchvision-layout ResNet50 state dict (1000-class fc), as on torchvision's download page."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("usb") / "resnet50-download.pth"
    torch.save(build_model(1000).state_dict(), path)
    return path


def _as_torchvision_name(monkeypatch, path) -> str:
    """Pretend torchvision's published file is this one: its name carries this file's hash prefix."""
    name = f"resnet50-{sha256_of(path)[:8]}.pth"
    monkeypatch.setattr(M, "TORCHVISION_FILES", {name: "test file"})
    monkeypatch.setattr(W, "TORCHVISION_FILES", {name: "test file"})
    return name


def test_import_as_imagenet_then_train_config_finds_it(hub, donor_file, monkeypatch):
    name = _as_torchvision_name(monkeypatch, donor_file)
    r = runner.invoke(app, ["weights", "import", str(donor_file), "--as", "imagenet"])
    assert r.exit_code == 0, r.output
    assert (hub / name).is_file() and "model.weights: imagenet will use it" in r.output
    src = load_source_weights("imagenet")
    assert src.origin == name and src.layout == "torchvision"
    listed = runner.invoke(app, ["weights", "list"])
    assert name in listed.output and "used by model.weights: imagenet" in listed.output and "torchvision" in listed.output


def test_import_as_imagenet_refuses_a_file_that_is_not_torchvisions(hub, donor_file):
    r = runner.invoke(app, ["weights", "import", str(donor_file), "--as", "imagenet"])
    assert r.exit_code == 3 and "WEIGHTS_INVALID" in r.output
    assert sha256_of(donor_file)[:8] in r.output and "11ad3fa6" in r.output
    assert not hub.exists() or not any(hub.iterdir())


def test_imagenet_file_with_wrong_hash_is_refused_naming_both_prefixes(hub, donor_file):
    hub.mkdir(parents=True)
    (hub / "resnet50-11ad3fa6.pth").write_bytes(donor_file.read_bytes())  # right name, other content
    with pytest.raises(WeightsError) as info:
        load_source_weights("imagenet")
    assert info.value.code == "WEIGHTS_INVALID"
    msg = info.value.one_line()
    assert "11ad3fa6" in msg and sha256_of(donor_file)[:8] in msg
    listed = runner.invoke(app, ["weights", "list"])
    assert "PROBLEM" in listed.output and "11ad3fa6" in listed.output


def test_import_checks_layout_shapes_and_pickles(hub, tmp_path):
    xrv = {f"model.{k}": v for k, v in build_model(18, in_channels=1).state_dict().items()}  # torchxrayvision-style
    torch.save(xrv, tmp_path / "xrv.pth")
    info = W.import_weights(tmp_path / "xrv.pth")
    assert info.layout == "torchxrayvision" and not info.problem and not info.imagenet
    wrong = build_model(3).state_dict()
    wrong["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(wrong, tmp_path / "wrong.pth")
    r = runner.invoke(app, ["weights", "import", str(tmp_path / "wrong.pth")])
    assert r.exit_code == 3 and "shape mismatch" in r.output and "layer1.0.conv1.weight" in r.output

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"conv1.weight": Evil()}, fh)
    r = runner.invoke(app, ["weights", "import", str(tmp_path / "evil.pth")])
    assert r.exit_code == 3 and "CHECKPOINT_INVALID" in r.output and "refused" in r.output
    assert sorted(p.name for p in hub.iterdir()) == ["xrv.pth"]
