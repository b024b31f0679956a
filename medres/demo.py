"""`medres demo`: synthetic phantoms → train → evaluate → predict → Grad-CAM report, on the same
library functions the CLI commands call."""

from __future__ import annotations

from pathlib import Path

from medres.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"  # package data; configs/demo.yaml links here


def default_demo_config() -> Path:
    return DEMO_CONFIG


def run_demo(out: str | Path, *, config: str | Path | None = None, overrides: list[str] | None = None, n_per_class: int = 100, show_progress: bool = True) -> dict:
    from medres.data.synthetic import make_dataset
    from medres.evaluate import evaluate
    from medres.predict import predict
    from medres.report import report
    from medres.train import fit

    out = Path(out)
    data = out / "phantoms"
    print(f"[1/5] generating {3 * n_per_class} synthetic phantoms (PNG + DICOM) in {data}")
    manifest = make_dataset(data, n_per_class=n_per_class, size=160, seed=0)
    # The decoded-image store lives with the demo's other outputs unless the user points it elsewhere.
    cfg = load_config(config or default_demo_config(), [f"data.manifest={manifest}", f"data.store_dir={out / 'store'}"] + list(overrides or []))
    run = out / "run"
    print(f"[2/5] training {cfg.name}: ResNet50 at {cfg.data.image_size} px for {cfg.train.epochs} epochs -> {run}")
    if (run / "state.pt").exists():
        import shutil

        shutil.rmtree(run)
    fit(cfg, run, show_progress=show_progress)
    print("[3/5] evaluating on the held-out phantom split")
    from medres.run import RunDir, split_rows

    rd = RunDir.open(run)
    rows = rd.manifest()  # the run's own rows with their splits
    result = evaluate(rd.checkpoint, rows, out / "eval", split="test", by=["site"], bootstrap=cfg.eval.bootstrap, store_dir=cfg.data.store_dir)
    from medres.card import write_card

    card_md, card_html = write_card(run, run / "model_card.md", out / "eval")
    print(f"      model card: {card_md} and {card_html}")
    test = rows.frame.iloc[split_rows(rows, "test")].drop(columns=["split"])
    test_manifest = data / "test_manifest.csv"  # beside the images: its paths are relative to it
    test.to_csv(test_manifest, index=False)
    print("[4/5] batch scoring the test split")
    pred = predict(run / "model.safetensors", [test_manifest], out / "predictions.csv", overwrite=True, workers=1)
    # At 128 px layer4's maps are 4×4 cells of 32 px — coarser than the phantoms' lesions; layer3's
    # are 8×8 (docs/benchmarks.md, pointing game). At 224 px and above the default layer4 is 7×7+.
    layer = "layer3" if cfg.data.image_size < 224 else "layer4"
    print(f"[5/5] Grad-CAM report on {layer}")
    report(run / "model.safetensors", [test_manifest], out / "report", layer=layer)
    return {
        "auroc": result["macro"]["auroc"],
        "auroc_ci": result["macro"].get("auroc_ci") or [float("nan")] * 2,
        "accuracy": result.get("accuracy", float("nan")),
        "eval_html": str(out / "eval" / "report.html"),
        "report_html": str(out / "report" / "index.html"),
        "predictions": str(pred.out),
        "card": str(card_md),
    }
