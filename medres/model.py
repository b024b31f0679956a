"""A torchvision-identical ResNet50 (v1.5) with a swapped head, offline weight loading and the
safetensors checkpoint format. torchvision itself is not needed.

Layer names follow torchvision exactly (`conv1`, `bn1`, `layer1..4`, `fc`), so torchvision and timm
state dicts load strictly. A 224×224 input gives a (B, 2048, 7, 7) feature map.
"""

from __future__ import annotations

import hashlib
import json
import re
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medres import __version__
from medres.errors import CheckpointInvalid, WeightsError, WeightsNotFound

# Named once, used by training (freezing, LR groups), weight loading and CAM (timm's idea).
FIRST_CONV = "conv1"
CLASSIFIER = "fc"
CAM_LAYER = "layer4"
ARCH_ID = "resnet50-torchvision-v1.5"
FEATURES = 2048

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet files, as named in torch's hub cache.
TORCHVISION_FILES = {
    "resnet50-11ad3fa6.pth": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth (ResNet50_Weights.IMAGENET1K_V2)",
    "resnet50-0676ba61.pth": "https://download.pytorch.org/models/resnet50-0676ba61.pth (ResNet50_Weights.IMAGENET1K_V1)",
}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # v1.5: stride on the 3×3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet50 v1.5: 7×7/2 conv1, 3×3/2 max-pool, bottlenecks [3, 4, 6, 3], global pool, `fc`."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(64, 3, 1)
        self.layer2 = self._stage(128, 4, 2)
        self.layer3 = self._stage(256, 6, 2)
        self.layer4 = self._stage(512, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(FEATURES, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last BN of each block: a residual block starts as identity
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.layer4(x)  # (B, 2048, H/32, W/32)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2048, h, w) feature maps → (B, 2048) pooled features (the OOD gate's input)."""
        return torch.flatten(self.avgpool(features), 1)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(pooled))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pooled(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features) of one pass; the graph `medres export` writes to ONNX."""
        pooled = self.pooled(self.forward_features(x))
        return self.classify(pooled), pooled

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(CLASSIFIER + ".")]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())


# --- weight loading ------------------------------------------------------------------------------
@dataclass
class SourceWeights:
    state: dict[str, torch.Tensor]
    layout: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None  # of the file the weights came from (the model card names it)


def hub_checkpoint_dir() -> Path:
    """torch's hub cache: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


# torch.hub's rule (hub.py HASH_REGEX / check_hash): a file named `<name>-<hex>.<ext>` must have a
# sha256 that starts with <hex> (torchvision's names carry the first 8 hex digits).
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_hash_prefix(path: str | Path, digest: str | None = None) -> str | None:
    """The hash prefix in the file name, checked against the file's sha256 (returned prefix), or None
    when the name carries none. A mismatch is WEIGHTS_INVALID: a corrupt or substituted file."""
    path = Path(path)
    match = _HASH_IN_NAME.search(path.name)
    if not match:
        return None
    digest = digest or sha256_of(path)
    if not digest.startswith(match.group(1)):
        raise WeightsError(f"{path.name}: sha256 starts with {digest[:len(match.group(1))]}, the file name promises {match.group(1)} — "
                           "the file is corrupt or not the one its name says; copy it again (medres weights import checks it)")
    return match.group(1)


def find_imagenet_file() -> Path:
    folder = hub_checkpoint_dir()
    for name in TORCHVISION_FILES:
        if (folder / name).is_file():
            return folder / name
    names = " or ".join(TORCHVISION_FILES)
    urls = "; ".join(f"{n} from {u}" for n, u in TORCHVISION_FILES.items())
    raise WeightsNotFound(
        f"model.weights=imagenet needs {names} in {folder} (set TORCH_HOME to change the folder). "
        f"Nothing is downloaded: copy {urls}; or set model.weights to a checkpoint path, or to none"
    )


def read_weight_file(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read tensors safely: safetensors, or torch.load(weights_only=True). Never unpickles objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"weights file not found: {path}")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                # a medres checkpoint's non-model tensors (read_extra) stay out of the state dict
                state = {k: fh.get_tensor(k) for k in fh.keys() if not ("medres" in metadata and k.startswith(EXTRA_PREFIXES))}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointInvalid(f"{path.name}: unreadable safetensors file ({str(exc).splitlines()[0][:120]})") from None
        return state, metadata
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointInvalid(
            f"{path.name}: refused — the file holds Python objects other than tensors and is not loaded "
            f"(weights_only=True; {str(exc).splitlines()[0][:160]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError, TypeError) as exc:
        raise CheckpointInvalid(f"{path.name}: truncated or corrupt checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    return _unwrap(obj, path), metadata


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise CheckpointInvalid(f"{path.name}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "net.", "_orig_mod.")


def remap_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Strip wrapper prefixes (DDP `module.`, torchxrayvision `model.`, ...) → torchvision names."""
    layout = "torchvision"
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state if not k.startswith(CLASSIFIER)) and any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
                layout = {"model.": "torchxrayvision", "module.": "ddp"}.get(prefix, prefix.rstrip("."))
                changed = True
    return state, layout


def load_source_weights(spec: str) -> SourceWeights | None:
    """`imagenet` | `none` | a path → tensors + normalisation constants of the source."""
    if spec == "none":
        return None
    path = find_imagenet_file() if spec == "imagenet" else Path(spec)
    if spec == "imagenet":
        verify_hash_prefix(path)  # never a silent load of a corrupt download
    state, metadata = read_weight_file(path)
    state, layout = remap_keys(state)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if "medres" in metadata:
        meta = json.loads(metadata["medres"])
        mean, std, layout = tuple(meta["mean"]), tuple(meta["std"]), "medres"
        return SourceWeights(state, layout, mean, std, path.name, meta, sha256_of(path))
    if FIRST_CONV + ".weight" in state and state[FIRST_CONV + ".weight"].shape[1] == 1 and layout == "torchxrayvision":
        # torchxrayvision scales images to [-1024, 1024]: x_xrv = 2048 * x - 1024 for x in [0, 1].
        mean, std = (0.5,), (1.0 / 2048.0,)
    return SourceWeights(state, layout, mean, std, path.name, {}, sha256_of(path))


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB ↔ grey conv1 (timm's adapt_input_conv idea): sum the RGB filters for 1 channel;
    repeat a grey filter (divided by 3) for 3 channels."""
    have = weight.shape[1]
    if have == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    if have == 1:
        return weight.repeat(1, in_channels, 1, 1) / in_channels
    raise WeightsError(f"cannot adapt {FIRST_CONV} from {have} to {in_channels} input channels")


def load_backbone_weights(model: ResNet50, source: SourceWeights, *, include_head: bool = False) -> None:
    """Strict load of everything but the head; shapes checked; missing/unexpected keys listed."""
    own = model.state_dict()
    state = dict(source.state)
    if FIRST_CONV + ".weight" in state:
        state[FIRST_CONV + ".weight"] = adapt_first_conv(state[FIRST_CONV + ".weight"], model.conv1.in_channels)
    if not include_head:
        state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER + ".")}
    expected = {k for k in own if include_head or not k.startswith(CLASSIFIER + ".")}
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch in {len(wrong)} key(s), e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise WeightsError(f"{source.origin} ({source.layout} layout) is not a {ARCH_ID}: " + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def norm_for_channels(mean: tuple[float, ...], std: tuple[float, ...], in_channels: int) -> tuple[list[float], list[float]]:
    if len(mean) == in_channels:
        return list(mean), list(std)
    if in_channels == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return [mean[0]] * in_channels, [std[0]] * in_channels


EXTRA_PREFIXES = ("ood.", "shift.")  # checkpoint tensors that are not model weights


# --- the checkpoint ------------------------------------------------------------------------------
@dataclass
class ModelMeta:
    """Everything predict/report need besides the tensors; stored as safetensors metadata."""

    classes: list[str]
    task: str
    preprocess: dict[str, Any]
    mean: list[float]
    std: list[float]
    in_channels: int = 3
    arch: str = ARCH_ID
    thresholds: list[float] | None = None
    temperature: float = 1.0
    threshold_method: str | None = None
    medres_version: str = __version__
    torch_version: str = torch.__version__
    config_sha256: str | None = None
    manifest_sha256: str | None = None
    weights_source: str | None = None
    weights_sha256: str | None = None  # of the pretrained file fine-tuned from
    dropout: float = 0.0
    epoch: int | None = None
    val_auroc: float | None = None
    store_dtype: str = "uint8"  # how the training images were stored; evaluate/calibrate reuse that store
    expect: dict[str, list[str]] | None = None  # input gate: header values the training images had (medres/gate.py)
    ood: dict[str, Any] | None = None  # input gate: OOD detector settings; its tensors are `ood.*` in the file
    conformal: dict[str, Any] | None = None  # conformal prediction sets: method, coverage, quantile(s)
    shift: dict[str, Any] | None = None  # folder-level shift reference settings; its tensors are `shift.*` (medres/shift.py)

    def effective_thresholds(self) -> list[float]:
        if self.thresholds:
            return list(self.thresholds)
        return [0.5] * len(self.classes)


def save_checkpoint(path: str | Path, model: nn.Module, meta: ModelMeta, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Atomic: write a temp file beside `path`, fsync, rename. The old file survives any failure.
    `extra`: tensors stored beside the model's (the OOD detector's `ood.*`), never loaded into it."""
    from safetensors.torch import save_file

    from medres.files import atomic_path

    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap_model(model).state_dict().items()}
    state.update({k: v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()})
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"medres": json.dumps(asdict(meta)), "format": "pt"})


def read_extra(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under `prefix` only (safetensors reads just those)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}


def unwrap_model(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def build_model(num_classes: int, *, in_channels: int = 3, dropout: float = 0.0) -> ResNet50:
    return ResNet50(num_classes=num_classes, in_channels=in_channels, dropout=dropout)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ResNet50, ModelMeta]:
    """A medres checkpoint → (model in eval mode, metadata). Errors are CheckpointInvalid/WeightsError."""
    state, metadata = read_weight_file(path)
    if "medres" not in metadata:
        raise CheckpointInvalid(f"{Path(path).name}: not a medres checkpoint (no medres metadata); use it as model.weights to fine-tune")
    try:
        raw = json.loads(metadata["medres"])
        known = {f for f in ModelMeta.__dataclass_fields__}
        meta = ModelMeta(**{k: v for k, v in raw.items() if k in known})
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointInvalid(f"{Path(path).name}: medres metadata unreadable ({exc})") from None
    if meta.arch != ARCH_ID:
        raise CheckpointInvalid(f"{Path(path).name}: architecture {meta.arch!r} is not {ARCH_ID!r}")
    model = build_model(len(meta.classes), in_channels=meta.in_channels, dropout=meta.dropout)
    load_backbone_weights(model, SourceWeights(state, "medres", tuple(meta.mean), tuple(meta.std), Path(path).name), include_head=True)
    return model.to(device).eval(), meta
