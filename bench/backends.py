"""Scoring engines side by side (issue 30): torch, ONNX Runtime and OpenVINO at each precision this CPU
offers, on the same files, in one run, against the machine's own limit and the naive loop.

    .venv/bin/python bench/backends.py --checkpoint RUN/model.safetensors [--files 600]

For every engine × precision: the forward stage (images/s of the model on decoded, preloaded batches of
32, with the gate's features, as `predict` runs it), the whole run (`medres predict` on --files files as
a fresh process: start-up, decoding, model, writing), whole/forward, forward as a share of the GEMM
limit at that precision (bench/_common.gemm_limit), and the probabilities' agreement with torch fp32 on
the same files (max |Δprob|, top-1 agreement). The naive loop (one file at a time: PIL read, resize,
fp32 forward) is the plain baseline. int8 rows need `medres export --quantize int8` to succeed on the
checkpoint (its parity limit applies); a failure is printed and the rows are left out.
Results: runs/bench/backends.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _common import ROOT, SHARED, gemm_limit, machine, need, resnet50_limit, save, table

ENGINES = [  # (label, --backend, --precision, which ONNX file)
    ("torch", "torch", "fp32", None),
    ("torch", "torch", "bf16", None),
    ("onnxruntime", "onnx", "fp32", "fp32"),
    ("onnxruntime", "torch", "int8", "int8"),
    ("openvino", "openvino", "fp32", "fp32"),
    ("openvino", "openvino", "bf16", "fp32"),
    ("openvino", "openvino", "int8", "int8"),
]


def forward_rate(scorer, x: torch.Tensor, batch: int = 32, repeats: int = 2) -> float:
    """Images/s of logits + features over `x`, best of `repeats` passes after one warm-up batch."""
    scorer.logits_and_features(x[:batch])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            scorer.logits_and_features(x[i : i + batch])
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def whole_run(ckpt: Path, folder: Path, out: Path, backend: str, precision: str, onnx: Path | None) -> float:
    """`medres predict` as a fresh process; images/s over every file, start-up included."""
    cmd = [sys.executable, "-m", "medres", "predict", "--checkpoint", str(ckpt), str(folder), "--out", str(out), "-q",
           "--backend", backend, "--precision", precision, *(["--onnx", str(onnx)] if onnx else [])]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc not in (0, 1):  # 1: some files were error rows (listed in the table)
        raise SystemExit(f"{cmd} exited {rc}")
    return sum(1 for p in folder.iterdir()) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--files", type=int, default=600)
    ap.add_argument("--naive-limit", type=int, default=150)
    ap.add_argument("--forward-images", type=int, default=256)
    args = ap.parse_args()
    from predict import naive

    from medres.export import export
    from medres.inference import cpu_supports_bf16
    from medres.io import PreprocessSpec, load_image
    from medres.model import load_checkpoint
    from medres.scoring import scorer_for

    ckpt = Path(args.checkpoint).resolve()  # the whole-run subprocess runs in the repository root
    model, meta = load_checkpoint(ckpt)
    size = int(meta.preprocess["image_size"])
    images = sorted(p for p in (need(SHARED / "cxr") / "images").rglob("*") if p.is_file())[: args.files]
    limits = gemm_limit()
    results = {"machine": machine(), "checkpoint": str(ckpt), "image_size": size, "files": len(images), "gemm_gflops": limits, "rows": []}
    with tempfile.TemporaryDirectory(prefix="medres-bench-backends-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "files"
        folder.mkdir()
        for i, p in enumerate(images):
            (folder / f"{i:05d}_{p.name}").symlink_to(p)
        files = {"fp32": tmp / "m.onnx", "int8": tmp / "m.int8.onnx"}
        export(ckpt, files["fp32"])
        try:
            r = export(ckpt, files["int8"], quantize="int8")
            results["int8_export"] = {k: r.get(k) for k in ("max_abs_prob_diff", "mean_abs_prob_diff", "calibration")}
        except Exception as exc:  # noqa: BLE001 — reported, and the int8 rows are left out
            results["int8_export"] = {"error": str(exc)}
            print(f"int8 export failed: {exc}", flush=True)
        spec = PreprocessSpec.from_dict(meta.preprocess)
        x = torch.from_numpy(np.stack([load_image(p, spec).pixels for p in images[: args.forward_images]]))
        results["naive_fp32"] = naive(load_checkpoint(ckpt)[0], meta, images[: args.naive_limit])
        ref = None
        for label, backend, precision, which in ENGINES:
            if precision == "bf16" and not cpu_supports_bf16():
                continue
            if which == "int8" and "error" in results["int8_export"]:
                continue
            onnx = files[which] if which else None
            scorer = scorer_for(ckpt, load_checkpoint(ckpt)[0], meta, precision=precision, backend=backend, onnx_path=onnx)
            fwd = forward_rate(scorer, x)
            del scorer
            out = tmp / f"{label}-{precision}.csv"
            whole = whole_run(ckpt, folder, out, backend, precision, onnx)
            table_ = pd.read_csv(out).set_index("path").sort_index()
            probs = table_[[f"prob_{c}" for c in meta.classes]].to_numpy(float)
            if ref is None:
                ref = probs
            limit = resnet50_limit(limits.get(precision, limits["fp32"]), size)
            row = {"engine": label, "precision": precision, "forward": fwd, "whole": whole, "whole_over_forward": whole / fwd,
                   "forward_over_limit": fwd / limit, "whole_over_naive": whole / results["naive_fp32"],
                   "max_abs_prob_diff": float(np.nanmax(np.abs(probs - ref))), "top1_agreement": float(np.mean(probs.argmax(1) == ref.argmax(1)))}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    save("backends", results)
    print(f"\n{size}px, {len(images)} files; {results['machine']}")
    print("GEMM limit: " + ", ".join(f"{k} {v:.0f} GFLOP/s = {resnet50_limit(v, size):.1f} img/s" for k, v in limits.items()))
    print(f"naive fp32 loop: {results['naive_fp32']:.1f} img/s; int8 export: {results['int8_export']}\n")
    print(table([(r["engine"], r["precision"], f"{r['forward']:.1f}", f"{r['whole']:.1f}", f"{r['whole_over_forward']:.2f}", f"{r['forward_over_limit']:.2f}",
                  f"{r['whole_over_naive']:.2f}", f"{r['max_abs_prob_diff']:.4f}", f"{r['top1_agreement']:.3f}") for r in results["rows"]],
                ("engine", "precision", "forward img/s", "whole run img/s", "whole/forward", "forward/limit", "whole/naive", "max |Δprob| vs torch fp32", "top-1 agreement")))


if __name__ == "__main__":
    main()
