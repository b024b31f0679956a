"""Heatmaps/s: medres's CAM step (batched, gradient only down to layer4) vs MONAI's GradCAM one image
at a time and batched, same model and images, in one run.

    .venv/bin/python bench/report.py [--size 224] [--n 32] [--batch 16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import machine, save, table


def int8_rate(model, args) -> float:
    """report --precision int8's CAM step: layer4 maps from the int8 ONNX model, the head's gradient
    in torch. The same random-weight model, quantized on 16 noise images (speed only)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from medres.cam import cam_from_features
    from medres.onnx import OnnxPredictor
    from medres.model import ModelMeta, save_checkpoint
    from medres.quantize import export_int8

    tmp = Path(tempfile.mkdtemp(prefix="medres-bench-cam-int8-"))
    meta = ModelMeta(classes=["a", "b", "c"], task="multiclass", preprocess={"image_size": args.size, "resize": "letterbox"}, mean=[0.5] * 3, std=[0.25] * 3)
    save_checkpoint(tmp / "m.safetensors", model, meta)
    (tmp / "cal").mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (args.size, args.size), dtype=np.uint8)).save(tmp / "cal" / f"{i}.png")
    export_int8(tmp / "m.safetensors", tmp / "m.int8.onnx", calibration=tmp / "cal", count=16)
    onnx = OnnxPredictor(tmp / "m.int8.onnx", meta, precision="int8")
    pixels = torch.rand(args.n, args.size, args.size)
    targets = torch.randint(0, 3, (args.n, 1))
    cam_from_features(model, torch.from_numpy(onnx.maps(pixels[:2])), targets[:2])
    t0 = time.perf_counter()
    for i in range(0, args.n, args.batch):
        cam_from_features(model, torch.from_numpy(onnx.maps(pixels[i : i + args.batch])), targets[i : i + args.batch])
    return args.n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--int8", action="store_true", help="also time report's int8 path (quantizes the benchmark model first)")
    args = ap.parse_args()
    from monai.visualize import GradCAM

    from medres.cam import compute_cam
    from medres.model import ResNet50

    from medres.inference import resolve_precision

    torch.manual_seed(0)
    model = ResNet50(3).eval()
    x = torch.randn(args.n, 3, args.size, args.size)
    dtype = resolve_precision("auto", torch.device("cpu"))
    fast_model = ResNet50(3).eval().to(memory_format=torch.channels_last)
    fast_model.load_state_dict(model.state_dict())
    fast_x = x.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 3, (args.n, 1))

    def medres_rate(m, xs, dt) -> float:
        compute_cam(m, xs[:2], targets[:2], autocast_dtype=dt)
        t0 = time.perf_counter()
        for i in range(0, args.n, args.batch):
            compute_cam(m, xs[i : i + args.batch], targets[i : i + args.batch], autocast_dtype=dt)
        return args.n / (time.perf_counter() - t0)

    cam = GradCAM(nn_module=model, target_layers="layer4")

    def monai_rate(batch: int) -> float:
        cam(x[:1], class_idx=int(targets[0, 0]))
        t0 = time.perf_counter()
        for i in range(0, args.n, batch):
            # MONAI's class_idx is one int per call: a batch shares one target class.
            cam(x[i : i + batch], class_idx=int(targets[i, 0]))
        return args.n / (time.perf_counter() - t0)

    int8 = int8_rate(model, args) if args.int8 else None
    m32 = medres_rate(model, x, None)
    m = medres_rate(fast_model, fast_x, dtype)
    a = monai_rate(1)
    b = monai_rate(args.batch)
    rows = [("MONAI GradCAM, one image at a time", f"{a:.2f}", "1.00"), (f"MONAI GradCAM, batch {args.batch} (one class per batch)", f"{b:.2f}", f"{b / a:.2f}"),
            (f"medres compute_cam, batch {args.batch}, fp32", f"{m32:.2f}", f"{m32 / a:.2f}"),
            (f"medres compute_cam, batch {args.batch}, {dtype or 'fp32'} + channels_last (what `medres report` runs)", f"{m:.2f}", f"{m / a:.2f}")]
    if int8 is not None:
        rows.append((f"medres int8: ONNX Runtime layer4 maps + torch head backward, batch {args.batch} (`report --precision int8`)", f"{int8:.2f}", f"{int8 / a:.2f}"))
    print(f"\nResNet50 {args.size}px, {args.n} images, layer4; {machine()}\n")
    print(table(rows, ("method", "heatmaps/s", "ratio to MONAI per-image")))
    save("report", {"medres_int8": int8, "medres": m, "medres_fp32": m32, "monai_per_image": a, "monai_batched": b, "ratio_per_image": m / a, "ratio_batched": m / b, "machine": machine()})


if __name__ == "__main__":
    main()
