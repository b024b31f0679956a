"""Plots (matplotlib, headless): for evaluation, ROC and PR per class with the operating point,
reliability diagram before/after calibration, confusion matrix and training curves; for reports, the
heatmap colour bar."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from medres.files import atomic_path  # noqa: E402
from medres.metrics import binary_at, confusion, reliability_curve  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": "medres"})
    plt.close(fig)


def write_plots(out: Path, y: np.ndarray, p_raw: np.ndarray, p_cal: np.ndarray, meta, thresholds: list[float]) -> list[str]:
    names = []
    fig_roc, ax_roc = plt.subplots(figsize=(5, 5))
    fig_pr, ax_pr = plt.subplots(figsize=(5, 5))
    for j, c in enumerate(meta.classes):
        yj, pj = y[:, j], p_cal[:, j]
        if not 0 < yj.sum() < len(yj):
            continue
        fpr, tpr, _ = roc_curve(yj, pj)
        prec, rec, _ = precision_recall_curve(yj, pj)
        op = binary_at(yj, pj, thresholds[j])
        (line,) = ax_roc.plot(fpr, tpr, label=c)
        ax_roc.plot(1 - op["specificity"], op["sensitivity"], "o", color=line.get_color())
        (line2,) = ax_pr.plot(rec, prec, label=c)
        if not np.isnan(op["ppv"]):
            ax_pr.plot(op["sensitivity"], op["ppv"], "o", color=line2.get_color())
    ax_roc.plot([0, 1], [0, 1], ":", color="grey")
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (dot: operating point)")
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall (dot: operating point)")
    for ax, where in ((ax_roc, "lower right"), (ax_pr, "lower left")):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where)
        else:  # no class has both positives and negatives here: say so instead of an empty legend
            ax.text(0.5, 0.5, "no class with both positive and negative cases", ha="center", va="center", transform=ax.transAxes)
    _save(fig_roc, out / "roc.png")
    _save(fig_pr, out / "pr.png")
    names += ["roc.png", "pr.png"]

    fig, ax = plt.subplots(figsize=(5, 5))
    for label, p in (("before calibration", p_raw), ("after calibration", p_cal)):
        if len(p):
            conf, acc, _ = reliability_curve(y, p, meta.task)
            ax.plot(conf, acc, "o-", label=label)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="predicted probability (equal-mass bins)", ylabel="observed frequency", title="Reliability")
    ax.legend(loc="upper left")
    _save(fig, out / "reliability.png")
    names.append("reliability.png")

    if meta.task == "multiclass" and len(y):
        m = confusion(y.argmax(1), p_cal.argmax(1), len(meta.classes))
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.imshow(m, cmap="Blues")
        for i in range(m.shape[0]):
            for k in range(m.shape[1]):
                ax.text(k, i, str(m[i, k]), ha="center", va="center", color="black")
        ax.set_xticks(range(len(meta.classes)), meta.classes, rotation=30)
        ax.set_yticks(range(len(meta.classes)), meta.classes)
        ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
        _save(fig, out / "confusion.png")
        names.append("confusion.png")
    return names


def write_curves(run: Path) -> Path | None:
    """`curves.png` in a run folder from its metrics.jsonl: training and validation loss, validation
    macro AUROC per epoch, the frozen (linear-probe) epochs shaded."""
    import json

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return None
    epochs: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            e = json.loads(line)
            epochs[int(e["epoch"])] = e  # a resumed run appends the same epoch again: the last one counts
    if not epochs:
        return None
    rows = [epochs[k] for k in sorted(epochs)]
    x = [e["epoch"] for e in rows]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.8))
    frozen = [e["epoch"] for e in rows if e.get("frozen")]
    for ax in (ax_loss, ax_auc):
        if frozen:
            ax.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, color="#ddd", label="frozen backbone (linear probe)")
        ax.set_xlabel("epoch")
    ax_loss.plot(x, [e.get("train_loss") for e in rows], "o-", label="train loss")
    if any("val_loss" in e for e in rows):
        ax_loss.plot(x, [e.get("val_loss", np.nan) for e in rows], "s-", label="validation loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    auc = [e.get("val_macro_auroc", np.nan) for e in rows]
    ax_auc.plot(x, [np.nan if v is None else v for v in auc], "o-", color="C2", label="validation macro AUROC")
    ax_auc.set_ylabel("validation macro AUROC")
    ax_auc.set_ylim(0.4, 1.0)
    ax_auc.legend(fontsize=8, loc="lower right")
    out = Path(run) / "curves.png"
    _save(fig, out)
    return out


def write_augment_grid(path: Path, originals: np.ndarray, augmented: np.ndarray, caption: str) -> Path:
    """Originals (N, H, W) beside their augmented versions, in pairs, grey in [0, 1]; `caption` titles it.
    One montage in one axes (32 small axes cost ~1 s of layout per training run, in every test too)."""
    n, h, w = originals.shape
    cols = 4
    rows = max(1, math.ceil(n / cols))
    gap = max(2, w // 16)
    left = [(2 * c + k) * (w + gap) + c * 2 * gap for c in range(cols) for k in (0, 1)]  # pairs set apart
    montage = np.ones((rows * (h + gap) - gap, left[-1] + w), np.float32)  # white between tiles
    for i in range(n):
        r, c = divmod(i, cols)
        for k, img in enumerate((originals[i], augmented[i])):
            y0, x0 = r * (h + gap), left[2 * c + k]
            montage[y0 : y0 + h, x0 : x0 + w] = img
    fig, ax = plt.subplots(figsize=(2 * cols * 1.3, rows * 1.3 + 0.5))
    ax.imshow(montage, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([x0 + w / 2 - 0.5 for x0 in left], ["original", "augmented"] * cols)
    ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False, length=0, labelsize=6)
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(textwrap.fill(caption, 110), fontsize=7)
    _save(fig, path)
    return path


def write_colorbar(path: Path, class_name: str, scale: float, *, quantity: str, per_image: bool) -> None:
    """The report's colour bar for one class's heatmaps (inferno, as the overlays): `quantity` is what
    the map shows ("Grad-CAM", "probability-weighted score drop when occluded"); on the shared scale the
    ticks are in its units (`scale` = full colour), per image they are not comparable across cases."""
    fig, ax = plt.subplots(figsize=(4.5, 0.9))
    ax.imshow(np.linspace(0, 1, 256)[None, :], aspect="auto", cmap="inferno", extent=(0, 1, 0, 1))
    ax.set_yticks([])
    if per_image:
        ax.set_xlabel(f"{quantity} for {class_name}, scaled per image (each image's maximum = 1): not comparable across cases")
    else:
        ax.set_xticks([0, 0.5, 1], ["0", f"{scale / 2:.3g}", f"≥{scale:.3g}"])
        ax.set_xlabel(f"{quantity} for {class_name}: one absolute scale for every case in this report")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_lr_find(path: Path, result: dict) -> None:
    """The learning-rate range test: loss and smoothed loss against the LR (log axis), the suggestion
    marked, the rule that chose it in the title."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"], color="#bbb", lw=1, label="loss")
    ax.plot(result["lrs"], result["smoothed"], color="C0", label=f"smoothed (beta {result['beta']})")
    ax.axvline(result["suggestion"], color="C3", ls="--", label=f"suggestion {result['suggestion']:.3g}")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (train.lr)", ylabel="training loss")
    ax.set_title(f"LR range test ({result['stage']})\nsuggestion: {result['rule']}", fontsize=9)
    low = min(min(result["losses"]), min(result["smoothed"]))
    top = result["smoothed"][0] * 2.5  # beyond it the divergence would squash the curve
    if top > low * 0.9:
        ax.set_ylim(low * 0.9, top)
    ax.legend(fontsize=8)
    _save(fig, path)
