"""Few labels, many images (issue 25): does `medres pretrain` on the unlabelled films, then `train` (with
`train.unlabeled`) and `medres select` beat training from scratch on the same labels?

    .venv/bin/python bench/label_efficiency.py                       # every stage, resumable
    .venv/bin/python bench/label_efficiency.py --stages pretrain fractions --seeds 0 1 2
    .venv/bin/python bench/label_efficiency.py --report              # the tables from runs/bench/label_efficiency.json

On ../shared/data/cxr with ONE fixed patient-disjoint split (the shipped scratch config's, seed 0, written
as the manifest's `split` column, as bench/recipe.py does). Every run is configs/covid_xray_scratch.yaml
(96 px, AdamW 1e-3, label smoothing, class weights) with `train.precision: auto` and a label budget:

- `pretrain`: VICReg (`medres pretrain`) on the train + validation films, labels not read.
- `fractions`: 10 %, 25 %, 100 % of the training rows (class-stratified, seeded, nested), validation and
  test untouched; arms `scratch` (model.weights: none), `pretrained` (the pretrain run's backbone,
  fine-tuned end to end), `probe` (same backbone frozen: train.freeze_epochs = train.epochs, a linear
  probe) and `semi` (pretrained + train.unlabeled: the training films whose labels were withheld).
  Fewer rows get more epochs (24 at ≤ 10 %, 16 at ≤ 25 %, 8 at 100 %) so small budgets still take enough
  steps; both arms of a comparison always share budget, epochs, seed and split.
- `al`: active learning from the pretrained backbone: 5 % random labels, then each round trains, runs
  `medres.select.select` (the CLI's code) on the unlabelled training films with the strategy, and adds 5 %
  of the training rows (the picked films' labels are read from the manifest: an oracle radiologist) up to
  25 %; strategies entropy, margin, coreset, random.
- `hospital`: one source (ieee8023) is held out of the labelled train and validation rows; its training
  films are given without labels. Arms: scratch; scratch + train.unlabeled (its films); pretrained (the
  pretrain run saw its films) ± train.unlabeled. Reported: that source's test AUROC.

Test macro AUROC is scored once per run, after training (the run's best-validation weights; nothing is
chosen on test). Differences between arms use a paired patient bootstrap (1,000 resamples of test
patients; each resample scores both arms' seed-averaged macro AUROC). Per source, and whether the
pretrained features cluster by hospital (5-nearest-neighbour source accuracy on the test and validation
films, within each class that has more than one source, against the majority share).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from _common import ROOT, SHARED, machine, need

BENCH = ROOT / "runs" / "bench" / "label_eff"
RESULTS = ROOT / "runs" / "bench" / "label_efficiency.json"
SMOKE: list[str] = []  # --smoke: 2 steps an epoch, 1 epoch (checks the code paths in minutes; numbers meaningless)
CONFIG = "covid_xray_scratch"
HOLDOUT = "ieee8023"
STRATEGIES = ("random", "entropy", "margin", "coreset")


def epochs_for(fraction: float) -> int:
    return 24 if fraction <= 0.10 else 16 if fraction <= 0.25 else 8


class Bench:
    def __init__(self, args):
        import pandas as pd

        self.args = args
        self.source = need(SHARED / "cxr" / "manifest.csv")
        self.results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"machine": machine(), "runs": {}}
        BENCH.mkdir(parents=True, exist_ok=True)
        from recipe import fixed_split_manifest

        split_csv = fixed_split_manifest(CONFIG, self.source, BENCH / "manifest.csv")
        self.frame = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
        self.train_idx = np.nonzero((self.frame["split"] == "train").to_numpy())[0]

    def save(self) -> None:
        RESULTS.write_text(json.dumps(self.results, indent=2))

    # manifests ----------------------------------------------------------------------------------------
    def labelled_subset(self, fraction: float, seed: int) -> np.ndarray:
        """Class-stratified, nested in `fraction` for a seed: row indices of the labelled training rows."""
        rng = np.random.default_rng(1000 + seed)
        keep = []
        for label in sorted(set(self.frame["label"].iloc[self.train_idx])):
            rows = self.train_idx[(self.frame["label"].iloc[self.train_idx] == label).to_numpy()]
            rows = rows[rng.permutation(len(rows))]
            keep += list(rows[: max(1, round(fraction * len(rows)))])
        return np.sort(np.array(keep, dtype=int))

    def manifest(self, name: str, train_rows: np.ndarray, *, drop_val_source: str | None = None) -> Path:
        """The labelled training rows given + every validation and test row."""
        f = self.frame
        keep = np.zeros(len(f), bool)
        keep[train_rows] = True
        keep |= (f["split"] != "train").to_numpy()
        if drop_val_source:
            keep &= ~((f["split"] == "val") & (f["source"] == drop_val_source)).to_numpy()
        path = BENCH / "manifests" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        f[keep].to_csv(path, index=False)
        return path

    def unlabelled(self, name: str, rows: np.ndarray) -> Path:
        """A path-only manifest (with a root column) of `rows`: what train.unlabeled, pretrain and select read."""
        sub = self.frame.iloc[rows][["path", "patient_id"]].copy()
        sub["root"] = str(self.source.parent)
        path = BENCH / "manifests" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        sub.to_csv(path, index=False)
        return path

    # runs ---------------------------------------------------------------------------------------------
    def base(self, manifest: Path, seed: int, epochs: int) -> list[str]:
        return [f"data.manifest={manifest}", f"data.root={self.source.parent}", f"data.store_dir={ROOT / 'runs' / 'store'}",
                "train.precision=auto", "eval.orientation_images=0", "eval.bootstrap=0", f"train.seed={seed}", f"train.epochs={1 if SMOKE else epochs}", *SMOKE]

    def run(self, name: str, overrides: list[str]) -> dict:
        """Train + score the test split once; cached by name in the results file."""
        if name in self.results["runs"]:
            return self.results["runs"][name]
        from medres.config import load_config
        from medres.evaluate import evaluate
        from medres.run import eval_inputs
        from medres.train import fit

        out = BENCH / name
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        summary = fit(load_config(CONFIG, overrides), out, show_progress=False)
        seconds = time.perf_counter() - t0
        ckpt, rows, splits, store = eval_inputs(out, None, None, None)
        test = evaluate(ckpt, rows, out / "eval", split="test", splits_csv=splits, bootstrap=0, store_dir=store, plots=False)
        record = {"overrides": overrides, "train_seconds": round(seconds, 1), "val_macro_auroc": summary["best_score"],
                  "test_macro_auroc": test["macro"]["auroc"], "per_case": str(out / "eval" / "per_case.csv"), "checkpoint": str(ckpt)}
        if "pseudo_label_rate" in (summary["epochs"][-1] if summary.get("epochs") else {}):
            record["pseudo_label_rate"] = [round(e.get("pseudo_label_rate", 0), 3) for e in summary["epochs"]]
        self.results["runs"][name] = record
        self.save()
        print(name, json.dumps({k: v for k, v in record.items() if k not in ("overrides", "per_case", "checkpoint")}), flush=True)
        return record

    # stages -------------------------------------------------------------------------------------------
    def pretrain(self) -> Path:
        backbone = BENCH / "pretrain" / "backbone.safetensors"
        if "pretrain" in self.results and backbone.is_file():
            return backbone
        from medres.config import load_config
        from medres.pretrain import pretrain

        films = self.unlabelled("pretrain", np.nonzero((self.frame["split"] != "test").to_numpy())[0])
        cfg = load_config(CONFIG, [f"data.manifest={films}", f"data.store_dir={ROOT / 'runs' / 'store'}", "train.precision=auto",
                                   f"pretrain.epochs={self.args.pretrain_epochs}", "pretrain.batch_size=32",
                                   *(["pretrain.max_steps_per_epoch=2"] if SMOKE else [])])
        shutil.rmtree(BENCH / "pretrain", ignore_errors=True)
        t0 = time.perf_counter()
        summary = pretrain(cfg, BENCH / "pretrain", show_progress=False)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        self.results["pretrain"] = summary
        self.save()
        print("pretrain", json.dumps(summary), flush=True)
        return backbone

    def fractions(self, backbone: Path) -> None:
        for seed in self.args.seeds:
            for fraction in self.args.fractions:
                rows = self.labelled_subset(fraction, seed)
                e = 1 if SMOKE else epochs_for(fraction)
                m = self.manifest(f"f{fraction:g}-s{seed}", rows)
                base = self.base(m, seed, e)
                self.run(f"fractions/{fraction:g}/scratch/seed{seed}", base)
                self.run(f"fractions/{fraction:g}/pretrained/seed{seed}", [*base, f"model.weights={backbone}"])
                if fraction == 0.25:
                    self.run(f"fractions/{fraction:g}/probe/seed{seed}", [*base, f"model.weights={backbone}", f"train.freeze_epochs={e}"])
                if fraction < 1 and any(a.startswith("semi") for a in self.args.arms):
                    withheld = self.unlabelled(f"f{fraction:g}-s{seed}-unlabelled", np.setdiff1d(self.train_idx, rows))
                    semi = [*base, f"model.weights={backbone}", f"train.unlabeled={withheld}"]
                    if "semi" in self.args.arms:
                        self.run(f"fractions/{fraction:g}/semi/seed{seed}", semi)
                    if "semi-t0.8" in self.args.arms:  # FixMatch's 0.95 bar vs label smoothing 0.05 (top target 0.967): few films pass it
                        self.run(f"fractions/{fraction:g}/semi-t0.8/seed{seed}", [*semi, "train.pseudo_threshold=0.8"])

    def hospital(self, backbone: Path) -> None:
        seed = self.args.seeds[0]
        f = self.frame
        own = self.train_idx[(f["source"].iloc[self.train_idx] == HOLDOUT).to_numpy()]
        others = np.setdiff1d(self.train_idx, own)
        m = self.manifest("hospital", others, drop_val_source=HOLDOUT)
        films = self.unlabelled("hospital-unlabelled", own)
        base = self.base(m, seed, 12)
        self.run(f"hospital/scratch/seed{seed}", base)
        self.run(f"hospital/scratch+unlabeled/seed{seed}", [*base, f"train.unlabeled={films}"])
        self.run(f"hospital/pretrained/seed{seed}", [*base, f"model.weights={backbone}"])
        self.run(f"hospital/pretrained+unlabeled/seed{seed}", [*base, f"model.weights={backbone}", f"train.unlabeled={films}"])
        if "semi-t0.8" in self.args.arms:  # at 0.95 under 1 % of the new site's films pass the bar
            self.run(f"hospital/pretrained+unlabeled-t0.8/seed{seed}", [*base, f"model.weights={backbone}", f"train.unlabeled={films}", "train.pseudo_threshold=0.8"])

    def active_learning(self, backbone: Path) -> None:
        from medres.select import select

        step = round(0.05 * len(self.train_idx))
        by_path = {p: i for i, p in enumerate(self.frame["path"])}
        for seed in self.args.al_seeds:
            start = self.labelled_subset(0.05, seed)
            for strategy in self.args.strategies:
                rows = start
                for k in range(1, 6):
                    fraction = 0.05 * k
                    name = f"al/{strategy}/seed{seed}/round{k}"
                    m = self.manifest(f"al-{strategy}-s{seed}-r{k}", rows)
                    shared = f"al/random/seed{seed}/round1"  # the 5 % start is the same for every strategy
                    if k == 1 and shared in self.results["runs"] and name != shared:
                        self.results["runs"][name] = self.results["runs"][shared]
                    record = self.run(name, [*self.base(m, seed, epochs_for(fraction)), f"model.weights={backbone}"])
                    record["labelled"] = int(len(rows))
                    if k == 5:
                        break
                    pool = self.unlabelled(f"al-{strategy}-s{seed}-r{k}-pool", np.setdiff1d(self.train_idx, rows))
                    out = BENCH / "al" / strategy / f"seed{seed}" / f"round{k}-select.csv"
                    picks = select(record["checkpoint"], [pool], out, n=step, strategy=strategy, exclude=m, seed=seed, overwrite=True)
                    base = str(self.source.parent.resolve()) + "/"
                    chosen = [by_path[str(Path(r) / p).removeprefix(base)] for p, r in zip(picks["path"], picks["root"])]
                    rows = np.union1d(rows, chosen)
                self.save()


# analysis -------------------------------------------------------------------------------------------------
def per_case(record: dict):
    import pandas as pd

    return pd.read_csv(record["per_case"], dtype={"patient_id": str}).sort_values("path").reset_index(drop=True)


def arrays(frame, classes) -> tuple[np.ndarray, np.ndarray]:
    y = np.stack([(frame["label"] == c).to_numpy(float) for c in classes], 1)
    return y, frame[[f"prob_{c}" for c in classes]].to_numpy(float)


def fast_macro(y: np.ndarray, p: np.ndarray) -> float:
    """Macro AUROC over the classes with both outcomes present (Mann–Whitney U with mid-ranks for ties:
    the same number as sklearn's roc_auc_score, ~50× faster inside a 1,000-resample bootstrap)."""
    from scipy.stats import rankdata

    aucs = []
    for k in range(y.shape[1]):
        pos = y[:, k] > 0.5
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            aucs.append((rankdata(p[:, k])[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float("nan")


def macro(frame, classes) -> float:
    return fast_macro(*arrays(frame, classes))


def paired(a_runs: list[dict], b_runs: list[dict], classes, n: int = 1000, source: str | None = None) -> dict:
    """Seed-averaged macro AUROC of arms a and b on the same test films, and the paired patient-bootstrap CI
    of b − a."""
    from medres.evaluate import patient_bootstrap

    a = [per_case(r) for r in a_runs]
    b = [per_case(r) for r in b_runs]
    if source:
        a = [f[f["path"].str.contains(f"/{source}/")].reset_index(drop=True) for f in a]
        b = [f[f["path"].str.contains(f"/{source}/")].reset_index(drop=True) for f in b]
    patients = a[0]["patient_id"].to_numpy()
    a, b = [arrays(f, classes) for f in a], [arrays(f, classes) for f in b]
    point_a, point_b = np.mean([fast_macro(*f) for f in a]), np.mean([fast_macro(*f) for f in b])
    diffs = []
    for idx in patient_bootstrap(patients, n, 0):
        diffs.append(np.mean([fast_macro(y[idx], p[idx]) for y, p in b]) - np.mean([fast_macro(y[idx], p[idx]) for y, p in a]))
    diffs = np.array([d for d in diffs if np.isfinite(d)])
    return {"a": point_a, "b": point_b, "diff": point_b - point_a, "lo": float(np.quantile(diffs, 0.025)), "hi": float(np.quantile(diffs, 0.975))}


def runs_of(res: dict, prefix: str, seeds: set[str] | None = None) -> list[dict]:
    """The runs of one arm in seed order, optionally only those seeds (so two arms pair seed for seed)."""
    return [v for k, v in sorted(res["runs"].items()) if k.startswith(prefix + "/seed") and (seeds is None or k.rsplit("/", 1)[1] in seeds)]


def seeds_of(res: dict, prefix: str) -> set[str]:
    return {k.rsplit("/", 1)[1] for k in res["runs"] if k.startswith(prefix + "/seed")}


def clustering(res: dict, bench: Bench) -> list[str]:
    """Do the pretrained features cluster by hospital? 5-NN source accuracy within each class."""
    probe = runs_of(res, "fractions/0.25/probe")
    if not probe:
        return []
    import torch

    from medres.model import load_checkpoint
    from medres.scoring import InputFile, scored_batches, scorer_for

    f = bench.frame[bench.frame["split"] != "train"].reset_index(drop=True)
    ckpt = Path(probe[0]["checkpoint"])
    model, meta = load_checkpoint(ckpt)
    scorer = scorer_for(ckpt, model, meta)
    files = [InputFile(str(bench.source.parent / p), p) for p in f["path"]]
    feats = []
    with torch.inference_mode():
        for batch in scored_batches(files, scorer, features=True):
            feats.append(np.asarray(batch.features, np.float64))
    x = np.concatenate(feats)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    lines = []
    for label in sorted(set(f["label"])):
        sel = (f["label"] == label).to_numpy()
        src = f["source"].to_numpy()[sel]
        if len(set(src)) < 2:
            continue
        s = x[sel] @ x[sel].T
        np.fill_diagonal(s, -np.inf)
        nn = np.argsort(-s, axis=1)[:, :5]
        votes = [max(set(src[r]), key=list(src[r]).count) for r in nn]
        acc = float(np.mean(np.array(votes) == src))
        majority = max(np.mean(src == v) for v in set(src))
        lines.append(f"| {label} | {len(src)} | {', '.join(f'{v} {int((src == v).sum())}' for v in sorted(set(src)))} | {acc:.2f} | {majority:.2f} |")
    return lines


def report(res: dict, bench: Bench) -> str:
    classes = ["normal", "pneumonia", "covid"]
    out = [f"Machine: {res['machine']}", ""]
    if "pretrain" in res:
        p = res["pretrain"]
        out.append(f"Pretraining: VICReg, {p['films']} films, {p['epochs']} epochs, {p.get('seconds', 0) / 60:.1f} min, embedding spread {p['embedding_spread']:.3f} (collapsed: {p['collapsed']})")
        out.append("")
    out += ["| labels | arm | seeds | test macro AUROC (mean of seeds) | vs scratch (paired 95% CI) | minutes a run | pseudo-labelled share |", "|---|---|---|---|---|---|---|"]
    for fraction in ("0.1", "0.25", "1"):
        for arm in ("scratch", "pretrained", "probe", "semi", "semi-t0.8"):
            runs = runs_of(res, f"fractions/{fraction}/{arm}")
            if not runs:
                continue
            mean = np.mean([r["test_macro_auroc"] for r in runs])
            vs = ""
            common = seeds_of(res, f"fractions/{fraction}/{arm}") & seeds_of(res, f"fractions/{fraction}/scratch")
            if arm != "scratch" and common:  # paired on the seeds both arms ran (scratch's mean may span more)
                d = paired(runs_of(res, f"fractions/{fraction}/scratch", common), runs_of(res, f"fractions/{fraction}/{arm}", common), classes)
                vs = f"{d['diff']:+.3f} ({d['lo']:+.3f} to {d['hi']:+.3f})" + ("" if len(common) == len(runs_of(res, f"fractions/{fraction}/scratch")) else f" on seed {', '.join(sorted(c.removeprefix('seed') for c in common))}")
            minutes = np.mean([r["train_seconds"] for r in runs]) / 60
            rates = [np.mean(r["pseudo_label_rate"]) for r in runs if r.get("pseudo_label_rate")]
            out.append(f"| {float(fraction):.0%} | {arm} | {len(runs)} | {mean:.3f} | {vs} | {minutes:.1f} | {f'{np.mean(rates):.1%}' if rates else '—'} |")
    out += ["", "Per source (seed-averaged test macro AUROC over the classes present in that source):", "",
            "| labels | source | scratch | pretrained | pretrained − scratch (paired 95% CI) |", "|---|---|---|---|---|"]
    for fraction in ("0.1", "0.25", "1"):
        scratch, pre = runs_of(res, f"fractions/{fraction}/scratch"), runs_of(res, f"fractions/{fraction}/pretrained")
        if scratch and len(scratch) == len(pre):
            for source in sorted(set(bench.frame["source"])):
                d = paired(scratch, pre, classes, source=source)
                out.append(f"| {float(fraction):.0%} | {source} | {d['a']:.3f} | {d['b']:.3f} | {d['diff']:+.3f} ({d['lo']:+.3f} to {d['hi']:+.3f}) |")
    hosp = {k.split("/")[1]: v for k, v in res["runs"].items() if k.startswith("hospital/")}
    if hosp:
        out += ["", f"Held-out hospital ({HOLDOUT}: no labelled train/validation rows; its training films given without labels):", "",
                f"| arm | {HOLDOUT} test macro AUROC | all-sources test macro AUROC | unlabelled films past the pseudo-label bar (mean of epochs) |", "|---|---|---|---|"]
        for arm, r in hosp.items():
            frame = per_case(r)
            own = frame[frame["path"].str.contains(f"/{HOLDOUT}/")]
            rate = f"{np.mean(r['pseudo_label_rate']):.1%}" if r.get("pseudo_label_rate") else "—"
            out.append(f"| {arm} | {macro(own, classes):.3f} | {r['test_macro_auroc']:.3f} | {rate} |")
    al = {}
    for k, v in res["runs"].items():
        if k.startswith("al/"):
            _, strategy, seed, rnd = k.split("/")
            al.setdefault(strategy, {}).setdefault(int(rnd.removeprefix("round")), []).append(v["test_macro_auroc"])
    if al:
        out += ["", "Active learning (pretrained backbone; 5 % random start, +5 % of the training rows a round):", "",
                "| strategy | seeds | 5 % | 10 % | 15 % | 20 % | 25 % | first budget reaching random's 25 % |", "|---|---|---|---|---|---|---|---|"]
        target = np.mean(al["random"][5]) if 5 in al.get("random", {}) else None
        for strategy in STRATEGIES:
            if strategy in al:
                means = {k: float(np.mean(v)) for k, v in al[strategy].items()}
                cells = [f"{means[k]:.3f}" if k in means else "" for k in range(1, 6)]
                reach = "" if target is None else next((f"{5 * k} %" for k in range(1, 6) if means.get(k, -1) >= target), "not within 25 %")
                out.append(f"| {strategy} | {len(al[strategy].get(1, []))} | " + " | ".join(cells) + f" | {reach} |")
    lines = clustering(res, bench)
    if lines:
        out += ["", "Do the pretrained features cluster by hospital? (validation + test films, 5-NN source vote within a class)", "",
                "| class | films | sources | 5-NN source accuracy | majority share |", "|---|---|---|---|---|", *lines]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", nargs="+", default=["pretrain", "fractions", "hospital", "al"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.10, 0.25, 1.0])
    ap.add_argument("--arms", nargs="+", default=["semi"], help="optional arms beyond scratch/pretrained/probe: semi, semi-t0.8 (none: neither)")
    ap.add_argument("--al-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--report", action="store_true", help="print the tables from the results file and stop")
    ap.add_argument("--smoke", action="store_true", help="2 steps an epoch, 1 epoch, in runs/bench/label_eff_smoke: checks the code paths")
    args = ap.parse_args()
    if args.smoke:
        global BENCH, RESULTS
        BENCH, RESULTS = BENCH.with_name("label_eff_smoke"), RESULTS.with_name("label_efficiency_smoke.json")
        SMOKE.append("train.max_steps_per_epoch=2")
        args.pretrain_epochs = 1
    bench = Bench(args)
    if not args.report:
        backbone = bench.pretrain() if "pretrain" in args.stages or any(s in args.stages for s in ("fractions", "hospital", "al")) else None
        if "fractions" in args.stages:
            bench.fractions(backbone)
        if "hospital" in args.stages:
            bench.hospital(backbone)
        if "al" in args.stages:
            bench.active_learning(backbone)
    print(report(bench.results, bench))


if __name__ == "__main__":
    main()
