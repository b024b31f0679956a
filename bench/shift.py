"""Failing loudly on real chest X-rays: the folder-level shift test, the label-free estimates and the
orientation gate, on ../shared/data/cxr.

A model of `configs/covid_xray_scratch.yaml` (96 px, from scratch) is trained on two sources
(nih-cxr14, ieee8023; `data.filter`); its held-out test patients are then scored as they are, after a
simulated change of scanner (gamma, blur, noise: a new hospital's films), with other class priors,
and turned/inverted/mirrored. For each folder size n, many random folders are drawn from the scored
files and tested, so false-alarm rate and detection power are measured, not assumed.

    .venv/bin/python bench/shift.py [--epochs 8] [--draws 100] [--run runs/bench-shift]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from _common import ROOT, SHARED, machine, need, save, table


def train(run: Path, epochs: int) -> None:
    from medres.config import load_config
    from medres.train import fit

    if (run / "model.safetensors").exists():
        return
    cfg = load_config(ROOT / "configs" / "covid_xray_scratch.yaml", [
        f"data.manifest={need(SHARED / 'cxr' / 'manifest.csv')}", "data.filter=['source in [nih-cxr14, ieee8023]']", f"train.epochs={epochs}",
        f"data.store_dir={ROOT / 'runs' / 'bench' / 'store'}"])
    fit(cfg, run, show_progress=True)


def score(run: Path, files: list[Path]) -> dict:
    """probs, reduced features, OOD flags and orientation labels of `files`, through predict's scoring path."""
    from medres.calibration import load_detector
    from medres.model import load_checkpoint
    from medres.scoring import InputFile, scored_batches, scorer_for
    from medres.shift import load_reference

    ckpt = run / "model.safetensors"
    model, meta = load_checkpoint(ckpt)
    scorer = scorer_for(ckpt, model, meta)
    detector, ref = load_detector(ckpt, meta), load_reference(ckpt, meta)
    probs, feats, flagged, orient = [], [], [], []
    for b in scored_batches([InputFile(str(f), f.name) for f in files], scorer, batch_size=32, workers=2, detector=detector, features=True):
        probs.append(b.probs)
        feats.append(ref.reduce(b.features))
        flagged += list(b.ood > detector.threshold)
        orient += [label for _, label in b.orientation]
    return {"probs": np.concatenate(probs), "feats": np.concatenate(feats), "ood": np.array(flagged), "orient": np.array(orient), "ref": ref, "meta": meta}


def variant(src: Path, dst: Path, kind: str, rng) -> Path:
    img = Image.open(src).convert("L")
    if kind == "scanner":  # another hospital's films: a different tone curve, softer, noisier
        a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32) / 255
        a = np.clip(a ** 0.6 + rng.normal(0, 0.04, a.shape), 0, 1)
        img = Image.fromarray((a * 255).astype(np.uint8))
    elif kind.startswith("rot"):
        img = img.rotate(int(kind[3:]), expand=True)
    elif kind == "inverted":
        img = Image.fromarray(255 - np.asarray(img))
    elif kind == "hflip":
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img.save(dst / src.name)
    return dst / src.name


def detection_rate(s: dict, n: int, draws: int, rng, pick=None) -> float:
    from medres.shift import check

    hits = 0
    for _ in range(draws):
        idx = pick(n) if pick else rng.choice(len(s["probs"]), n, replace=False)
        r = check(s["ref"], s["probs"][idx], s["feats"][idx], s["meta"].classes, permutations=200, seed=int(rng.integers(1e9)))
        hits += r["detected"]
    return hits / draws


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-shift")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    train(args.run, args.epochs)
    from sklearn.metrics import roc_auc_score

    from medres.run import RunDir, split_rows
    from medres.shift import estimate_performance

    rd = RunDir.open(args.run)
    m = rd.manifest()
    test = split_rows(m, "test")
    files = [m.absolute(i) for i in test]
    labels = m.targets[test].argmax(1)
    sources = m.frame["source"].to_numpy()[test]
    rng = np.random.default_rng(0)
    base = score(args.run, files)
    tmp = Path(tempfile.mkdtemp(prefix="medres-shift-"))
    scored = {"as is": base}
    for kind in ("scanner", "rot90", "rot180", "rot270", "inverted", "hflip"):
        (tmp / kind).mkdir()
        scored[kind] = score(args.run, [variant(f, tmp / kind, kind, rng) for f in files])
    classes = base["meta"].classes
    print(f"held-out test films: {len(files)} ({', '.join(f'{s} {int((sources == s).sum())}' for s in sorted(set(sources)))}); "
          f"validation reference: {len(base['ref'].probs)} films")

    covid = np.nonzero(labels == classes.index("covid"))[0]
    other = np.nonzero(labels != classes.index("covid"))[0]

    def prior_pick(n: int) -> np.ndarray:  # 80% covid instead of the test split's mix
        k = min(int(0.8 * n), len(covid))
        return np.concatenate([rng.choice(covid, k, replace=False), rng.choice(other, n - k, replace=False)])

    rows = []
    for n in (50, 100, 150):
        if n > len(files):
            continue
        rows.append((n, f"{detection_rate(base, n, args.draws, rng):.2f}", f"{detection_rate(scored['scanner'], n, args.draws, rng):.2f}",
                     f"{detection_rate(base, n, args.draws, rng, prior_pick):.2f}" if int(0.8 * n) <= len(covid) else "–"))
    print("folder-level test, share of folders flagged at α = 0.01:")
    print(table(rows, ("files n", "same sources (false alarms)", "new scanner (power)", "80% covid priors (power)")))

    est_rows = []
    for src in sorted(set(sources)):
        sel = sources == src
        est = estimate_performance(base["ref"], base["probs"][sel], classes, boot=100)
        acc = float((base["probs"][sel].argmax(1) == labels[sel]).mean())
        aurocs = [roc_auc_score(labels[sel] == j, base["probs"][sel][:, j]) if 0 < (labels[sel] == j).sum() < sel.sum() else float("nan") for j in range(len(classes))]
        est_rows.append((src, int(sel.sum()), f"{est['accuracy']['estimate']:.3f}", f"{acc:.3f}",
                         " · ".join(f"{c} {est['per_class_auroc'][c]['estimate']:.2f}/{a:.2f}" for c, a in zip(classes, aurocs) if not np.isnan(a))))
    for kind in ("scanner",):
        est = estimate_performance(base["ref"], scored[kind]["probs"], classes, boot=100)
        acc = float((scored[kind]["probs"].argmax(1) == labels).mean())
        est_rows.append((f"all, {kind}", len(files), f"{est['accuracy']['estimate']:.3f}", f"{acc:.3f}", ""))
    print("label-free estimates vs real (accuracy; per-class AUROC estimated/real):")
    print(table(est_rows, ("test films", "n", "estimated accuracy", "real accuracy", "AUROC estimated/real")))

    gate_rows = []
    for kind, s in scored.items():
        turned = s["orient"] != "as trained"
        gate_rows.append((kind, f"{turned.mean():.2f}", f"{s['ood'].mean():.2f}", f"{(turned | s['ood']).mean():.2f}"))
    print("per-film gate, share flagged:")
    print(table(gate_rows, ("films", "orientation check", "OOD score", "either")))
    save("shift", {"machine": machine(), "detection": rows, "estimates": est_rows, "gate": gate_rows, "files": len(files)})


if __name__ == "__main__":
    main()
