"""The int8 path against fp32 (and bf16 where the CPU has it), in one run on ../shared/data/cxr.

(a) model-only images/s on preloaded batches of 32: torch fp32 eager (channels_last), torch bf16
    autocast (only where the CPU has native bf16), ONNX Runtime fp32 and ONNX Runtime int8;
(b) `medres predict` end to end, fp32 vs `--precision int8`;
(c) accuracy: macro AUROC of both over the cxr images with labels, max and mean |Δprob|, and the OOD
    gate's flag rate (threshold fitted on fp32 features) under each.

    .venv/bin/python bench/int8.py --checkpoint runs/scratch/96px-24ep/model.safetensors
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _common import SHARED, machine, need, save, table


def rate(fn, x: torch.Tensor, batch: int = 32, repeats: int = 2) -> float:
    fn(x[:batch])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(x), batch):
            fn(x[i : i + batch])
    return repeats * len(x) / (time.perf_counter() - t0)


def grad_cam_agreement(model, meta, onnx, folder: Path, n: int = 64) -> dict:
    """`report --precision int8` maps (ONNX Runtime layer4 maps + torch head) vs fp32 `compute_cam`
    on the same real images and target (the fp32 prediction): Pearson r of the raw layer4 maps and
    whether the hottest cell is the same."""
    from medres.cam import cam_from_features, compute_cam
    from medres.inference import Predictor
    from medres.io import PreprocessSpec, load_image

    spec = PreprocessSpec.from_dict(meta.preprocess)
    paths = sorted(p for p in folder.rglob("*") if p.is_file())[:: max(1, len(list(folder.rglob("*"))) // n)][:n]
    x = torch.from_numpy(np.stack([load_image(str(p), spec).pixels for p in paths]))
    pred = Predictor.create(model, meta, precision="fp32")
    t = torch.from_numpy(pred.logits(x).argmax(1))[:, None]
    ref = compute_cam(pred.model, pred.prepare(x), t, score="log_odds").maps[:, 0].flatten(1).numpy()
    got = cam_from_features(pred.model, torch.from_numpy(onnx.maps(x)), t, score="log_odds").maps[:, 0].flatten(1).numpy()
    r = np.array([np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else np.nan for a, b in zip(ref, got)])
    return {"images": len(paths), "pearson_mean": float(np.nanmean(r)), "pearson_min": float(np.nanmin(r)), "same_peak": float((ref.argmax(1) == got.argmax(1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model-images", type=int, default=256, help="images per model-only measurement")
    args = ap.parse_args()
    from medres.export import export_onnx
    from medres.inference import Predictor, cpu_supports_bf16
    from medres.onnx import OnnxPredictor
    from medres.metrics import macro_auroc
    from medres.model import load_checkpoint
    from medres.predict import predict
    from medres.quantize import export_int8

    ckpt = Path(args.checkpoint)
    model, meta = load_checkpoint(ckpt)
    size = meta.preprocess["image_size"]
    tmp = Path(tempfile.mkdtemp(prefix="medres-bench-int8-"))
    try:
        t0 = time.perf_counter()
        q = export_int8(ckpt, tmp / "m.int8.onnx")
        export_s = time.perf_counter() - t0
        export_onnx(ckpt, tmp / "m.onnx")
        x = torch.rand(args.model_images, size, size)
        speeds = {"torch fp32": rate(Predictor.create(model, meta, precision="fp32").logits, x)}
        if cpu_supports_bf16():
            speeds["torch bf16"] = rate(Predictor.create(load_checkpoint(ckpt)[0], meta, precision="bf16").logits, x)
        speeds["onnxruntime fp32"] = rate(OnnxPredictor(tmp / "m.onnx", meta).logits, x)
        speeds["onnxruntime int8"] = rate(OnnxPredictor(tmp / "m.int8.onnx", meta, precision="int8").logits, x)

        cam_agreement = grad_cam_agreement(model, meta, OnnxPredictor(tmp / "m.int8.onnx", meta, precision="int8"), need(SHARED / "cxr") / "images")
        folder = need(SHARED / "cxr") / "images"
        e2e, tables = {}, {}
        for prec, kw in (("fp32", {"precision": "fp32"}), ("int8", {"precision": "int8", "onnx_path": tmp / "m.int8.onnx"})):
            t0 = time.perf_counter()
            r = predict(ckpt, [folder], tmp / f"{prec}.csv", overwrite=True, **kw)
            e2e[prec] = r.total / (time.perf_counter() - t0)
            tables[prec] = pd.read_csv(tmp / f"{prec}.csv")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    m = pd.read_csv(SHARED / "cxr" / "manifest.csv").drop_duplicates("path")
    m["path"] = m["path"].str.removeprefix("images/")
    y = np.stack([(m["label"] == c).to_numpy(float) for c in meta.classes], 1)
    cols = [f"prob_{c}" for c in meta.classes]
    probs = {k: t.set_index("path").loc[m["path"], cols].to_numpy() for k, t in tables.items()}
    aur = {k: macro_auroc(y, p) for k, p in probs.items()}
    flags = {k: float((t["in_distribution"] == 0).mean()) for k, t in tables.items()}
    d = np.abs(probs["int8"] - probs["fp32"])
    agree = float((probs["int8"].argmax(1) == probs["fp32"].argmax(1)).mean())

    print(f"\n{size}px; {machine()}\n")
    cols = ["torch fp32"] + (["torch bf16"] if "torch bf16" in speeds else [])
    print(table([(k, f"{v:.1f}", *(f"{v / speeds[c]:.2f}" for c in cols)) for k, v in speeds.items()], ("model only (batch 32)", "images/s", *(f"× {c}" for c in cols))))
    print()
    print(table([(k, f"{e2e[k]:.1f}", f"{aur[k]:.4f}", f"{flags[k]:.3f}") for k in ("fp32", "int8")], ("medres predict, 1,179 cxr files", "images/s", "macro AUROC", "OOD flag rate")))
    print(f"\nint8 vs fp32: |Δ macro AUROC| {abs(aur['int8'] - aur['fp32']):.4f}; max |Δprob| {d.max():.4f}, mean {d.mean():.5f}; same top class {agree:.4f}")
    print(f"Grad-CAM (layer4, predicted class) int8 vs fp32 on {cam_agreement['images']} cxr images: mean Pearson r {cam_agreement['pearson_mean']:.3f} "
          f"(min {cam_agreement['pearson_min']:.3f}); same peak cell {cam_agreement['same_peak']:.3f}")
    print(f"export --quantize int8: {export_s:.1f} s ({q['calibration']['count']} calibration images); max |Δprob| on them {q['max_abs_prob_diff']:.4f}")
    save("int8", {"machine": machine(), "image_size": size, "model_only": speeds, "end_to_end": e2e, "auroc": aur, "ood_flag_rate": flags,
                  "max_abs_prob_diff": float(d.max()), "mean_abs_prob_diff": float(d.mean()), "top_class_agreement": agree, "export_seconds": export_s, "export": q, "grad_cam": cam_agreement})


if __name__ == "__main__":
    main()
