"""Batch scoring: (a) a naive loop — one file at a time: read, resize, fp32 forward; (b) model-only
forward on preloaded tensors (batched, medres precision); (c) `medres predict` end to end; in one run,
on ../shared/data/cxr and ../shared/data/cxr-fullres. Also AUROC bf16 vs fp32 on the cxr set.

    .venv/bin/python bench/predict.py --checkpoint runs/bench_real_cxr/model.safetensors [--naive-limit 200]
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

from _common import SHARED, limit_lines, machine, need, save, table


def naive(model, meta, paths: list[Path]) -> float:
    from PIL import Image

    from medres.inference import normalise

    size = meta.preprocess["image_size"]
    model = model.float().eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in paths:
            img = Image.open(p).convert("L").resize((size, size), Image.Resampling.BILINEAR)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
            model(normalise(x, meta.mean, meta.std, meta.in_channels))
    return len(paths) / (time.perf_counter() - t0)


def model_only(model, meta, n: int, batch: int = 32) -> float:
    from medres.inference import Predictor

    pred = Predictor.create(model, meta)
    size = meta.preprocess["image_size"]
    x = torch.rand(n, size, size)
    pred.logits(x[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        pred.logits(x[i : i + batch])
    return n / (time.perf_counter() - t0)


def end_to_end(ckpt: Path, folder: Path, out: Path, precision: str = "auto") -> tuple[float, Path]:
    from medres.predict import predict

    t0 = time.perf_counter()
    r = predict(ckpt, [folder], out, overwrite=True, precision=precision)
    return r.total / (time.perf_counter() - t0), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--naive-limit", type=int, default=200, help="files for the slow naive loop (its rate is per image)")
    ap.add_argument("--min-files", type=int, default=240, help="a smaller set is repeated (symlinks) up to this many files")
    args = ap.parse_args()
    from medres.metrics import macro_auroc
    from medres.model import load_checkpoint

    ckpt = Path(args.checkpoint)
    model, meta = load_checkpoint(ckpt)
    tmp = Path(tempfile.mkdtemp(prefix="medres-bench-predict-"))
    results = {}
    try:
        for name in ("cxr", "cxr-fullres"):
            folder = need(SHARED / name) / "images"
            paths = sorted(p for p in folder.rglob("*") if p.is_file())
            if len(paths) < args.min_files:  # 24 originals: repeat them (links) so start-up does not dominate
                folder = tmp / f"{name}-x"
                folder.mkdir()
                for k in range(-(-args.min_files // len(paths))):
                    for p in paths:
                        (folder / f"{k}_{p.name}").symlink_to(p.resolve())
                paths = sorted(folder.iterdir())
            a = naive(load_checkpoint(ckpt)[0], meta, paths[: args.naive_limit])
            b = model_only(load_checkpoint(ckpt)[0], meta, len(paths))
            c, out = end_to_end(ckpt, folder, tmp / f"{name}.csv")
            results[name] = {"files": len(paths), "naive": a, "model_only": b, "medres_predict": c}
        # bf16 vs fp32 on the shared cxr set (all 1,182 images, labels from the manifest).
        _, fp32 = end_to_end(ckpt, SHARED / "cxr" / "images", tmp / "fp32.csv", precision="fp32")
        m = pd.read_csv(SHARED / "cxr" / "manifest.csv").drop_duplicates("path")
        m["path"] = m["path"].str.removeprefix("images/")
        y = np.stack([(m["label"] == c).to_numpy(float) for c in meta.classes], 1)
        aur = {}
        for prec, f in (("bf16/auto", tmp / "cxr.csv"), ("fp32", fp32)):
            df = pd.read_csv(f).set_index("path").loc[m["path"]]
            aur[prec] = macro_auroc(y, df[[f"prob_{c}" for c in meta.classes]].to_numpy())
            if prec == "fp32":
                p32 = df[[f"prob_{c}" for c in meta.classes]].to_numpy()
            else:
                pbf = df[[f"prob_{c}" for c in meta.classes]].to_numpy()
        results["auroc"] = {**aur, "difference": abs(aur["bf16/auto"] - aur["fp32"]), "max_abs_prob_diff": float(np.abs(p32 - pbf).max())}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name in ("cxr", "cxr-fullres"):
        r = results[name]
        rows.append((name, r["files"], f"{r['naive']:.1f}", f"{r['model_only']:.1f}", f"{r['medres_predict']:.1f}", f"{r['medres_predict'] / r['naive']:.2f}", f"{r['medres_predict'] / r['model_only']:.2f}"))
    print(f"\n{meta.preprocess['image_size']}px; {machine()}\n")
    print(table(rows, ("set", "files", "(a) naive img/s", "(b) model-only img/s", "(c) medres predict img/s", "c/a", "c/b")))
    from medres.inference import cpu_supports_bf16

    auto = "bf16" if cpu_supports_bf16() else "fp32"
    r = results["cxr"]
    print("\n" + limit_lines(meta.preprocess["image_size"], {"(a) naive (fp32)": r["naive"], f"(b) model-only ({auto})": r["model_only"],
                                                             f"(c) medres predict ({auto})": r["medres_predict"]}))
    a = results["auroc"]
    print(f"\nmacro AUROC on ../shared/data/cxr: auto(bf16) {a['bf16/auto']:.4f} vs fp32 {a['fp32']:.4f} (|Δ| {a['difference']:.4f}); max |Δprob| {a['max_abs_prob_diff']:.4f}")
    save("predict", {**results, "machine": machine()})


if __name__ == "__main__":
    main()
