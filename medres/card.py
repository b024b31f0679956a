"""`medres card`: a model card (Mitchell et al., "Model Cards for Model Reporting", FAT* 2019) built
only from what medres recorded — the checkpoint's metadata, the run's config.yaml, splits.csv and
metrics.jsonl, and an `evaluate` folder's metrics.json. Nothing is typed by hand, so the card cannot
drift from the model. Written as Markdown and as a self-contained HTML page (images inlined).

Both renderings come from one list of sections made of paragraphs, bullet lists, tables and images.
"""

from __future__ import annotations

import base64
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import yaml

from medres.errors import UsageError
from medres.files import atomic_write
from medres.model import load_checkpoint, sha256_of

if TYPE_CHECKING:
    from medres.run import RunDir

RUO = "Research use only — not for diagnosis or any clinical decision."
SECTIONS = ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
            "Quantitative analyses", "Monitoring", "Ethical considerations", "Caveats and recommendations")


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # ("p", text) | ("ul", [items]) | ("table", header, rows) | ("img", path, alt)

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", header, rows))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", path, alt))


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def ci(value, interval) -> str:
    if not interval or interval[0] is None:
        return fmt(value)
    return f"{fmt(value)} ({fmt(interval[0])}–{fmt(interval[1])})"


def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"python {platform.python_version()}"]
    for name in ("medres", "torch", "numpy", "pydicom", "monai", "scikit-learn"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return out


def data_counts(run: "RunDir") -> tuple[pd.DataFrame, str | None]:
    """Images per split × class (multiclass) × source (the manifest's `source` or `site` column if any),
    over the rows the run selected."""
    from medres.errors import MedresError

    splits = run.splits()
    try:
        man = run.manifest()
    except (MedresError, OSError):  # the training manifest moved or changed since: counts by split only
        return splits.groupby("split").size().rename("images").reset_index(), None
    frame = man.frame.copy()
    by = ["split"]
    if man.task == "multiclass":
        frame["class"] = [man.classes[int(i)] for i in man.targets.argmax(1)]
        by.append("class")
    source = next((c for c in ("source", "site") if c in frame.columns), None)
    if source:
        by.append(source)
    return frame.groupby(by).size().rename("images").reset_index(), source


def label_states_table(run: "RunDir") -> list[list]:
    """Per class: positive / negative / uncertain / missing rows (multilabel runs on per-class columns)."""
    sel = run.selection() or {}
    states = sel.get("label_states") or {}
    return [[c, v["positive"], v["negative"], v["uncertain"], v["missing"]] for c, v in states.items()]


def build(run: str | Path, eval_dir: str | Path | None = None) -> list[Section]:
    """The card's sections, in SECTIONS order, from the run folder and (optionally) an evaluate folder."""
    from medres.run import RunDir

    rd = RunDir.open(run)
    _, meta = load_checkpoint(rd.checkpoint)
    cfg = yaml.safe_load(rd.path("config.yaml").read_text(encoding="utf-8"))
    ev = _load_eval(eval_dir, rd.folder)
    counts, source = data_counts(rd)
    s = {t: Section(t) for t in SECTIONS}
    _model_details(s["Model details"], rd, meta, cfg)
    _intended_use(s["Intended use"], meta)
    _factors(s["Factors"], ev)
    _metrics(s["Metrics"], meta)
    _evaluation_data(s["Evaluation data"], ev)
    _training_data(s["Training data"], rd, meta, cfg, counts, source)
    _quantitative_analyses(s["Quantitative analyses"], meta, ev)
    _ethical_considerations(s["Ethical considerations"])
    _monitoring(s["Monitoring"], meta, ev)
    _caveats(s["Caveats and recommendations"], ev)
    return [s[t] for t in SECTIONS]


def _load_eval(eval_dir: str | Path | None, run: Path) -> dict | None:
    """An evaluate folder's metrics.json, or None when no folder was given."""
    if eval_dir is None:
        return None
    path = Path(eval_dir) / "metrics.json"
    if not path.is_file():
        raise UsageError(f"--eval {eval_dir}: no metrics.json (run medres evaluate --run {run} --out {eval_dir} first)")
    return json.loads(path.read_text(encoding="utf-8"))


def _model_details(d: Section, rd: "RunDir", meta, cfg: dict) -> None:
    run, ckpt = rd.folder, rd.checkpoint
    d.p(RUO)
    d.ul([
        f"Name: {cfg.get('name', run.name)}; architecture {meta.arch} (torchvision-identical ResNet50, new {len(meta.classes)}-way head), task {meta.task}",
        f"Classes: {', '.join(meta.classes)}",
        f"Input: {meta.preprocess.get('image_size')} px, {meta.preprocess.get('resize')}, {meta.in_channels} channel(s), normalisation mean {meta.mean} std {meta.std}, DICOM VOI policy {meta.preprocess.get('voi')}",
        f"Initial weights: {meta.weights_source or 'none'}" + (f" (sha256 {meta.weights_sha256})" if meta.weights_sha256 else ""),
        f"Checkpoint: model.safetensors, sha256 {sha256_of(ckpt)}; best epoch {meta.epoch}, validation macro AUROC {fmt(meta.val_auroc)}",
        f"Config sha256 {meta.config_sha256}; training manifest sha256 {meta.manifest_sha256}",
        "Software: " + ", ".join(_versions()) + f" (trained with medres {meta.medres_version}, torch {meta.torch_version})",
    ])
    if (run / "curves.png").is_file():
        d.img(run / "curves.png", "training curves")


def _intended_use(u: Section, meta) -> None:
    u.p(f"Research on {', '.join(meta.classes)} classification of chest radiographs: model development, retrospective "
        "evaluation and error analysis by researchers and hospital data teams. " + RUO)
    expect = ", ".join(f"{k} {'/'.join(v)}" for k, v in (meta.expect or {}).items())
    u.ul([
        "Out of scope: diagnosis, triage or any decision about a patient; populations, scanners and sites unlike the training data (see Training data).",
        f"Inputs the training headers cover: {expect}; files whose DICOM header contradicts this are rejected by predict." if expect else
        "The training images carried no DICOM header tags, so the header gate has no defaults: other views, body parts and modalities are not refused by header (set --expect).",
        "Images flagged out of distribution by the input gate (ood_score above its threshold) are outside the intended use." if meta.ood else
        "No OOD detector is stored: run medres calibrate to add one.",
    ])


def _factors(f: Section, ev: dict | None) -> None:
    groups = [sg["column"] for sg in (ev or {}).get("subgroups", [])]
    f.p("Relevant factors: acquisition source/site, scanner and view, patient age and sex, disease prevalence. "
        + (f"Audited on the test split by: {', '.join(groups)}." if groups else "No subgroup audit was run (medres evaluate --by COLUMN)."))


def _metrics(m: Section, meta) -> None:
    m.ul([
        "AUROC and average precision per class and macro-averaged; sensitivity, specificity, PPV, NPV and F1 at the operating points chosen on validation "
        f"({meta.threshold_method or 'default 0.5'}: " + ", ".join(f"{c} {t:.3f}" for c, t in zip(meta.classes, meta.effective_thresholds())) + ").",
        "95% confidence intervals from a patient-level bootstrap (a patient's images are resampled together).",
        f"Calibration: expected calibration error and Brier score before and after temperature scaling (T = {meta.temperature:.3f}, fitted on validation).",
        (f"Conformal prediction sets ({meta.conformal['method']}, target coverage {meta.conformal['coverage']:.2f}, calibrated on {meta.conformal['n']} validation images): "
         "empirical coverage and mean set size.") if meta.conformal else "No conformal sets stored.",
    ])


def _evaluation_data(e: Section, ev: dict | None) -> None:
    if ev:
        e.p(f"Split '{ev.get('split') or 'all'}': {ev['images']} images from {ev['patients']} patients, patient-disjoint from training and validation.")
        e.table(["class", "positives"], [[c, ev["per_class"][c]["positives"]] for c in ev["classes"]])
    else:
        e.p("No evaluation given (medres card --eval EVAL_DIR).")


def _training_data(t: Section, rd: "RunDir", meta, cfg: dict, counts: pd.DataFrame, source: str | None) -> None:
    manifest = cfg.get("data", {}).get("manifest")
    names = ", ".join(Path(m).name for m in (manifest if isinstance(manifest, list) else [manifest])) if manifest else "n/a"
    t.p(f"Manifest {names}; patients never cross splits ({cfg.get('data', {}).get('group_by', 'patient_id')}). "
        + (f"Counts by split, class and {source}:" if source else "Counts by split and class:"))
    t.table(list(counts.columns), counts.values.tolist())
    selection = rd.selection()
    if selection:
        t.p("Row selection (data.manifest, data.views, data.filter, labelled rows), step by step:")
        t.table(["step", "removed", "rows left"], [[st["step"], st["removed"], st["remaining"]] for st in selection["steps"]])
    if selection and selection.get("unlabeled"):
        u = selection["unlabeled"]
        t.p(f"Unlabelled films also used (semi-supervised, FixMatch-style pseudo-labels at confidence ≥ {u['pseudo_threshold']}): {u['films']} from "
            f"{Path(u['source']).name}, {u['ratio']} per labelled film in each step; none of them is in the validation or test split.")
    aug = _augmentation_line(cfg)
    t.p(f"Augmentation during training (train.augment): {aug}.")
    if (rd.folder / "augment.png").is_file():
        t.img(rd.folder / "augment.png", "training images beside their augmented versions")
    if str(meta.weights_source or "").endswith("backbone.safetensors"):
        t.p(f"Initial weights from self-supervised pretraining on unlabelled films: {meta.weights_source} (sha256 {meta.weights_sha256}).")
    states = label_states_table(rd)
    if states:
        uncertain = cfg.get("data", {}).get("uncertain", "ignore")
        t.p(f"Label states as the manifest gave them (uncertain policy: {uncertain}; missing labels, and uncertain ones under ignore, are masked):")
        t.table(["class", "positive", "negative", "uncertain", "missing"], states)


def _augmentation_line(cfg: dict) -> str:
    """train.augment as the run's config.yaml recorded it (true, false or a mapping; older runs' train.hflip read too)."""
    from medres.config import augment_settings, with_legacy_hflip
    from medres.errors import ConfigInvalid

    value = with_legacy_hflip(cfg.get("train", {}) or {}).get("augment", True)
    try:
        return augment_settings(value).describe()
    except (ValueError, ConfigInvalid):
        return f"not readable from config.yaml ({value!r})"


def _quantitative_analyses(q: Section, meta, ev: dict | None) -> None:
    if ev:
        _performance_tables(q, ev)
        _conformal_tables(q, ev.get("conformal"))
        _subgroup_tables(q, ev)
        if ev.get("ood"):
            o = ev["ood"]
            q.p(f"Input gate on the test split: {o['flagged']} of {ev['images']} images ({fmt(o['flagged_fraction'])}) flagged out of distribution.")
    else:
        q.p("No evaluation given.")
    if meta.ood:
        q.p(f"OOD gate: {meta.ood['method']} on penultimate features of {meta.ood['n_train']} training images; threshold {meta.ood['threshold']:.4f} "
            f"= the {meta.ood['quantile']:.0%} quantile of {meta.ood['n_val']} validation images.")


def _performance_tables(q: Section, ev: dict) -> None:
    """Per-class and macro metrics with CIs, accuracy, and calibration before/after temperature scaling."""
    keys = ("auroc", "average_precision", "sensitivity", "specificity")
    rows = [[c] + [ci(ev["per_class"][c][k], ev["per_class"][c].get(k + "_ci")) for k in keys] for c in ev["classes"]]
    rows.append(["macro"] + [ci(ev["macro"][k], ev["macro"].get(k + "_ci")) for k in keys])
    q.table(["class", "AUROC", "average precision", "sensitivity", "specificity"], rows)
    if "accuracy" in ev:
        q.p(f"Accuracy {ci(ev['accuracy'], ev.get('accuracy_ci'))}.")
    cal = ev["calibration"]
    q.table(["calibration", "ECE", "Brier"], [["before (T = 1)", fmt(cal["before"]["ece"]), fmt(cal["before"]["brier"])],
                                              [f"after (T = {cal['temperature']:.3f})", fmt(cal["after"]["ece"]), fmt(cal["after"]["brier"])]])


def _conformal_tables(q: Section, cf: dict | None) -> None:
    if not cf:
        return
    q.p(f"Conformal sets ({cf['method']}, target {cf['target']:.2f}): coverage {ci(cf['coverage'], cf.get('coverage_ci'))}, "
        f"mean set size {ci(cf['mean_set_size'], cf.get('mean_set_size_ci'))}.")
    for col, groups_ in cf.get("subgroups", {}).items():
        q.table([col, "images", "coverage", "mean set size"], [[g, v["images"], ci(v["coverage"], v.get("coverage_ci")), ci(v["mean_set_size"], v.get("mean_set_size_ci"))] for g, v in groups_.items()])


def _subgroup_tables(q: Section, ev: dict) -> None:
    for sg in ev.get("subgroups", []):
        q.table([sg["column"], "images", "patients", "macro AUROC"] + [f"{c} AUROC" for c in ev["classes"]],
                [[g, v["images"], v["patients"], ci(v["macro"]["auroc"], v["macro"].get("auroc_ci"))] + [fmt(v["per_class"][c]["auroc"]) for c in ev["classes"]] for g, v in sg["groups"].items()])
        if sg.get("predictability_auroc") is not None:
            q.p(f"{sg['column']} is predictable from the model outputs with AUROC {fmt(sg['predictability_auroc'])} (≥ 0.8 suggests a shortcut).")


def _ethical_considerations(x: Section) -> None:
    x.ul([
        "Outputs, logs and this card contain no DICOM identifiers; predict and report write none unless asked explicitly.",
        "Label noise: public chest X-ray labels are often text-mined from reports; metrics inherit that noise.",
        "Disease and acquisition source can be entangled in public data: a model can learn the source instead of the disease (see the subgroup audit and shortcut warnings).",
        "Performance on under-represented groups is unknown where they are absent from the test split.",
    ])


def _caveats(c: Section, ev: dict | None) -> None:
    warnings = (ev or {}).get("warnings", [])
    c.ul(([f"Warning from evaluate: {w}" for w in warnings] or ["evaluate raised no warnings."]) + [
        "Validate on your own site's data before drawing conclusions; conformal coverage holds only for data exchangeable with the validation split.",
        "An OOD score is a screen, not a guarantee.",
        RUO,
    ])


def _monitoring(mon: "Section", meta, ev: dict | None) -> None:
    """What scoring checks on new data (medres/shift.py, gate.py), and how well the label-free estimates
    did on the evaluated split."""
    if meta.shift:
        mon.p(f"predict and report test every folder of at least {meta.shift['min_files']} scored files against a validation reference stored in "
              f"this checkpoint ({meta.shift['n']} validation images; KS per class output, Bonferroni-corrected, and MMD on "
              f"{meta.shift['components']} principal components of the penultimate features; α = {meta.shift['alpha']}). When a shift is detected, the "
              "conformal sets and the operating points are not guaranteed for that data: OUT.shift.json and the report say so, with the estimated "
              "class priors (BBSE) and the accuracy and AUROC estimated without labels (ATC, expected AUROC).")
    else:
        mon.p("No shift reference is stored (a checkpoint older than the folder-level test): run medres calibrate to add one.")
    orient = (meta.ood or {}).get("orientation")
    if orient:
        mon.p(f"Per film, an orientation check learnt from the training images marks films that look rotated or grey-inverted "
              f"(ROTATED / INVERTED; training accuracy over the 8 transforms {fmt(orient['train_accuracy'])}).")
    est = (ev or {}).get("estimated_without_labels")
    if est:
        rows = [[f"{c} AUROC", fmt(v["estimate"]), fmt(v.get("actual"))] for c, v in est["per_class_auroc"].items()]
        if "accuracy" in est:
            rows.insert(0, ["accuracy", fmt(est["accuracy"]["estimate"]), fmt(est["accuracy"].get("actual"))])
        mon.p("On the evaluated split, the label-free estimates against the real values (how far to trust them on new data):")
        mon.table(["metric", "estimated without labels", "actual"], rows)


# --- rendering -------------------------------------------------------------------------------------
def to_markdown(sections: list[Section], out: Path) -> str:
    import os

    lines = ["# Model card", ""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if b[0] == "p":
                lines += [b[1], ""]
            elif b[0] == "ul":
                lines += [f"- {i}" for i in b[1]] + [""]
            elif b[0] == "table":
                lines += ["| " + " | ".join(map(str, b[1])) + " |", "|" + "---|" * len(b[1])]
                lines += ["| " + " | ".join(map(str, r)) + " |" for r in b[2]] + [""]
            elif b[0] == "img":
                lines += [f"![{b[2]}]({os.path.relpath(b[1], out.parent)})", ""]
    return "\n".join(lines)


def to_html(sections: list[Section]) -> str:
    """The card as one self-contained page (templates/model_card.html, autoescaped; images inlined)."""
    from medres.templates import render

    return render("model_card.html", sections=[{"title": sec.title, "blocks": [_inline(b) for b in sec.blocks]} for sec in sections])


def _inline(block: tuple) -> tuple:
    """An image block with its PNG as base64 (the page is one self-contained file); other blocks as they are."""
    if block[0] != "img":
        return block
    return ("img", base64.b64encode(Path(block[1]).read_bytes()).decode(), block[2])


def write_card(run: str | Path, out: str | Path, eval_dir: str | Path | None = None) -> tuple[Path, Path]:
    """model_card.md at `out` and the same card as a self-contained .html beside it."""
    out = Path(out)
    sections = build(run, eval_dir)
    atomic_write(out, to_markdown(sections, out))
    page = out.with_suffix(".html")
    atomic_write(page, to_html(sections))
    return out, page
