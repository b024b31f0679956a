"""`medres export --format onnx`: dynamic batch axis, preprocessing metadata, parity check.
`--format monai-bundle` is in bundle.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medres.errors import ExportParityError, UsageError
from medres.files import atomic_path
from medres.inference import normalise
from medres.model import load_checkpoint

PARITY_TOLERANCE = 1e-4


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = 17, samples: np.ndarray | None = None) -> dict:
    """Export (input: normalised (B, C, S, S) float32; outputs: logits, pooled features) and check parity:
    max |Δprob| between ONNX Runtime and torch fp32 must be ≤ 1e-4."""
    from medres.onnx import write_onnx

    out = Path(out)
    model, meta = load_checkpoint(checkpoint)
    model = model.float().eval()
    with atomic_path(out) as tmp:
        write_onnx(model, meta, tmp, opset=opset)
        parity = check_parity(model, meta, str(tmp), samples)
        if parity > PARITY_TOLERANCE:
            raise ExportParityError(f"ONNX parity check failed: max |Δprob| = {parity:.2e} > {PARITY_TOLERANCE:g}")
    return {"out": str(out), "max_abs_prob_diff": parity, "opset": opset}


def check_parity(model, meta, onnx_path: str, samples: np.ndarray | None = None) -> float:
    """max |Δprob| of the exported file against torch fp32 on `samples` (default: 3 seeded noise images)."""
    from medres.onnx import max_prob_diff

    size = int(meta.preprocess["image_size"])
    if samples is None:
        samples = np.random.default_rng(0).random((3, size, size), dtype=np.float32)
    x = normalise(torch.from_numpy(samples.astype(np.float32)), meta.mean, meta.std, meta.in_channels).numpy()
    return max_prob_diff(model, meta, onnx_path, x)


def export(checkpoint: str | Path, out: str | Path | None, *, fmt: str = "onnx", quantize: str | None = None, calibration: str | Path | None = None,
           calibration_count: int = 200) -> dict:
    if quantize is not None:
        from medres.onnx import default_int8_path
        from medres.quantize import export_int8

        if fmt != "onnx" or quantize != "int8":
            raise UsageError(f"--quantize {quantize} --format {fmt}: only --format onnx --quantize int8 is supported")
        return export_int8(checkpoint, out or default_int8_path(checkpoint), calibration=calibration, count=calibration_count)
    if out is None:
        raise UsageError("--out is required (a model file for onnx, a folder for monai-bundle)")
    if fmt == "monai-bundle":
        from medres.bundle import export_bundle

        return export_bundle(checkpoint, out)
    if fmt != "onnx":
        raise UsageError(f"--format {fmt!r} is not supported (onnx, monai-bundle)")
    return export_onnx(checkpoint, out)
