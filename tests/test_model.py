"""The backbone, offline weight loading and the checkpoint format."""

import json

import pytest
import torch

from medres.errors import CheckpointInvalid, WeightsError, WeightsNotFound
from medres.model import (
    ARCH_ID, CAM_LAYER, CLASSIFIER, FIRST_CONV, ModelMeta, ResNet50, adapt_first_conv, build_model,
    find_imagenet_file, load_backbone_weights, load_checkpoint, load_source_weights, save_checkpoint,
)

# torchvision's resnet50 state dict: 320 entries, 25,557,032 parameters with a 1000-class fc.
TV_KEYS = 320
TV_PARAMS = 25_557_032


@pytest.fixture(scope="module")
def tv_state():
    torch.manual_seed(0)
    return ResNet50(1000).state_dict()


def test_structure_matches_torchvision(tv_state):
    m = ResNet50(1000)
    assert len(tv_state) == TV_KEYS
    assert sum(p.numel() for p in m.parameters()) == TV_PARAMS
    assert m.conv1.stride == (2, 2) and m.conv1.kernel_size == (7, 7)
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)  # v1.5
    assert m.layer2[0].downsample[0].bias is None
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    convs = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Conv2d) and "downsample" not in n]
    assert len(convs) == 49  # the paper's 49 convolutions + 1 fc (projection shortcuts not counted)
    assert (FIRST_CONV, CLASSIFIER, CAM_LAYER) == ("conv1", "fc", "layer4")


def test_feature_map_shape_and_head_params():
    m = ResNet50(3).eval()
    with torch.no_grad():
        f = m.forward_features(torch.zeros(2, 3, 224, 224))
    assert f.shape == (2, 2048, 7, 7)
    backbone = sum(p.numel() for p in m.backbone_parameters())
    assert backbone == 23_508_032 and sum(p.numel() for p in m.head_parameters()) == 2048 * 3 + 3


def test_torchvision_layout_loads_strictly(tmp_path, tv_state, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(tv_state, folder / "download.pth")
    # torchvision's real names carry its files' hash prefixes; this test file gets its own.
    import medres.model as M
    from medres.model import sha256_of

    name = f"resnet50-{sha256_of(folder / 'download.pth')[:8]}.pth"
    (folder / "download.pth").rename(folder / name)
    monkeypatch.setattr(M, "TORCHVISION_FILES", {name: "test"})
    assert find_imagenet_file().name == name
    src = load_source_weights("imagenet")
    m = build_model(3)
    load_backbone_weights(m, src)
    assert torch.equal(m.layer4[2].conv3.weight, tv_state["layer4.2.conv3.weight"])
    assert src.mean == (0.485, 0.456, 0.406)


def test_missing_imagenet_file_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(WeightsNotFound) as e:
        load_source_weights("imagenet")
    msg = str(e.value)
    assert "resnet50-11ad3fa6.pth" in msg and str(tmp_path / "th" / "hub" / "checkpoints") in msg


@pytest.mark.parametrize("layout", ["timm", "ddp", "xrv", "nested", "safetensors"])
def test_other_layouts(tmp_path, tv_state, layout):
    state = dict(tv_state)
    if layout == "ddp":
        state = {"module." + k: v for k, v in state.items()}
    if layout == "xrv":  # torchxrayvision ResNet: torchvision model under `model.`, 1-channel conv1, 18 outputs
        state = {"model." + k: v for k, v in state.items()}
        state["model.conv1.weight"] = state["model.conv1.weight"].sum(1, keepdim=True)
        state["model.fc.weight"], state["model.fc.bias"] = torch.zeros(18, 2048), torch.zeros(18)
    if layout == "timm":  # timm's resnet50 uses torchvision names, no num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if layout == "nested":
        state = {"state_dict": state, "epoch": 3}
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save(state, path)
    src = load_source_weights(str(path))
    m = build_model(2, in_channels=1 if layout == "xrv" else 3)
    load_backbone_weights(m, src)
    assert torch.allclose(m.layer3[0].conv1.weight, tv_state["layer3.0.conv1.weight"])
    if layout == "xrv":
        assert src.layout == "torchxrayvision" and src.std == (1 / 2048,)


def test_in_channels_adaptation(tv_state):
    w = tv_state["conv1.weight"]
    assert torch.allclose(adapt_first_conv(w, 1), w.sum(1, keepdim=True))
    grey = adapt_first_conv(w, 1)
    assert adapt_first_conv(grey, 3).shape == (64, 3, 7, 7)
    # A grey image repeated to RGB through the RGB filters equals the summed filter on grey.
    m3, m1 = build_model(2, in_channels=3).eval(), build_model(2, in_channels=1).eval()
    m3.conv1.weight.data.copy_(w)
    m1.conv1.weight.data.copy_(grey)
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(m3.conv1(x.expand(-1, 3, -1, -1)), m1.conv1(x), atol=1e-5)


def test_wrong_architecture_lists_keys(tmp_path):
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "vgg.pth")
    with pytest.raises(WeightsError) as e:
        load_backbone_weights(build_model(2), load_source_weights(str(tmp_path / "vgg.pth")))
    assert "missing" in str(e.value) and "conv1.weight" in str(e.value) and "unexpected" in str(e.value)


def test_shape_mismatch(tmp_path, tv_state):
    state = dict(tv_state)
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_backbone_weights(build_model(2), load_source_weights(str(tmp_path / "bad.pth")))


def test_checkpoint_roundtrip(tmp_path):
    m = build_model(3)
    meta = ModelMeta(classes=["a", "b", "c"], task="multiclass", preprocess={"image_size": 64}, mean=[0.5] * 3, std=[0.2] * 3, thresholds=[0.1, 0.2, 0.3], temperature=1.5)
    save_checkpoint(tmp_path / "model.safetensors", m, meta)
    m2, meta2 = load_checkpoint(tmp_path / "model.safetensors")
    assert meta2.classes == ["a", "b", "c"] and meta2.temperature == 1.5 and meta2.arch == ARCH_ID
    assert torch.equal(m2.fc.weight, m.fc.weight)
    with pytest.raises(CheckpointInvalid):
        load_checkpoint(_truncate(tmp_path / "model.safetensors"))


def _truncate(path):
    data = path.read_bytes()
    out = path.with_name("trunc.safetensors")
    out.write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize("failure", ["exception", "disk full"])
def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, failure):
    """A writer that fails half-way leaves the previous checkpoint intact and no temporary file; a full
    disk (ENOSPC from the writer) is OUTPUT_FAILED naming the file and the room left, on one line."""
    import errno

    import safetensors.torch

    from medres.errors import OutputFailed

    m = build_model(2)
    meta = ModelMeta(classes=["a", "b"], task="multiclass", preprocess={}, mean=[0.5] * 3, std=[0.2] * 3)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, m, meta)
    before = path.read_bytes()
    error = RuntimeError("disk full") if failure == "exception" else OSError(errno.ENOSPC, "No space left on device")

    def partial_then_fail(*a, **k):
        open(a[1], "wb").write(b"partial")
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", partial_then_fail)
    with pytest.raises(RuntimeError if failure == "exception" else OutputFailed) as caught:
        save_checkpoint(path, m, meta)
    if failure == "disk full":
        line = str(caught.value)
        assert line.startswith(f"[OUTPUT_FAILED] {path}: cannot write: No space left on device (") and "MB free in" in line and "\n" not in line
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    load_checkpoint(path)


def test_no_bf16_switch_makes_auto_fp32_on_cpu(monkeypatch):
    """MEDRES_NO_BF16=1: `auto` is fp32 on the CPU whatever it supports (the scoring path asks the same
    function); explicit precisions and CUDA are untouched."""
    from medres.inference import cpu_supports_bf16, resolve_precision

    monkeypatch.delenv("MEDRES_NO_BF16", raising=False)  # the suite itself may run under it
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_supports_bf16() and resolve_precision("auto", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setenv("MEDRES_NO_BF16", "1")
    assert not cpu_supports_bf16() and resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setenv("MEDRES_NO_BF16", "0")
    assert cpu_supports_bf16()
