"""Choose configs/covid_xray_scratch.yaml by measurement (issue 14): train candidate from-scratch
recipes on ../shared/data/cxr, compare their *validation* macro AUROC and training time, and only
with --final evaluate the chosen one on the test split (once).

    .venv/bin/python bench/scratch_recipe.py [--only NAME ...]        # candidates, validation only
    .venv/bin/python bench/scratch_recipe.py --final NAME              # the chosen one, test split

Every candidate is configs/covid_xray_scratch.yaml plus the overrides listed in CANDIDATES, trained
with the same patient-disjoint splits (seed 0). Results: runs/bench/scratch_recipe.json.
"""

from __future__ import annotations

import argparse
import json
import time

from _common import ROOT, SHARED, machine, need, table

# name -> overrides of configs/covid_xray_scratch.yaml. Sized so each trains in < 30 min on 2 cores.
CANDIDATES: dict[str, list[str]] = {
    "96px-8ep": ["data.image_size=96", "train.epochs=8"],
    "96px-24ep": ["data.image_size=96", "train.epochs=24"],
    "96px-24ep-lr3e-3": ["data.image_size=96", "train.epochs=24", "train.lr=0.003"],
    "128px-16ep": ["data.image_size=128", "train.epochs=16"],
}
BUDGET_S = 30 * 60


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--final", default=None, help="evaluate this candidate on the test split")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    manifest = need(SHARED / "cxr" / "manifest.csv")

    from medres.config import load_config
    from medres.evaluate import evaluate
    from medres.train import fit

    results_path = ROOT / "runs" / "bench" / "scratch_recipe.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    names = [args.final] if args.final else (args.only or list(CANDIDATES))
    for name in names:
        out = ROOT / "runs" / "scratch" / name
        cfg = load_config(ROOT / "configs" / "covid_xray_scratch.yaml",
                          [f"data.manifest={manifest}", f"data.store_dir={ROOT / 'runs' / 'store'}", *CANDIDATES[name]])
        if not args.final or not (out / "model.safetensors").is_file():
            t0 = time.perf_counter()
            summary = fit(cfg, out, show_progress=False)
            train_s = time.perf_counter() - t0
            curve = [e.get("val_macro_auroc") for e in summary["epochs"]]
            best = max(summary["epochs"], key=lambda e: e.get("val_macro_auroc") or -1)
            results[name] = {"overrides": CANDIDATES[name], "train_seconds": round(train_s, 1),
                             "within_budget": train_s <= BUDGET_S, "best_epoch": best["epoch"],
                             "val_macro_auroc": best.get("val_macro_auroc"),
                             "val_curve": [round(v, 3) if v is not None else None for v in curve],
                             "machine": machine()}
            print(name, json.dumps(results[name]), flush=True)
        if args.final:
            res = evaluate(out / "model.safetensors", manifest, out / "eval", split="test",
                           splits_csv=out / "splits.csv", bootstrap=args.bootstrap, store_dir=cfg.data.store_dir)
            results[name]["test"] = {"images": res["images"], "patients": res["patients"],
                                     "macro_auroc": res["macro"]["auroc"], "macro_auroc_ci": res["macro"]["auroc_ci"],
                                     "accuracy": res.get("accuracy"), "accuracy_ci": res.get("accuracy_ci"),
                                     "per_class_auroc": {c: v["auroc"] for c, v in res["per_class"].items()}}
            print(name, "test", json.dumps(results[name]["test"]), flush=True)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
    rows = [(n, r["train_seconds"], r["best_epoch"], r["val_macro_auroc"] and round(r["val_macro_auroc"], 3),
             " ".join(str(v) for v in r["val_curve"])) for n, r in results.items()]
    print(table(rows, ("candidate", "train s", "best epoch", "val macro AUROC", "val curve")))


if __name__ == "__main__":
    main()
