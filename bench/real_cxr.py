"""Train configs/covid_xray.yaml on ../shared/data/cxr (model.weights=none: no pretrained file is
reachable here), then evaluate its patient-disjoint test split with a subgroup audit by source.

    .venv/bin/python bench/real_cxr.py [--data ../shared/data/cxr] [--out runs/bench_real_cxr] [--set k=v ...]

Prints validation/test AUROC per class, wall time, calibration and the per-source table; writes
<out>/bench.json. Numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cxr"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_real_cxr"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    manifest = Path(args.data) / "manifest.csv"
    if not manifest.is_file():
        sys.exit(f"{manifest} not found: this benchmark needs ../shared/data/cxr")

    from medres.config import load_config
    from medres.evaluate import evaluate
    from medres.train import fit

    out = Path(args.out)
    cfg = load_config(ROOT / "configs" / "covid_xray.yaml", [f"data.manifest={manifest}", "model.weights=none", f"data.store_dir={out.parent / 'store'}", *args.overrides])
    t0 = time.perf_counter()
    summary = fit(cfg, out, show_progress=sys.stderr.isatty())
    train_s = time.perf_counter() - t0
    best = max(summary["epochs"], key=lambda e: e.get("val_macro_auroc") or -1)
    res = evaluate(out / "model.safetensors", manifest, out / "eval", split="test", splits_csv=out / "splits.csv", by=["source"], bootstrap=args.bootstrap, store_dir=cfg.data.store_dir)
    report = {
        "train_seconds": round(train_s, 1),
        "epochs_run": len(summary["epochs"]),
        "best_epoch": best["epoch"],
        "val_macro_auroc": best.get("val_macro_auroc"),
        "train_images_per_s": round(sum(e["images_per_s"] for e in summary["epochs"]) / len(summary["epochs"]), 1),
        "test": {
            "images": res["images"], "patients": res["patients"],
            "macro_auroc": res["macro"]["auroc"], "macro_auroc_ci": res["macro"]["auroc_ci"],
            "accuracy": res.get("accuracy"), "accuracy_ci": res.get("accuracy_ci"),
            "per_class": {c: {k: v[k] for k in ("auroc", "auroc_ci", "sensitivity", "specificity", "threshold")} for c, v in res["per_class"].items()},
            "calibration": res["calibration"],
        },
        "subgroups": [{"column": s["column"], "predictability_auroc": s["predictability_auroc"], "groups": {g: {"images": m["images"], "patients": m["patients"], "macro_auroc": m["macro"]["auroc"], "per_class_auroc": {c: m["per_class"][c]["auroc"] for c in res["classes"]}} for g, m in s["groups"].items()}} for s in res["subgroups"]],
        "warnings": res["warnings"],
        "config_overrides": ["model.weights=none", *args.overrides],
        "store_dtype": cfg.data.store_dtype,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
