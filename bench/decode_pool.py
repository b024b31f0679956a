"""Decoding pool: threads vs processes, one vs two workers, `medres predict` end to end on one folder,
fp32 and (with --onnx) int8, in one run. The figures behind `scoring.DECODE_POOL` and
`scoring.default_workers`.

    .venv/bin/python bench/decode_pool.py --checkpoint runs/scratch/96px-24ep/model.safetensors \\
        --folder ../shared/data/cxr/images [--onnx runs/scratch/96px-24ep/model.int8.onnx]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import machine, save, table

CHOICES = (("process", 1), ("thread", 1), ("thread", 2), ("process", 2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--onnx", help="int8 model from medres export --quantize int8")
    args = ap.parse_args()
    from medres.predict import predict

    tmp = Path(tempfile.mkdtemp(prefix="medres-bench-pool-"))
    rates: dict[str, dict[str, float]] = {}
    try:
        for prec in ("fp32", "int8") if args.onnx else ("fp32",):
            for pool, workers in CHOICES:
                t0 = time.perf_counter()
                r = predict(args.checkpoint, [args.folder], tmp / "p.csv", overwrite=True, precision=prec, onnx_path=args.onnx if prec == "int8" else None,
                            workers=workers, decode_pool=pool)
                rates.setdefault(prec, {})[f"{pool} × {workers}"] = r.total / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.folder}, {r.total} files; {machine()}\n")
    print(table([(p, *(f"{v:.1f}" for v in row.values())) for p, row in rates.items()], ("precision", *next(iter(rates.values())).keys())))
    save("decode_pool", {"machine": machine(), "folder": args.folder, "files": r.total, "images_per_s": rates})


if __name__ == "__main__":
    main()
