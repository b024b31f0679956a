"""Decode + resize to 224: medres cold and cached vs (a) MONAI LoadImage + Resize and
(b) pydicom pixel_array / PIL + resize, side by side in one run.

    .venv/bin/python bench/ingest.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from _common import SHARED, machine, need, save, table, timed

SIZE = 224


def files() -> list[Path]:
    out = sorted((need(SHARED / "cxr-fullres") / "images").iterdir())
    return out + sorted(need(SHARED / "dicom").glob("*.dcm"))


def medres_loader(cache_dir=None):
    from medres.io import ImageCache, PreprocessSpec, load_image

    spec = PreprocessSpec(SIZE)
    cache = ImageCache(cache_dir) if cache_dir else None
    return lambda p: load_image(p, spec, cache=cache).pixels


def monai_loader():
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize

    load = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Resize((SIZE, SIZE))])
    return lambda p: np.asarray(load(str(p)))


def plain_loader():
    import pydicom
    from PIL import Image

    def load(p: Path):
        with open(p, "rb") as fh:
            is_dicom = fh.read(132)[128:132] == b"DICM"
        if is_dicom:
            arr = pydicom.dcmread(str(p)).pixel_array.astype(np.float32)
            img = Image.fromarray(arr, mode="F")
        else:
            img = Image.open(p).convert("L")
        return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)

    return load


def run(name: str, load, paths: list[Path], repeats: int) -> dict:
    ok = []
    for p in paths:  # warm-up pass; find what this loader can read at all
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load(p)
            ok.append(p)
        except Exception as exc:  # noqa: BLE001 — baselines may fail on some files; counted, not fatal
            print(f"  {name}: cannot read {p.name} ({type(exc).__name__})")
    seconds, _ = timed(lambda: [load(p) for _ in range(repeats) for p in ok])
    return {"loader": name, "files_read": len(ok), "images_per_s": len(ok) * repeats / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    paths = files()
    cache = Path(tempfile.mkdtemp(prefix="medres-bench-cache-"))
    try:
        results = [run("medres cold", medres_loader(), paths, args.repeats)]
        for p in paths:  # fill the cache
            medres_loader(cache)(p)
        results.append(run("medres cached", medres_loader(cache), paths, args.repeats * 10))
        results.append(run("(a) MONAI LoadImage + Resize", monai_loader(), paths, args.repeats))
        results.append(run("(b) pydicom / PIL + resize", plain_loader(), paths, args.repeats))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    cold, cached = results[0]["images_per_s"], results[1]["images_per_s"]
    best = max(r["images_per_s"] for r in results[2:])
    rows = [(r["loader"], f"{r['files_read']}/{len(paths)}", f"{r['images_per_s']:.1f}", f"{r['images_per_s'] / cold:.2f}") for r in results]
    print(f"\n{len(paths)} files (../shared/data/cxr-fullres + dicom) → {SIZE}x{SIZE}; {machine()}\n")
    print(table(rows, ("loader", "files read", "images/s", "ratio to medres cold")))
    print(f"\ncached / cold = {cached / cold:.1f}x   cold / best baseline = {cold / best:.2f}x")
    save("ingest", {"results": results, "cached_over_cold": cached / cold, "cold_over_best_baseline": cold / best, "machine": machine()})


if __name__ == "__main__":
    main()
