"""Training throughput: `medres train`'s step (bf16 autocast where supported, channels_last, batched
augmentation, batches read from the on-disk image store) vs a plain fp32 eager loop on the same model and batch,
plus the share of wall time spent on data with a warm cache, and both as a share of this machine's
limit: a training step is ≈ 3 forward passes of FLOPs (forward, and a backward pass of twice its
cost), so the limit is the GEMM throughput (`_common.gemm_limit`) at the step's precision over
3 × ResNet50's 8.2 GFLOP × (size/224)².

    .venv/bin/python bench/train.py [--size 224] [--batch 16] [--steps 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import gemm_limit, machine, resnet50_limit, save, table


def plain_loop(size: int, batch: int, steps: int) -> float:
    from medres.model import ResNet50

    torch.manual_seed(0)
    model = ResNet50(3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 3, (batch,))
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def medres_run(size: int, batch: int, steps: int) -> dict:
    from medres.config import load_config
    from medres.data.synthetic import make_dataset
    from medres.train import fit, prepare_data

    tmp = Path(tempfile.mkdtemp(prefix="medres-bench-train-"))
    n_per_class = max(8, (steps + 2) * batch // 2 + 4)
    manifest = make_dataset(tmp / "data", n_per_class=n_per_class, size=size, seed=0)
    overrides = [f"data.manifest={manifest}", "data.classes=[normal,opacity,diffuse]", f"data.image_size={size}", f"train.batch_size={batch}",
                 "train.epochs=1", f"train.max_steps_per_epoch={steps}", "train.calibrate=false", f"data.store_dir={tmp / 'store'}",
                 "data.val_fraction=0.05", "data.test_fraction=0.05", "model.weights=none"]
    cfg = load_config(None, overrides)
    prepare_data(cfg, None)  # cold: builds the image store
    t0 = time.perf_counter()
    prepare_data(cfg, None)  # warm: what every later run pays for data (the store is reused)
    data_s = time.perf_counter() - t0
    # One warm-up run (allocator, oneDNN kernels), then the measured one.
    fit(load_config(None, overrides + ["train.max_steps_per_epoch=2"]), tmp / "warm", show_progress=False)
    t0 = time.perf_counter()
    summary = fit(cfg, tmp / "run", show_progress=False)
    total = time.perf_counter() - t0
    ips = summary["epochs"][0]["images_per_s"]
    train_s = steps * batch / ips
    return {"images_per_s": ips, "warm_data_seconds": data_s, "run_seconds": total, "train_step_seconds": train_s, "data_share": data_s / (data_s + train_s)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    plain = plain_loop(args.size, args.batch, args.steps)
    med = medres_run(args.size, args.batch, args.steps)
    from medres.inference import resolve_precision

    gemm = gemm_limit()
    step_precision = "bf16" if resolve_precision("auto", torch.device("cpu")) is torch.bfloat16 else "fp32"
    limit = {k: resnet50_limit(v, args.size) / 3 for k, v in gemm.items() if k in ("fp32", "bf16")}
    rows = [("(a) plain fp32 eager loop", f"{plain:.2f}", "1.00", f"{plain / limit['fp32']:.2f} of fp32"),
            (f"medres train step ({step_precision})", f"{med['images_per_s']:.2f}", f"{med['images_per_s'] / plain:.2f}",
             f"{med['images_per_s'] / limit[step_precision]:.2f} of {step_precision}")]
    print(f"\nResNet50 {args.size}px, batch {args.batch}, {args.steps} timed steps; {machine()}")
    print("training limit: " + ", ".join(f"{k} {gemm[k]:.0f} GFLOP/s = {v:.1f} img/s" for k, v in limit.items()) + "\n")
    print(table(rows, ("loop", "images/s", "ratio", "share of the limit")))
    print(f"\nmedres / plain = {med['images_per_s'] / plain:.2f}x; warm-cache data time {med['warm_data_seconds']:.2f}s = {100 * med['data_share']:.1f}% of data+train time for this epoch")
    save("train", {"plain_images_per_s": plain, **med, "ratio": med["images_per_s"] / plain, "gemm_gflops": gemm, "train_limit_images_per_s": limit,
                   "step_precision": step_precision, "size": args.size, "batch": args.batch, "machine": machine()})


if __name__ == "__main__":
    main()
