"""Decode + resize to 224: medres cold and cached vs (a) MONAI LoadImage + Resize and
(b) pydicom pixel_array / PIL + resize, side by side in one run.

    .venv/bin/python bench/ingest.py [--repeats 5]
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


def readable(name: str, load, paths: list[Path]) -> list[Path]:
    ok = []
    for p in paths:  # warm-up pass; find what this loader can read at all
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load(p)
            ok.append(p)
        except Exception as exc:  # noqa: BLE001 — baselines may fail on some files; counted, not fatal
            print(f"  {name}: cannot read {p.name} ({type(exc).__name__})")
    return ok


def run_all(loaders: dict, paths: list[Path], repeats: int) -> list[dict]:
    """Round-robin: each round times one pass of every loader in turn; a loader's rate is its best
    round, so background noise and warm-up hit every loader alike."""
    ok = {name: readable(name, load, paths) for name, (load, _) in loaders.items()}
    best = {name: float("inf") for name in loaders}
    for _ in range(repeats):
        for name, (load, passes) in loaders.items():
            seconds, _ = timed(lambda: [load(p) for _ in range(passes) for p in ok[name]])
            best[name] = min(best[name], seconds / passes)
    return [{"loader": name, "files_read": len(ok[name]), "images_per_s": len(ok[name]) / best[name]} for name in loaders]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each loader's best round counts")
    args = ap.parse_args()
    paths = files()
    cache = Path(tempfile.mkdtemp(prefix="medres-bench-cache-"))
    try:
        for p in paths:  # fill the cache
            medres_loader(cache)(p)
        loaders = {
            "medres cold": (medres_loader(), 1),
            "medres cached": (medres_loader(cache), 10),
            "(a) MONAI LoadImage + Resize": (monai_loader(), 1),
            "(b) pydicom / PIL + resize": (plain_loader(), 1),
        }
        results = run_all(loaders, paths, args.repeats)
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
