"""How well does the input gate's OOD score separate chest X-rays from everything else? (issue 15)

    .venv/bin/python bench/ood.py --run runs/scratch/96px-24ep [--near-source figure1 --near-epochs 8]

The model is a run trained on ../shared/data/cxr (bench/scratch_recipe.py or bench/real_cxr.py); its
detector is (re)fitted with `medres calibrate` first. Groups, each scored with `medres predict`:

- in-distribution: the run's own patient-disjoint test split (false flags at the stored threshold);
- other modalities: every CT/MR/NM/US/RT file in pydicom's shipped test data that medres decodes;
- non-chest radiographs and LUT objects from ../shared/data/dicom (CR extremity, NM, OT);
- synthetic phantoms (medres.data.synthetic) — a different "chest-like" family;
- textures: uniform noise, checkerboards, scanned forms, smooth random fields;
- the test split rotated 90° and inverted (a MONOCHROME1 film read without inversion looks like this);
- near-OOD (--near-source S): a second model trained without source S, scoring S's images.

Per group: images, OOD-detection AUROC against the in-distribution test images, share flagged at the
stored threshold. Also the gate's cost: predict images/s with --gate flag vs --gate off, same run.
Writes runs/bench/ood.json.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from _common import ROOT, SHARED, machine, need, save, table


def _textures(folder: Path, n: int = 20) -> None:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((rng.random((320, 320)) * 255).astype(np.uint8)).save(folder / f"noise_{i}.png")
        Image.fromarray(((np.indices((320, 320)) // (8 + 2 * i)).sum(0) % 2 * 255).astype(np.uint8)).save(folder / f"checker_{i}.png")
        form = Image.new("L", (300, 400), 240 + i % 10)
        draw = ImageDraw.Draw(form)
        for y in range(20, 390, 18):
            draw.line([(20, y), (int(rng.integers(80, 280)), y)], fill=int(rng.integers(0, 60)), width=3)
        draw.rectangle([10, 10, 290, 390], outline=0, width=4)
        form.save(folder / f"form_{i}.png")
        field = gaussian_filter(rng.random((320, 320)), sigma=4 + i)
        field = (field - field.min()) / (np.ptp(field) + 1e-9)
        Image.fromarray((field * 255).astype(np.uint8)).save(folder / f"smooth_{i}.png")


def _pydicom_other_modalities(folder: Path) -> int:
    import pydicom
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    base = Path(get_testdata_file("CT_small.dcm", download=False)).parent
    n = 0
    for f in sorted(base.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 — test files include deliberately broken ones
            continue
        if str(ds.get("Modality", "")) in ("CT", "MR", "NM", "US", "PT", "RTDOSE", "XA", "MG") and "PixelData" in pydicom.dcmread(f, specific_tags=["PixelData"]):
            shutil.copy(f, folder / f"{ds.Modality}_{f.name}")
            n += 1
    return n


def _transformed(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        a = np.asarray(Image.open(f).convert("L"))
        Image.fromarray(np.rot90(a).copy()).save(folder / f"rotated_{f.stem}.png")
        Image.fromarray(255 - a).save(folder / f"inverted_{f.stem}.png")


def _score(ckpt: Path, inputs: list, out: Path, gate: str = "flag"):
    import pandas as pd

    from medres.predict import predict

    t0 = time.perf_counter()
    res = predict(ckpt, inputs, out, overwrite=True, gate=gate)
    secs = time.perf_counter() - t0
    return pd.read_csv(out, dtype={"ood_score": float}), res, secs


def gate_cost(ckpt: Path, sizes=(None, 224), repeats: int = 6) -> dict:
    """The gate's cost where it is paid, the model stage: forward alone vs forward returning the pooled
    features + the OOD score, alternated, median of `repeats` (end-to-end predict runs vary ±15% run
    to run on a 2-core VM, more than the difference measured)."""
    import torch

    from medres.calibration import load_detector
    from medres.inference import Predictor
    from medres.model import load_checkpoint

    model, meta = load_checkpoint(ckpt)
    det = load_detector(ckpt, meta)
    out = {}
    for size in sizes:
        size = size or int(meta.preprocess["image_size"])
        meta.preprocess["image_size"] = size
        p = Predictor.create(model, meta)
        x = torch.rand(32, size, size)
        p.logits(x), p.logits_and_features(x)
        off, on = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            p.logits(x)
            off.append(time.perf_counter() - t)
            t = time.perf_counter()
            det.score(p.logits_and_features(x)[1])
            on.append(time.perf_counter() - t)
        out[size] = {"gate_off": 32 / float(np.median(off)), "gate_flag": 32 / float(np.median(on)), "ratio": float(np.median(off) / np.median(on))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "scratch" / "96px-24ep"))
    ap.add_argument("--near-source", default=None, help="also train a model without this source and score its images")
    ap.add_argument("--near-epochs", type=int, default=8, help="epochs for that model (the scratch recipe at 96 px; 8 epochs ≈ 6 min on 2 cores)")
    args = ap.parse_args()
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from medres.calibration import calibrate

    cxr = need(SHARED / "cxr" / "manifest.csv")
    run = Path(args.run)
    ckpt = run / "model.safetensors"
    work = ROOT / "runs" / "bench" / "ood"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    import yaml

    store_dir = yaml.safe_load((run / "config.yaml").read_text())["data"].get("store_dir")
    calibrate(ckpt, cxr, run / "splits.csv", store_dir=store_dir)
    from medres.model import load_checkpoint

    _, meta = load_checkpoint(ckpt)
    splits = pd.read_csv(run / "splits.csv")
    test_files = [cxr.parent / p for p in splits.loc[splits["split"] == "test", "path"]]

    ind, _, _ = _score(ckpt, test_files, work / "ind.csv")
    groups: dict[str, list] = {}
    _pydicom_other_modalities(work / "modalities")
    groups["other modalities (pydicom test files)"] = [work / "modalities"]
    shared_dicom = [f for f in sorted((SHARED / "dicom").glob("*.dcm")) if f.name not in ("nih_dx_chest_mono2.dcm", "dx_image.dcm", "RG1_J2KI.dcm")]
    groups["non-chest DICOMs in ../shared/data/dicom"] = shared_dicom
    from medres.data.synthetic import make_dataset

    phantoms = make_dataset(work / "phantoms", n_per_class=10, size=256, seed=3)
    groups["synthetic phantoms"] = [phantoms.parent / "images"]
    _textures(work / "textures")
    for kind in ("noise", "checker", "form", "smooth"):
        groups[f"texture: {kind}"] = sorted((work / "textures").glob(f"{kind}_*.png"))
    _transformed(test_files, work / "transformed")
    groups["test split rotated 90°"] = sorted((work / "transformed").glob("rotated_*.png"))
    groups["test split inverted"] = sorted((work / "transformed").glob("inverted_*.png"))
    groups["chest DICOMs in ../shared/data/dicom (CR/DX chest)"] = [SHARED / "dicom" / n for n in ("nih_dx_chest_mono2.dcm", "dx_image.dcm", "RG1_J2KI.dcm")]

    ind_ok = ind[ind["status"] == "ok"]
    rows, results = [], {}
    frr = float((ind_ok["in_distribution"] == 0).mean())
    rows.append(("in-distribution: test split", len(ind_ok), "—", f"{frr:.3f} (false flags)"))
    for name, inputs in groups.items():
        df, _, _ = _score(ckpt, inputs, work / f"g{len(results)}.csv")
        ok = df[df["status"] == "ok"]
        if ok.empty:
            continue
        y = np.r_[np.zeros(len(ind_ok)), np.ones(len(ok))]
        auroc = float(roc_auc_score(y, np.r_[ind_ok["ood_score"], ok["ood_score"]]))
        flagged = float((ok["in_distribution"] == 0).mean())
        results[name] = {"images": len(ok), "auroc": auroc, "flagged": flagged, "errors": int((df["status"] == "error").sum()),
                         "median_score": float(ok["ood_score"].median())}
        rows.append((name, len(ok), f"{auroc:.3f}", f"{flagged:.3f}"))

    if args.near_source:
        from medres.config import load_config
        from medres.train import fit

        man = pd.read_csv(cxr)
        without = man[man["source"] != args.near_source]
        held = man[man["source"] == args.near_source]
        sub = work / f"without_{args.near_source}.csv"  # paths stay relative to the shared folder (data.root)
        without.to_csv(sub, index=False)
        cfg = load_config(ROOT / "configs" / "covid_xray_scratch.yaml", [f"data.manifest={sub}", f"data.root={cxr.parent}", f"data.store_dir={store_dir}", f"train.epochs={args.near_epochs}"])
        near_run = work / f"without_{args.near_source}"
        fit(cfg, near_run, show_progress=False)
        nsplits = pd.read_csv(near_run / "splits.csv")
        near_test = [cxr.parent / p for p in nsplits.loc[nsplits["split"] == "test", "path"]]
        a, _, _ = _score(near_run / "model.safetensors", near_test, work / "near_ind.csv")
        b, _, _ = _score(near_run / "model.safetensors", [cxr.parent / p for p in held["path"]], work / "near_ood.csv")
        a, b = a[a["status"] == "ok"], b[b["status"] == "ok"]
        auroc = float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a["ood_score"], b["ood_score"]]))
        results[f"near-OOD: {args.near_source} images, model trained without them"] = {
            "images": len(b), "auroc": auroc, "flagged": float((b["in_distribution"] == 0).mean()),
            "in_distribution_false_flags": float((a["in_distribution"] == 0).mean())}
        rows.append((f"near-OOD: source {args.near_source} (model trained without it)", len(b), f"{auroc:.3f}", f"{results[list(results)[-1]]['flagged']:.3f}"))

    cost = gate_cost(ckpt)
    payload = {"machine": machine(), "run": str(run), "detector": meta.ood, "in_distribution": {"images": len(ind_ok), "false_flag_rate": frr},
               "groups": results, "model_stage_images_per_s": cost}
    save("ood", payload)
    print(machine())
    print(f"detector: {meta.ood['method']}, threshold {meta.ood['threshold']:.3f} ({meta.ood['quantile']:.0%} of {meta.ood['n_val']} validation images)")
    print(table(rows, ("group", "images", "OOD AUROC vs test split", "flagged at threshold")))
    for size, c in cost.items():
        print(f"model stage at {size} px, batch 32: {c['gate_off']:.1f} images/s without the gate, {c['gate_flag']:.1f} with features + OOD score (ratio {c['ratio']:.3f})")


if __name__ == "__main__":
    main()
