"""Does transfer help? A donor trained by medres on phantom task A (normal vs opacity: one dense
consolidation) is saved as a plain torchvision-layout state dict; task B (normal vs diffuse: several
faint patches, a lesion the donor never saw) has only 60 training images. Same budget for each arm:
fine-tune from the donor (freeze 1 epoch, backbone LR × 0.1), train from scratch, linear probe only.

    .venv/bin/python bench/transfer.py [--seeds 1 2 3] [--epochs 8]

Prints per-epoch validation macro AUROC (learning curves) and the test AUROC of the best epoch per
arm and seed; writes docs/transfer.png and runs/bench/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from _common import ROOT, machine, save, table

ARMS = {
    "fine-tune": ["train.freeze_epochs=1", "train.backbone_lr_mult=0.1"],
    "scratch": ["model.weights=none"],
    "linear probe": ["train.backbone_lr_mult=0.1"],  # freeze_epochs = epochs, set below
}


def make_donor(work: Path, epochs: int) -> Path:
    """Task A: the pointing-game recipe (500 phantoms, 128 px), trained from scratch by medres."""
    from medres.config import load_config
    from medres.data.synthetic import make_dataset
    from medres.model import load_checkpoint
    from medres.train import fit

    manifest = make_dataset(work / "task_a", n_per_class=250, size=128, classes=("normal", "opacity"), seed=5, dicom_fraction=0.1)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.manifest={manifest}", "data.classes=[normal,opacity]", f"train.epochs={epochs}", "train.calibrate=false",
                                                       "train.seed=1", f"data.store_dir={work / 'store'}"])
    fit(cfg, work / "donor_run", show_progress=False)
    model, _ = load_checkpoint(work / "donor_run" / "model.safetensors")
    path = work / "resnet50-donor.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, path)  # torchvision names, no head
    return path


def task_b(work: Path, seed: int) -> Path:
    """60 training, 20 validation and 200 test images of normal vs diffuse."""
    from medres.data.synthetic import make_dataset

    manifest = make_dataset(work / f"task_b_{seed}", n_per_class=140, size=128, classes=("normal", "diffuse"), seed=100 + seed, dicom_fraction=0.1)
    df = pd.read_csv(manifest)
    rank = df.groupby("label").cumcount()
    df["split"] = ["train" if r < 30 else "val" if r < 40 else "test" for r in rank]
    df.to_csv(manifest, index=False)
    return manifest


def run_arm(work: Path, manifest: Path, donor: Path, arm: str, seed: int, epochs: int) -> dict:
    from medres.config import load_config
    from medres.evaluate import evaluate
    from medres.train import fit

    extra = list(ARMS[arm]) + ([f"train.freeze_epochs={epochs}"] if arm == "linear probe" else [])
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.manifest={manifest}", "data.classes=[normal,diffuse]", f"model.weights={donor}", f"train.epochs={epochs}",
                                                       "train.batch_size=16", "train.warmup_epochs=1", "train.calibrate=false", f"train.seed={seed}",
                                                       f"data.store_dir={work / 'store'}", *extra])
    out = work / f"{arm.replace(' ', '_')}_{seed}"
    t0 = time.perf_counter()
    summary = fit(cfg, out, show_progress=False)
    seconds = time.perf_counter() - t0
    res = evaluate(out / "model.safetensors", manifest, out / "eval", split="test", bootstrap=200, plots=False, store_dir=work / "store")
    return {"arm": arm, "seed": seed, "seconds": seconds, "val_curve": [e.get("val_macro_auroc") for e in summary["epochs"]],
            "test_auroc": res["macro"]["auroc"], "test_auroc_ci": res["macro"]["auroc_ci"]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"fine-tune": "tab:blue", "scratch": "tab:orange", "linear probe": "tab:green"}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in results:
        ax.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], color=colours[r["arm"]], alpha=0.8, label=r["arm"] if r["seed"] == results[0]["seed"] else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation macro AUROC")
    ax.set_title("Task B (60 training images): donor from task A vs scratch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--donor-epochs", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medres-bench-transfer-"))
    t0 = time.perf_counter()
    donor = make_donor(work, args.donor_epochs)
    donor_s = time.perf_counter() - t0
    results = []
    for seed in args.seeds:
        manifest = task_b(work, seed)
        for arm in ARMS:
            results.append(run_arm(work, manifest, donor, arm, seed, args.epochs))
            print(json.dumps(results[-1]), flush=True)
    rows = [(r["arm"], r["seed"], " ".join(f"{v:.2f}" for v in r["val_curve"]), f"{r['test_auroc']:.3f} ({r['test_auroc_ci'][0]:.3f}–{r['test_auroc_ci'][1]:.3f})", f"{r['seconds']:.0f}") for r in results]
    print(f"\n{machine()}; donor trained in {donor_s:.0f} s\n")
    print(table(rows, ("arm", "seed", "validation macro AUROC per epoch", "test macro AUROC (95% CI)", "train s")))
    for seed in args.seeds:
        by = {r["arm"]: r["test_auroc"] for r in results if r["seed"] == seed}
        print(f"seed {seed}: fine-tune − scratch = {by['fine-tune'] - by['scratch']:+.3f}")
    plot(results, ROOT / "docs" / "transfer.png")
    save("transfer", {"machine": machine(), "donor_seconds": donor_s, "epochs": args.epochs, "results": results})


if __name__ == "__main__":
    main()
