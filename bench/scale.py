"""Archives larger than memory: store build speed, train/predict peak RSS and bytes written vs N.

For each N, writes N distinct small PNG phantoms (96 px, parallel), then measures in fresh processes:
  1. the image-store build at 224 px (images/s, disk bytes per image), side by side with predict's own
     decode path (`decoded_stream`, same workers, same files, same spec, no model);
  2. peak RSS of `medres train` at 224 px, batch 32, `train.max_steps_per_epoch` steps over the full
     index (store already built), next to what the removed in-memory float32 array alone would take;
  3. `medres predict` over the same files (32 px model, so the 2-core machine finishes), peak RSS and
     total bytes written vs the final table's size.

    .venv/bin/python bench/scale.py --sizes 5000 20000 100000 [--keep]

Disk: ~8 KB per PNG + 50 KB per image in the 224 px uint8 store (5.8 GB at 100,000); removed at the
end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine, save, table

CLASSES = ("normal", "opacity")


def _write_chunk(args: tuple[Path, int, int, int]) -> list[tuple[str, str, str]]:
    from PIL import Image

    from medres.data.synthetic import phantom

    folder, start, stop, seed = args
    rng = np.random.default_rng([seed, start])
    bases = {c: [phantom(rng, 96, c)[0] for _ in range(8)] for c in CLASSES}
    rows = []
    for i in range(start, stop):
        label = CLASSES[i % 2]
        img = bases[label][i % 8] + rng.normal(0, 0.03, (96, 96)).astype(np.float32)  # every file distinct
        name = f"{i // 10000:02d}/{i:06d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        rows.append((name, label, f"p{i:06d}"))
    return rows


def make_archive(folder: Path, n: int) -> Path:
    for k in range((n - 1) // 10000 + 1):
        (folder / f"{k:02d}").mkdir(parents=True, exist_ok=True)
    chunks = [(folder, s, min(n, s + 2000), 0) for s in range(0, n, 2000)]
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        rows = [r for part in pool.map(_write_chunk, chunks) for r in part]
    import pandas as pd

    df = pd.DataFrame(rows, columns=["path", "label", "patient_id"])
    df["split"] = ["val" if i < 64 else "train" for i in range(n)]  # a small validation split: steps, not validation, dominate
    df.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run cmd under GNU time: (seconds, peak RSS bytes of the largest process, stdout)."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    rss = int([ln for ln in r.stderr.splitlines() if ln.startswith("MAXRSS")][-1].split()[1]) * 1024
    return time.perf_counter() - t0, rss, r.stdout


PY_STORE = """
import json, sys, time
from medres.config import load_config
from medres.train import load_training_manifest, training_store
cfg = load_config(None, sys.argv[1:])
store = training_store(cfg, load_training_manifest(cfg))
st = store.ensure(workers=cfg.train.num_workers)
print(json.dumps({"decoded": st.decoded, "seconds": st.seconds, "disk_bytes": store.disk_bytes()}))
"""

PY_DECODE = """
import json, sys, time
from medres.data.manifest import load_manifest
from medres.data.dataset import manifest_items
from medres.io import PreprocessSpec
from medres.scoring import InputFile, decoded_stream
m = load_manifest(sys.argv[1], classes=["normal", "opacity"], task="multiclass")
files = [InputFile(full, shown) for full, shown in manifest_items(m)]
t0 = time.perf_counter()
n = sum(1 for _ in decoded_stream(files, spec=PreprocessSpec(image_size=int(sys.argv[2])), cache_dir=None, workers=int(sys.argv[3])))
print(json.dumps({"images_per_s": n / (time.perf_counter() - t0)}))
"""

PY_PREDICT = """
import json, sys
from medres.predict import predict
r = predict(sys.argv[1], [sys.argv[2]], sys.argv[3], workers=int(sys.argv[4]), overwrite=True)
print(json.dumps({"scored": r.scored, "seconds": r.seconds, "bytes_written": r.bytes_written}))
"""


def one_size(n: int, work: Path, steps: int, workers: int, only: str = "all") -> dict:
    py = sys.executable
    data = work / f"data-{n}"
    t0 = time.perf_counter()
    manifest = make_archive(data, n)
    gen_s = time.perf_counter() - t0
    png_bytes = sum(p.stat().st_size for p in data.rglob("*.png"))
    store_dir = work / "store"
    base = [f"data.manifest={manifest}", "data.classes=[normal,opacity]", f"data.store_dir={store_dir}", "model.weights=none", "train.epochs=1",
            f"train.num_workers={workers}", "train.calibrate=false", "train.batch_size=32"]
    if only == "predict":
        return {"n": n, **predict_only(n, work, data, base, workers)}
    # 1. store build vs predict's decode path, same files, same spec and workers.
    _, build_rss, out = measured([py, "-c", PY_STORE, *base, "data.image_size=224"])
    build = json.loads(out.strip().splitlines()[-1])
    _, _, out = measured([py, "-c", PY_DECODE, str(manifest), "224", str(workers)])
    decode = json.loads(out.strip().splitlines()[-1])
    # 2. train at 224 px over the full index, capped steps (store reused: nothing decoded).
    _, train_rss, _ = measured([py, "-m", "medres", "train", "-q", "--out", str(work / f"run-{n}"), *sum((["--set", a] for a in base + ["data.image_size=224", f"train.max_steps_per_epoch={steps}"]), [])])
    # 3. predict with a 32 px model over every file.
    measured([py, "-m", "medres", "train", "-q", "--out", str(work / f"run32-{n}"), *sum((["--set", a] for a in base + ["data.image_size=32", "train.max_steps_per_epoch=1"]), [])])
    table_path = work / f"pred-{n}.csv"
    _, pred_rss, out = measured([py, "-c", PY_PREDICT, str(work / f"run32-{n}" / "model.safetensors"), str(data), str(table_path), str(workers)])
    pred = json.loads(out.strip().splitlines()[-1])
    result = {
        "n": n, "generate_seconds": gen_s, "png_bytes_per_image": png_bytes / n,
        "store_build_images_per_s": build["decoded"] / build["seconds"], "predict_decode_images_per_s": decode["images_per_s"],
        "store_disk_bytes_per_image": build["disk_bytes"] / n, "store_build_peak_rss": build_rss,
        "train_peak_rss": train_rss, "in_memory_float32_array_bytes": n * 224 * 224 * 4,
        "predict_peak_rss": pred_rss, "predict_images_per_s": pred["scored"] / pred["seconds"],
        "predict_bytes_written": pred["bytes_written"], "predict_table_bytes": table_path.stat().st_size,
    }
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(store_dir, ignore_errors=True)
    return result


def predict_only(n: int, work: Path, data: Path, base: list[str], workers: int) -> dict:
    py = sys.executable
    measured([py, "-m", "medres", "train", "-q", "--out", str(work / f"run32-{n}"), *sum((["--set", a] for a in base + ["data.image_size=32", "train.max_steps_per_epoch=1"]), [])])
    table_path = work / f"pred-{n}.csv"
    _, rss, out = measured([py, "-c", PY_PREDICT, str(work / f"run32-{n}" / "model.safetensors"), str(data), str(table_path), str(workers)])
    pred = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(work / "store", ignore_errors=True)
    return {"predict_peak_rss": rss, "predict_images_per_s": pred["scored"] / pred["seconds"], "predict_bytes_written": pred["bytes_written"],
            "predict_table_bytes": table_path.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 100000])
    ap.add_argument("--steps", type=int, default=8, help="training steps per measurement (train.max_steps_per_epoch)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", choices=["all", "predict"], default="all", help="predict: only the predict measurement")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="medres-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        results.append(one_size(n, work, args.steps, args.workers, args.only))
        print(json.dumps(results[-1]), flush=True)
    if args.only == "predict":
        print(f"\n{machine()}; predict with a 32 px model; {args.workers} decoding workers\n")
        print(table([(f"{r['n']:,}", f"{r['predict_images_per_s']:.0f}", f"{r['predict_peak_rss'] / 1e9:.2f} GB", f"{r['predict_bytes_written'] / r['predict_table_bytes']:.2f}") for r in results],
                    ("N", "predict img/s", "predict peak RSS", "bytes written / table")))
        save("scale_predict", {"machine": machine(), "workers": args.workers, "results": results})
        return
    gb = 1e9
    first = results[0]["train_peak_rss"]
    rows = [(f"{r['n']:,}", f"{r['store_build_images_per_s']:.0f}", f"{r['predict_decode_images_per_s']:.0f}",
             f"{r['store_build_images_per_s'] / r['predict_decode_images_per_s']:.2f}", f"{r['store_disk_bytes_per_image'] / 1e3:.1f} KB",
             f"{r['train_peak_rss'] / gb:.2f} GB", f"{r['train_peak_rss'] / first:.3f}", f"{r['in_memory_float32_array_bytes'] / gb:.1f} GB",
             f"{r['predict_peak_rss'] / gb:.2f} GB", f"{r['predict_bytes_written'] / r['predict_table_bytes']:.2f}") for r in results]
    print(f"\n{machine()}; train 224 px, batch 32, {args.steps} steps; predict with a 32 px model; {args.workers} decoding workers\n")
    print(table(rows, ("N", "store build img/s", "predict decode img/s", "ratio", "store disk/image", "train peak RSS", "vs first N",
                       "old in-memory array alone", "predict peak RSS", "predict bytes written / table")))
    save("scale", {"machine": machine(), "steps": args.steps, "workers": args.workers, "results": results})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
