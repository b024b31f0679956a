"""Checks of what Grad-CAM maps show, on phantoms with known lesions: the pointing game, the
model-randomisation sanity check, and the held-out lesions they are measured on. After `cam` in the
data flow (it loads trained runs), so the data stage never imports the model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from medres.cam import find_layer


def pointing_game(heat, masks, tolerance: float = 0.0) -> float:
    """Fraction of heatmaps whose peak lies within `tolerance` pixels of their lesion mask (0: on
    the mask) — the pointing game of Zhang et al. (2016). heat: (N, H, W); masks: N bool (H, W)."""
    hits = 0
    for h, m in zip(heat, masks):
        y, x = np.unravel_index(np.argmax(np.asarray(h)), m.shape)
        ys, xs = np.nonzero(m)
        hits += bool(len(ys)) and np.sqrt((ys - y) ** 2 + (xs - x) ** 2).min() <= tolerance
    return hits / max(len(masks), 1)


def randomised_copy(model: nn.Module, layers: tuple[str, ...] = ("layer4", "fc"), seed: int = 1) -> nn.Module:
    """A copy of `model` with `layers` re-initialised — the model-randomisation sanity check of
    Adebayo et al. (2018): maps that survive it do not depend on what those layers learned."""
    rand = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in layers:
            for mod in find_layer(rand, name).modules():
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
    return rand


def held_out_lesions(manifest: str | Path, run: str | Path, label: str = "opacity"):
    """The trained model of `run` and the positive phantoms of `label` outside its training split,
    ready for the model, with their lesion masks resized exactly like the images:
    (model, normalised batch, list of bool masks) — the pointing game's ground truth
    (tests/test_cam.py, bench/pointing.py)."""
    from medres.inference import normalise
    from medres.io import PreprocessSpec, load_image
    from medres.io.resize import resize_to_square
    from medres.model import load_checkpoint

    manifest, run = Path(manifest), Path(run)
    model, meta = load_checkpoint(run / "model.safetensors")
    from medres.run import RunDir

    df = pd.read_csv(manifest).merge(RunDir.open(run).splits()[["path", "split"]], on="path")
    pos = df[(df["label"] == label) & (df["split"] != "train")]
    spec = PreprocessSpec.from_dict(meta.preprocess)
    xs, masks = [], []
    for row in pos.itertuples():
        xs.append(load_image(manifest.parent / row.path, spec).pixels)
        mask = np.asarray(Image.open(manifest.parent / row.mask), dtype=np.float32) / 255
        masks.append(resize_to_square(mask, spec.image_size, spec.resize)[0] > 0.5)
    return model, normalise(torch.from_numpy(np.stack(xs)), meta.mean, meta.std, meta.in_channels), masks
