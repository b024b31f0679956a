"""`medres export --format monai-bundle`: a MONAI Bundle (the format MONAI Deploy and MONAI Label
consume) that MONAI's bundle API loads and runs.

    <out>/configs/metadata.json    MONAI bundle metadata: network data format (input/output), versions,
                                   and medres's preprocessing spec, normalisation and calibration
    <out>/configs/inference.json   a ConfigParser file: `network` (TorchScript), `preprocessing`
                                   (medres's own DICOM/PNG/JPEG pipeline, the spec recorded), `infer`
    <out>/models/model.ts          TorchScript, saved with `monai.data.save_net_with_metadata`
    <out>/docs/README.md

The network takes the normalised (B, C, S, S) input and returns logits; `preprocessing` and
`postprocessing` are the same functions `medres predict` uses, so outputs agree to float tolerance.
Running the bundle needs medres installed (its DICOM pipeline is the preprocessing).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from medres.errors import ExportParityError
from medres.files import atomic_path, atomic_write
from medres.inference import normalise, to_probs
from medres.io import PreprocessSpec, load_image
from medres.model import ModelMeta, load_checkpoint

PARITY_TOLERANCE = 1e-4


class MedresPreprocess:
    """A file path → the normalised (C, S, S) model input, through medres's ingestion pipeline."""

    def __init__(self, spec: dict, mean: list[float], std: list[float], in_channels: int):
        self.spec, self.mean, self.std, self.in_channels = PreprocessSpec.from_dict(spec), mean, std, in_channels

    def __call__(self, path: str) -> torch.Tensor:
        pixels = torch.from_numpy(load_image(path, self.spec).pixels)[None]
        return normalise(pixels, self.mean, self.std, self.in_channels)[0]


class CalibratedProbabilities:
    """Logits → probabilities with the checkpoint's temperature (softmax or sigmoid)."""

    def __init__(self, task: str, temperature: float):
        self.task, self.temperature = task, temperature

    def __call__(self, logits: torch.Tensor) -> np.ndarray:
        return to_probs(logits.detach(), self.task, self.temperature)


def _metadata(meta: ModelMeta) -> dict:
    import monai

    size = int(meta.preprocess["image_size"])
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported by medres"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medres": meta.medres_version},
        "task": f"chest X-ray {meta.task} classification ({', '.join(meta.classes)})",
        "description": "ResNet50 fine-tuned with medres. Research use only — not for diagnosis.",
        "authors": "medres export",
        "copyright": "see the training data's licences",
        "intended_use": "Research use only — not for diagnosis.",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "CR/DX", "num_channels": meta.in_channels,
                "spatial_shape": [size, size], "dtype": "float32", "value_range": ["(0-mean)/std", "(1-mean)/std"],
                "is_patch_data": False, "channel_def": {str(i): "grey" for i in range(meta.in_channels)},
            }},
            "outputs": {"pred": {
                "type": "logits", "format": "classes", "num_channels": len(meta.classes), "spatial_shape": [len(meta.classes)],
                "dtype": "float32", "value_range": [], "is_onehot": False, "channel_def": {str(i): c for i, c in enumerate(meta.classes)},
            }},
        },
        "medres": asdict(meta),
    }


def _inference_config(meta: ModelMeta) -> dict:
    return {
        "imports": ["$import torch", "$import medres.bundle"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {"_target_": "medres.bundle.MedresPreprocess", "spec": meta.preprocess, "mean": meta.mean, "std": meta.std, "in_channels": meta.in_channels},
        "postprocessing": {"_target_": "medres.bundle.CalibratedProbabilities", "task": meta.task, "temperature": meta.temperature},
        "classes": meta.classes,
        "thresholds": meta.effective_thresholds(),
        "infer": "$lambda path: @postprocessing(@network(@preprocessing(path)[None].to(@device)).cpu())[0]",
    }


def export_bundle(checkpoint: str | Path, out: str | Path) -> dict:
    """Write the bundle folder; check that the TorchScript network matches the checkpoint."""
    from monai.data import save_net_with_metadata

    out = Path(out)
    model, meta = load_checkpoint(checkpoint)
    model = model.float().eval()
    size = int(meta.preprocess["image_size"])
    x = normalise(torch.from_numpy(np.random.default_rng(0).random((3, size, size), dtype=np.float32)), meta.mean, meta.std, meta.in_channels)
    with torch.no_grad():
        scripted = torch.jit.trace(model, x)
        parity = float(np.abs(to_probs(scripted(x), meta.task, meta.temperature) - to_probs(model(x), meta.task, meta.temperature)).max())
    if parity > PARITY_TOLERANCE:
        raise ExportParityError(f"TorchScript parity check failed: max |Δprob| = {parity:.2e} > {PARITY_TOLERANCE:g}")
    metadata = _metadata(meta)
    (out / "models").mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "models" / "model.ts") as tmp:
        with open(tmp, "wb") as fh:
            save_net_with_metadata(scripted, fh, meta_values=metadata)
    atomic_write(out / "configs" / "metadata.json", json.dumps(metadata, indent=2))
    atomic_write(out / "configs" / "inference.json", json.dumps(_inference_config(meta), indent=2))
    atomic_write(out / "docs" / "README.md", f"# medres model bundle\n\n{metadata['task']}. Research use only — not for diagnosis.\n\n"
                 "Needs `medres` installed: its ingestion pipeline (DICOM modality/VOI/presentation LUTs, PNG/JPEG) is the preprocessing.\n\n"
                 "```python\nfrom monai.bundle import ConfigParser\nparser = ConfigParser()\nparser.read_config('configs/inference.json')\n"
                 "parser['bundle_root'] = '.'\nprobs = parser.get_parsed_content('infer')('image.dcm')\n```\n")
    return {"out": str(out), "max_abs_prob_diff": parity, "opset": None}
