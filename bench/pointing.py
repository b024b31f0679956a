"""Grad-CAM localisation on phantoms with known lesion masks (the pointing game of Zhang et al. 2016):
medres's receptive-field-aligned upsampling vs the conventional resize (OpenCV / `F.interpolate`,
as in pytorch-grad-cam and MONAI), same model, same maps, in one run; a shuffled-mask chance level; and
Adebayo et al.'s randomisation check. The model is trained here (the test fixture's recipe).

    .venv/bin/python bench/pointing.py [--n-per-class 250] [--epochs 8] [--seed 1] [--out runs/bench_pointing]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import ROOT, machine, save, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-class", type=int, default=250)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_pointing")
    args = ap.parse_args()
    from medres.cam import compute_cam, upsample
    from medres.config import load_config
    from medres.data.synthetic import make_dataset
    from medres.localisation import held_out_lesions, pointing_game, randomised_copy
    from medres.train import fit

    manifest = make_dataset(args.out / "data", n_per_class=args.n_per_class, size=128, classes=("normal", "opacity"), seed=5, dicom_fraction=0.1)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.manifest={manifest}", "data.classes=[normal,opacity]",
                                                     f"train.epochs={args.epochs}", "train.calibrate=false", f"train.seed={args.seed}"])
    t0 = time.perf_counter()
    fit(cfg, args.out / f"run-seed{args.seed}", show_progress=False)
    train_s = time.perf_counter() - t0
    run = args.out / f"run-seed{args.seed}"
    model, x, masks = held_out_lesions(manifest, run)
    size = x.shape[-1]
    t = torch.ones(len(x), 1, dtype=torch.long)
    with torch.no_grad():
        p = model(x).softmax(1)[:, 1]
    rand = randomised_copy(model, ("layer4", "fc"))

    rows, results = [], {}
    for layer in ("layer4", "layer3"):
        for method in ("gradcam", "gradcam++"):
            maps = compute_cam(model, x, t, layer=layer, method=method, score="log_odds").maps
            cell = size / maps.shape[-1]
            for crit, tol in (("inside", 0.0), ("within ½ cell", cell / 2)):
                aligned = upsample(maps, size)[:, 0].numpy()
                conventional = upsample(maps, size, anchor=None)[:, 0].numpy()
                hit_a, hit_c = pointing_game(aligned, masks, tol), pointing_game(conventional, masks, tol)
                chance = pointing_game(aligned, masks[1:] + masks[:1], tol)
                results[f"{layer}/{method}/{crit}"] = {"aligned": hit_a, "conventional": hit_c, "shuffled": chance}
                rows.append((layer, method, crit, f"{hit_a:.2f}", f"{hit_c:.2f}", f"{hit_a / max(hit_c, 1e-9):.2f}×", f"{chance:.2f}"))
    rmaps = compute_cam(rand, x, t, layer="layer3", score="log_odds").maps
    hit_rand = pointing_game(upsample(rmaps, size)[:, 0].numpy(), masks, 0.0)
    print(machine())
    print(f"{len(x)} held-out positives; training {train_s:.0f} s; mean p(opacity) {p.mean():.3f}")
    print(table(rows, ("layer", "method", "peak", "aligned (medres)", "conventional resize", "ratio", "shuffled masks")))
    print(f"randomised layer4+fc, layer3 Grad-CAM inside: {hit_rand:.2f}")
    save(f"pointing-seed{args.seed}", {"machine": machine(), "n": len(x), "train_s": train_s, "results": results, "randomised_layer3_inside": hit_rand})


if __name__ == "__main__":
    main()
