"""Choose the recipe controls by measurement (issue 28): does EMA, a one-cycle schedule or the learning
rate `medres lr-find` suggests improve a shipped config on ../shared/data/cxr, beyond the seed spread?

    .venv/bin/python bench/recipe.py                                   # covid_xray_scratch, 3 seeds, all variants
    .venv/bin/python bench/recipe.py --epochs 8 --seeds 0 1 2          # a shorter schedule (what fitted the session)

Every run is the shipped config plus one variant's overrides, on ONE fixed patient-disjoint split
(assign_splits with seed 0, written into a copy of the manifest as its `split` column), so that the
seed changes only initialisation, augmentation and batch order. The variant is chosen on validation
macro AUROC (best epoch) only; each run's test macro AUROC is scored once, after training, and reported
beside it for the run-to-run spread, never used to choose. `lr-find` runs once per config (seed 0) and
its suggestion is the `lr-find` variant's train.lr.

Decision rule: a variant is better when its mean validation macro AUROC exceeds the shipped one's by
more than the larger of the two seed standard deviations. Results (resumable: finished runs are kept):
runs/bench/recipe.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time

from _common import ROOT, SHARED, machine, need, table

VARIANTS: dict[str, list[str]] = {
    "shipped": [],
    "ema": ["train.ema=0.95"],  # horizon ≈ 20 steps ≈ 0.8 epoch of 823 images at batch 32 (0.99, 4 epochs, lagged the 8-epoch run throughout)
    "onecycle": ["train.schedule=onecycle"],
    "lr-find": [],  # train.lr from lr_find(), filled in at run time
}


def fixed_split_manifest(config: str, manifest, out):
    """A copy of `manifest` with a `split` column from the config's own split at seed 0."""
    import pandas as pd

    from medres.config import load_config
    from medres.data.manifest import load_manifest
    from medres.data.splits import assign_splits

    cfg = load_config(config, [f"data.manifest={manifest}", "train.seed=0"])
    m = load_manifest(manifest, classes=cfg.data.classes, task=cfg.data.task)
    splits = assign_splits(m, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction, seed=0, group_by=cfg.data.group_by)
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame["split"] = splits
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="covid_xray_scratch")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: the config's)")
    ap.add_argument("--lr-find-steps", type=int, default=100)
    args = ap.parse_args()
    source = need(SHARED / "cxr" / "manifest.csv")

    from medres.config import load_config
    from medres.evaluate import evaluate
    from medres.lr_find import lr_find
    from medres.run import eval_inputs
    from medres.train import fit

    bench = ROOT / "runs" / "bench"
    results_path = bench / "recipe.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    key = f"{args.config}" + (f"-{args.epochs}ep" if args.epochs else "")
    res = results.setdefault(key, {"machine": machine(), "runs": {}})
    manifest = fixed_split_manifest(args.config, source, bench / "recipe" / "manifest.csv")
    base = [f"data.manifest={manifest}", f"data.root={source.parent}", f"data.store_dir={ROOT / 'runs' / 'store'}",
            *([f"train.epochs={args.epochs}"] if args.epochs else []),
            "eval.orientation_images=0"]  # the ROTATED/INVERTED check (75 s a run) changes no probability
    if "lr-find" in args.variants and "lr_find" not in res:
        t0 = time.perf_counter()
        found = lr_find(load_config(args.config, base), bench / "recipe" / key / "lr-find", steps=args.lr_find_steps)
        res["lr_find"] = {"suggestion": found["suggestion"], "rule": found["rule"], "stopped": found["stopped"], "seconds": round(time.perf_counter() - t0, 1)}
        print("lr-find", json.dumps(res["lr_find"]), flush=True)
    for seed in args.seeds:  # seed-major: a cut-short run still compares every variant
        for variant in args.variants:
            overrides = VARIANTS[variant] + ([f"train.lr={res['lr_find']['suggestion']:.3g}"] if variant == "lr-find" else [])
            name = f"{variant}/seed{seed}"
            if name in res["runs"]:
                continue
            out = bench / "recipe" / key / variant / f"seed{seed}"
            shutil.rmtree(out, ignore_errors=True)  # a run cut short earlier starts again
            cfg = load_config(args.config, [*base, *overrides, f"train.seed={seed}"])
            t0 = time.perf_counter()
            summary = fit(cfg, out, show_progress=False)
            train_s = time.perf_counter() - t0
            ckpt, rows, splits, store = eval_inputs(out, None, None, None)  # the run's own rows, root and splits
            test = evaluate(ckpt, rows, out / "eval", split="test", splits_csv=splits, bootstrap=0, store_dir=store, plots=False)
            res["runs"][name] = {"overrides": overrides, "seed": seed, "train_seconds": round(train_s, 1),
                                 "val_macro_auroc": summary["best_score"], "best_weights": summary["best_weights"],
                                 "val_curve": [round(e.get("val_macro_auroc") or float("nan"), 3) for e in summary["epochs"]],
                                 "test_macro_auroc": test["macro"]["auroc"]}
            print(name, json.dumps(res["runs"][name]), flush=True)
            results_path.write_text(json.dumps(results, indent=2))
    results_path.write_text(json.dumps(results, indent=2))
    print(f"{key}: {res['machine']}")
    print(summary_table(res))


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(res: dict) -> str:
    by: dict[str, list[dict]] = {}
    for name, run in res["runs"].items():
        by.setdefault(name.split("/")[0], []).append(run)
    base = _stats([r["val_macro_auroc"] for r in by.get("shipped", [])]) if by.get("shipped") else None
    rows = []
    for variant, runs in by.items():
        val, test = [r["val_macro_auroc"] for r in runs], [r["test_macro_auroc"] for r in runs]
        (vm, vs), (tm, ts) = _stats(val), _stats(test)
        verdict = "—"
        if base and variant != "shipped":
            verdict = "better" if vm - base[0] > max(vs, base[1]) else "within spread" if vm >= base[0] - max(vs, base[1]) else "worse"
        rows.append((variant, len(runs), f"{vm:.3f} ± {vs:.3f} ({min(val):.3f}–{max(val):.3f})", f"{tm:.3f} ± {ts:.3f} ({min(test):.3f}–{max(test):.3f})",
                     round(statistics.mean(r["train_seconds"] for r in runs)), verdict))
    return table(rows, ("variant", "seeds", "val macro AUROC mean ± sd (range)", "test macro AUROC mean ± sd (range)", "train s / run", "vs shipped (validation)"))


if __name__ == "__main__":
    main()
