"""`medres weights`: pretrained files on machines without internet (carried in on a USB stick).

- `import_weights(FILE, as_imagenet=...)` checks a file (safe read, layout detected, strict ResNet50
  shapes, the hash prefix in its name) and copies it into torch's hub cache
  (`$TORCH_HOME/hub/checkpoints`) under the name torchvision expects, so `model.weights: imagenet`
  finds it.
- `list_weights()` shows what is there: layout, source, sha256, and whether `imagenet` would use it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from medres.errors import MedresError, OutputExists, WeightsError
from medres.files import atomic_path
from medres.model import (
    TORCHVISION_FILES, SourceWeights, build_model, hub_checkpoint_dir, load_backbone_weights, read_weight_file, remap_keys, sha256_of,
    verify_hash_prefix,
)


@dataclass
class WeightInfo:
    path: Path
    layout: str = ""
    sha256: str = ""
    size_bytes: int = 0
    imagenet: bool = False  # `model.weights: imagenet` would load this file
    problem: str = ""  # empty when the file loads strictly as a ResNet50 backbone


def check_file(path: str | Path) -> WeightInfo:
    """Read safely, detect the layout, load strictly into a ResNet50 (head excluded), check the hash
    prefix in the name. Problems are reported in `problem`, not raised."""
    path = Path(path)
    info = WeightInfo(path, size_bytes=path.stat().st_size if path.is_file() else 0)
    try:
        info.sha256 = sha256_of(path)
        verify_hash_prefix(path, info.sha256)
        state, metadata = read_weight_file(path)
        state, info.layout = remap_keys(state)
        if "medres" in metadata:
            info.layout = "medres"
        first = state.get("conv1.weight")
        model = build_model(2, in_channels=first.shape[1] if first is not None and first.shape[1] in (1, 3) else 3)
        load_backbone_weights(model, SourceWeights(state, info.layout, (0.0,), (1.0,), path.name))
    except (MedresError, OSError) as err:
        info.problem = err.one_line() if isinstance(err, MedresError) else str(err)
    info.imagenet = path.parent == hub_checkpoint_dir() and path.name in TORCHVISION_FILES and not info.problem
    return info


def import_weights(file: str | Path, *, as_imagenet: bool = False, overwrite: bool = False) -> WeightInfo:
    """Check `file` and copy it into the hub cache. With `as_imagenet`, the file must be one of
    torchvision's ImageNet ResNet50 files (identified by its sha256 prefix) and gets that name."""
    file = Path(file)
    info = check_file(file)
    if info.problem:
        raise WeightsError(f"{file.name} not imported: {info.problem}")
    name = file.name
    if as_imagenet:
        matches = [n for n in TORCHVISION_FILES if info.sha256.startswith(n.rsplit("-", 1)[1].split(".")[0])]
        if not matches:
            expected = ", ".join(f"{n.rsplit('-', 1)[1].split('.')[0]} ({n})" for n in TORCHVISION_FILES)
            raise WeightsError(f"{file.name} is not torchvision's ImageNet ResNet50: sha256 starts with {info.sha256[:8]}, expected {expected}; "
                               "use it with model.weights: PATH instead")
        name = matches[0]
    dest = hub_checkpoint_dir() / name
    if dest.exists() and not overwrite and sha256_of(dest) != info.sha256:
        raise OutputExists(f"{dest} exists with other content; pass --overwrite to replace it")
    with atomic_path(dest) as tmp:
        shutil.copyfile(file, tmp)
    return check_file(dest)


def list_weights(extra: list[str | Path] | None = None) -> list[WeightInfo]:
    """Every weight file in the hub cache (and any `extra` paths), checked."""
    folder = hub_checkpoint_dir()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt")) if folder.is_dir() else []
    return [check_file(p) for p in files + [Path(e) for e in extra or []]]
