from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MEDRES_TEST", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def shared(sub: str) -> Path:
    p = SHARED / sub
    if not p.exists():
        pytest.skip(f"../shared/data/{sub} not present")
    return p


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """A small phantom set (PNG + DICOM), manifest path returned."""
    from medres.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("phantoms"), n_per_class=16, size=80, seed=1)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, phantoms) -> Path:
    """A tiny trained run (64 px, 2 epochs) shared by evaluate/predict/report tests."""
    from medres.config import load_config
    from medres.train import fit

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.manifest={phantoms}"])
    fit(cfg, out, show_progress=False)
    return out


@pytest.fixture(autouse=True)
def _reset_medres_logging():
    yield
    root = logging.getLogger("medres")
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            root.removeHandler(h)


@pytest.fixture(scope="session")
def pointing_model(tmp_path_factory):
    """A ResNet50 trained on normal-vs-opacity phantoms at 128 px, with the test images' lesion
    masks in model space: (model, normalised test batch of positives, masks, CAM layer)."""
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from medres.config import load_config
    from medres.data.synthetic import make_dataset
    from medres.inference import normalise
    from medres.io import PreprocessSpec, load_image
    from medres.io.resize import resize_to_square
    from medres.model import load_checkpoint
    from medres.train import fit

    folder = tmp_path_factory.mktemp("pointing")
    manifest = make_dataset(folder / "data", n_per_class=90, size=128, classes=("normal", "opacity"), seed=5, dicom_fraction=0.1)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.manifest={manifest}", "data.classes=[normal,opacity]", "train.epochs=10", "train.calibrate=false", "train.seed=1"])
    fit(cfg, folder / "run", show_progress=False)
    model, meta = load_checkpoint(folder / "run" / "model.safetensors")
    splits = pd.read_csv(folder / "run" / "splits.csv")
    df = pd.read_csv(manifest).merge(splits[["path", "split"]], on="path")
    pos = df[(df["label"] == "opacity") & (df["split"] != "train")]
    spec = PreprocessSpec.from_dict(meta.preprocess)
    xs, masks = [], []
    for _, row in pos.iterrows():
        xs.append(load_image(manifest.parent / row["path"], spec).pixels)
        mask = np.asarray(Image.open(manifest.parent / row["mask"]), dtype=np.float32) / 255
        masks.append(resize_to_square(mask, spec.image_size, spec.resize)[0] > 0.5)
    x = normalise(torch.from_numpy(np.stack(xs)), meta.mean, meta.std, meta.in_channels)
    return model, x, masks, "layer4"
