"""Does `torch.compile` pay for itself in predict? Model-only, one run: eager vs compiled (inductor),
compile time included, over a 1,000-image job at the checkpoint's size, batch 32, predict's
precision. The issue's bar: a `--compile` flag only if it wins by ≥ 10% after its compile time.

    .venv/bin/python bench/compile.py --checkpoint runs/scratch/96px-24ep/model.safetensors
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import machine, save, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    from medres.inference import Predictor
    from medres.model import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    size = meta.preprocess["image_size"]
    x = torch.rand(args.batch, size, size)
    eager = Predictor.create(model, meta)
    compiled = Predictor.create(load_checkpoint(args.checkpoint)[0], meta)
    compiled.model = torch.compile(compiled.model)

    t0 = time.perf_counter()
    compiled.logits(x)  # first call compiles
    compile_s = time.perf_counter() - t0
    rates = {}
    for name, p in (("eager", eager), ("compiled", compiled)):
        p.logits(x)
        t0 = time.perf_counter()
        for _ in range(8):
            p.logits(x)
        rates[name] = 8 * args.batch / (time.perf_counter() - t0)
    job = {"eager": args.images / rates["eager"], "compiled": compile_s + args.images / rates["compiled"]}
    print(f"\n{size}px, batch {args.batch}, precision {eager.dtype or 'fp32'}; {machine()}\n")
    print(table([(k, f"{rates[k]:.1f}", f"{rates[k] / rates['eager']:.2f}", f"{job[k]:.1f}", f"{job['eager'] / job[k]:.2f}") for k in rates],
                ("model", "images/s (steady)", "× eager", f"seconds for {args.images} images incl. compile", "job speed-up")))
    print(f"\ncompile time (first call): {compile_s:.1f} s")
    save("compile", {"machine": machine(), "size": size, "rates": rates, "compile_seconds": compile_s, "job_seconds": job})


if __name__ == "__main__":
    main()
