"""`medres report`: per-case Grad-CAM overlays on the original image, an index page and case pages.

Heatmaps share one absolute scale across the report (the 99th percentile of all target maps), so a
confident negative looks cold; `normalize="per-image"` only on request. Overlays are drawn on the
original image at its native aspect ratio (the ingestion geometry undoes letterbox/crop), with the
same intensity pipeline the model saw. Pages work offline (no external assets). No DICOM identifiers
are written unless `include_identifiers` is set.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medres.cam import compute_cam, find_layer, upsample
from medres.errors import IngestError, NoInputs, UsageError
from medres.files import atomic_path, atomic_write
from medres.inference import Predictor
from medres.io import PreprocessSpec, load_image
from medres.metrics import predict_labels
from medres.model import CAM_LAYER, load_checkpoint
from medres.predict import discover

log = logging.getLogger(__name__)
DISPLAY_MAX = 1024
RUO = "Research use only — not for diagnosis."


@dataclass
class Case:
    index: int
    shown: str
    full: str
    status: str = "ok"
    error: str = ""
    probs: list[float] = field(default_factory=list)
    positive: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    cams: np.ndarray | None = None  # (K, S, S) raw, model space
    record: dict | None = None
    deletion_auc: float | None = None
    insertion_auc: float | None = None

    @property
    def name(self) -> str:
        return f"case-{self.index:05d}"


def _colormap() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def overlay(grey: np.ndarray, heat: np.ndarray, cmap: np.ndarray, alpha_max: float = 0.6) -> np.ndarray:
    """grey (H, W) in [0, 1]; heat (H, W) in [0, 1] or NaN → RGB uint8; transparency follows heat."""
    base = np.repeat((np.clip(grey, 0, 1) * 255)[..., None], 3, axis=2)
    h = np.nan_to_num(heat, nan=0.0)
    colour = cmap[np.clip((h * 255).astype(int), 0, 255)].astype(np.float32)
    a = (alpha_max * np.clip(h, 0, 1))[..., None]
    return (base * (1 - a) + colour * a).astype(np.uint8)


def _display(x: np.ndarray) -> tuple[np.ndarray, float]:
    h, w = x.shape
    s = min(1.0, DISPLAY_MAX / max(h, w))
    if s < 1.0:
        img = Image.fromarray(x.astype(np.float32), mode="F").resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.float32), s
    return x, 1.0


def _save_png(path: Path, arr: np.ndarray) -> None:
    # No text chunks: PNGs carry pixels only.
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _faithfulness(predictor: Predictor, pixels: np.ndarray, heat: np.ndarray, cls: int, steps: int = 16) -> tuple[float, float]:
    """Deletion and insertion AUC (Petsiuk et al. 2018): remove/insert pixels in heatmap order
    (deleted pixels become the image mean; insertion starts from a blurred image), track p(class)."""
    from scipy.ndimage import gaussian_filter

    order = np.argsort(-heat.ravel(), kind="stable")
    n = order.size
    blurred = gaussian_filter(pixels, sigma=pixels.shape[0] / 16)
    fill = np.full_like(pixels, pixels.mean())
    dels, ins = [], []
    for k in range(steps + 1):
        idx = order[: int(round(n * k / steps))]
        d = pixels.copy().ravel()
        d[idx] = fill.ravel()[idx]
        i = blurred.copy().ravel()
        i[idx] = pixels.ravel()[idx]
        dels.append(d.reshape(pixels.shape))
        ins.append(i.reshape(pixels.shape))
    batch = torch.from_numpy(np.stack(dels + ins))
    probs = predictor.probs(predictor.logits(batch))[:, cls]
    trapz = getattr(np, "trapezoid", None) or np.trapz
    x = np.linspace(0, 1, steps + 1)
    return float(trapz(probs[: steps + 1], x)), float(trapz(probs[steps + 1 :], x))


def report(
    checkpoint: str | Path,
    inputs: list[str | Path],
    out: str | Path,
    *,
    method: str = "gradcam",
    layer: str = CAM_LAYER,
    target_class: str | None = None,
    normalize: str = "shared",
    weight_by_probability: bool = False,
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    include_identifiers: bool = False,
    dicom_sc: bool = False,
    faithfulness: bool = False,
    limit: int | None = None,
) -> dict:
    out = Path(out)
    if normalize not in ("shared", "per-image"):
        raise UsageError(f"--normalize must be shared or per-image, got {normalize!r}")
    model, meta = load_checkpoint(checkpoint)
    try:
        find_layer(model, layer)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if target_class is not None and target_class not in meta.classes:
        raise UsageError(f"--class {target_class!r} is not one of {', '.join(meta.classes)}")
    files = discover(inputs)
    if limit:
        files = files[:limit]
    if not files:
        raise NoInputs("no input files found")
    spec = PreprocessSpec.from_dict(meta.preprocess)
    predictor = Predictor.create(model, meta, device=device, precision=precision)
    thresholds = meta.effective_thresholds()
    ckpt_sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    cases = [Case(i, f.shown, f.full, error=f.error, status="error" if f.error else "ok") for i, f in enumerate(files)]

    # Pass 1: decode, score and compute raw CAMs in batches (model space, small).
    todo = [c for c in cases if c.status == "ok"]
    cells: tuple[int, int] | None = None
    for start in range(0, len(todo), batch_size):
        chunk, pix = [], []
        for case in todo[start : start + batch_size]:
            try:
                loaded = load_image(case.full, spec, display_path=case.shown)
            except IngestError as err:
                case.status, case.error = "error", err.one_line()
                continue
            case.record = loaded.record.to_dict()
            chunk.append(case)
            pix.append(loaded.pixels)
        if not chunk:
            continue
        x = torch.from_numpy(np.stack(pix))
        logits = predictor.logits(x)
        probs = predictor.probs(logits)
        labels = predict_labels(probs, meta.task, thresholds)
        targets = []
        for case, p, lab in zip(chunk, probs, labels):
            case.probs = [float(v) for v in p]
            case.positive = [int(v >= t) for v, t in zip(p, thresholds)]
            if target_class is not None:
                case.targets = [meta.classes.index(target_class)]
            elif meta.task == "multiclass":
                case.targets = [int(lab)]
            else:
                case.targets = [j for j, v in enumerate(lab) if v] or [int(np.argmax(p))]
            targets.append(case.targets)
        k = max(len(t) for t in targets)
        t = torch.tensor([tt + [-1] * (k - len(tt)) for tt in targets])
        res = compute_cam(predictor.model, predictor.prepare(x), t, layer=layer, method=method, score="log_odds" if meta.task == "multiclass" else "logit", autocast_dtype=predictor.dtype)
        maps = upsample(res.maps, spec.image_size).numpy()
        cells = cells or (int(res.maps.shape[-2]), int(res.maps.shape[-1]))
        for i, case in enumerate(chunk):
            cams = maps[i, : len(case.targets)]
            if weight_by_probability:
                cams = cams * np.array([case.probs[j] for j in case.targets])[:, None, None]
            case.cams = cams.astype(np.float32)
            if faithfulness:
                case.deletion_auc, case.insertion_auc = _faithfulness(predictor, pix[i], cams[0], case.targets[0])

    if cells and min(cells) < 7:
        log.warning("%s gives %d×%d heatmaps at %d px (each cell %d px): lesions are located to a cell at best; "
                    "a shallower layer (e.g. --layer layer3) doubles the resolution", layer, *cells, spec.image_size, spec.image_size // cells[0])
    grid = f"{cells[0]}×{cells[1]} cells" if cells else "no maps"

    # One absolute scale per class, shared by every case in the report: a class's maps are comparable
    # across cases, and a weak map stays cold instead of being stretched to full colour.
    scales: dict[int, float] = {}
    for k in range(len(meta.classes)):
        vals = [c.cams[i].ravel() for c in cases if c.cams is not None for i, t in enumerate(c.targets) if t == k]
        if vals:
            v = float(np.percentile(np.concatenate(vals), 99.5))
            scales[k] = v if v > 0 else 1.0
    cmap = _colormap()
    (out / "cases").mkdir(parents=True, exist_ok=True)
    for k, scale in scales.items():
        _write_colorbar(out / f"colorbar_{k}.png", meta.classes[k], scale, normalize, weight_by_probability)

    # Pass 2: overlays on the original images, pages.
    for case in cases:
        if case.status != "ok" or case.cams is None:
            continue
        loaded = load_image(case.full, spec, display_path=case.shown, keep_original=True)
        geom = loaded.record.geometry
        grey, s = _display(loaded.original)
        _save_png(out / "cases" / f"{case.name}_image.png", (grey * 255).astype(np.uint8))
        thumb = Image.fromarray((grey * 255).astype(np.uint8))
        thumb.thumbnail((96, 96))
        _save_png(out / "cases" / f"{case.name}_thumb.png", np.asarray(thumb))
        for k, cls in enumerate(case.targets):
            cam = case.cams[k]
            heat = cam / (cam.max() if normalize == "per-image" and cam.max() > 0 else scales[cls])
            native = geom.to_original(np.clip(heat, 0, 1))
            if s < 1.0:
                native = np.asarray(Image.fromarray(np.nan_to_num(native, nan=0.0).astype(np.float32), mode="F").resize((grey.shape[1], grey.shape[0]), Image.Resampling.BILINEAR))
            _save_png(out / "cases" / f"{case.name}_cam_{cls}.png", overlay(grey, native, cmap))
            if dicom_sc and loaded.record.format == "dicom":
                from medres.dicom_out import write_secondary_capture

                write_secondary_capture(Path(case.full), overlay(grey, native, cmap), out / "cases" / f"{case.name}_cam_{cls}.dcm", include_identifiers=include_identifiers, description=f"medres Grad-CAM {meta.classes[cls]}")
        atomic_write(out / "cases" / f"{case.name}.html", _case_html(case, meta, thresholds, ckpt_sha, method, f"{layer} ({grid})", normalize, scales))
    atomic_write(out / "index.html", _index_html(cases, meta, thresholds, method, f"{layer} ({grid})", normalize, scales, faithfulness))
    summary = {
        "cases": len(cases),
        "ok": sum(c.status == "ok" for c in cases),
        "failed": sum(c.status != "ok" for c in cases),
        "scales": {meta.classes[k]: v for k, v in scales.items()},
        "normalize": normalize,
        "method": method,
        "layer": layer,
        "map_cells": list(cells) if cells else None,
    }
    if faithfulness:
        d = [c.deletion_auc for c in cases if c.deletion_auc is not None]
        i = [c.insertion_auc for c in cases if c.insertion_auc is not None]
        summary["mean_deletion_auc"] = float(np.mean(d)) if d else None
        summary["mean_insertion_auc"] = float(np.mean(i)) if i else None
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _write_colorbar(path: Path, class_name: str, scale: float, normalize: str, weighted: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 0.9))
    ax.imshow(np.linspace(0, 1, 256)[None, :], aspect="auto", cmap="inferno", extent=(0, 1, 0, 1))
    ax.set_yticks([])
    if normalize == "per-image":
        ax.set_xlabel(f"Grad-CAM for {class_name}, scaled per image (each image's maximum = 1): not comparable across cases")
    else:
        what = "probability-weighted Grad-CAM" if weighted else "Grad-CAM"
        ax.set_xticks([0, 0.5, 1], ["0", f"{scale / 2:.3g}", f"≥{scale:.3g}"])
        ax.set_xlabel(f"{what} for {class_name}: one absolute scale for every case in this report")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


_CSS = "body{font-family:system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}th{cursor:pointer;background:#f4f4f4}.ruo{background:#fee;padding:.5em;border:1px solid #c99}.error{color:#a00}img.big{max-width:46vw;margin-right:1em}"
_SORT_JS = """<script>
document.querySelectorAll('th').forEach(function(th,col){th.addEventListener('click',function(){
var tb=th.closest('table').tBodies[0];var rows=Array.from(tb.rows);var asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
rows.sort(function(a,b){var x=a.cells[col].dataset.v||a.cells[col].textContent,y=b.cells[col].dataset.v||b.cells[col].textContent;
var nx=parseFloat(x),ny=parseFloat(y);var r=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?r:-r;});
rows.forEach(function(r){tb.appendChild(r);});});});
</script>"""


def _index_html(cases: list[Case], meta, thresholds, method, layer, normalize, scales, faithfulness) -> str:
    e = html.escape
    head = "<tr><th>case</th><th>file</th><th>image</th><th>status</th><th>prediction</th>" + "".join(f"<th>p({e(c)})</th>" for c in meta.classes)
    head += "<th>deletion AUC</th><th>insertion AUC</th>" if faithfulness else ""
    head += "</tr>"
    rows = []
    for c in cases:
        if c.status != "ok":
            rows.append(f"<tr><td>{c.name}</td><td>{e(c.shown)}</td><td></td><td class=error>error</td><td colspan={len(meta.classes) + 1 + (2 if faithfulness else 0)} class=error>{e(c.error)}</td></tr>")
            continue
        pred = ", ".join(meta.classes[t] for t in c.targets) if meta.task == "multilabel" else meta.classes[c.targets[0]]
        cells = "".join(f"<td data-v={p:.6f}>{p:.3f}{' ✔' if pos else ''}</td>" for p, pos in zip(c.probs, c.positive))
        faith = f"<td>{c.deletion_auc:.3f}</td><td>{c.insertion_auc:.3f}</td>" if faithfulness and c.deletion_auc is not None else ""
        rows.append(f'<tr><td><a href="cases/{c.name}.html">{c.name}</a></td><td>{e(c.shown)}</td><td><img src="cases/{c.name}_thumb.png" alt="thumbnail"></td><td>ok</td><td>{e(pred)}</td>{cells}{faith}</tr>')
    summary = ""
    if faithfulness:
        d = [c.deletion_auc for c in cases if c.deletion_auc is not None]
        i = [c.insertion_auc for c in cases if c.insertion_auc is not None]
        if d:
            summary = f"<p>Faithfulness: mean deletion AUC {np.mean(d):.3f} (lower is better), mean insertion AUC {np.mean(i):.3f} (higher is better).</p>"
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>medres report</title><style>{_CSS}</style></head><body>
<h1>medres Grad-CAM report</h1><p class=ruo>{RUO}</p>
<p>{len(cases)} cases · method {e(method)} on {e(layer)} · scale: {e(normalize)} · ✔ = above the operating threshold</p>
<p>{''.join(f'<img src="colorbar_{k}.png" alt="colour scale for {e(meta.classes[k])}"> ' for k in scales)}</p>{summary}
<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>{_SORT_JS}</body></html>"""


def _case_html(case: Case, meta, thresholds, ckpt_sha, method, layer, normalize, scales) -> str:
    e = html.escape
    probs = "".join(f"<tr><td>{e(c)}</td><td>{p:.3f}</td><td>{t:.3f}</td><td>{'positive' if pos else ''}</td></tr>" for c, p, t, pos in zip(meta.classes, case.probs, thresholds, case.positive))
    overlays = "".join(f'<figure><img class=big src="{case.name}_cam_{k}.png" alt="Grad-CAM {e(meta.classes[k])}"><figcaption>{e(method)} for {e(meta.classes[k])}<br><img src="../colorbar_{k}.png" alt="colour scale"></figcaption></figure>' for k in case.targets)
    rec = case.record or {}
    steps = "".join(f"<li>{e(s)}</li>" for s in rec.get("steps", []))
    warns = "".join(f"<li>{e(s)}</li>" for s in rec.get("warnings", [])) or "<li>none</li>"
    info = {k: rec.get(k) for k in ("format", "modality", "photometric", "bits_stored", "bits_allocated", "transfer_syntax", "sop_class")}
    info_rows = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in info.items() if v is not None)
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>{case.name}</title><style>{_CSS}</style></head><body>
<p><a href="../index.html">← all cases</a></p><h1>{case.name}: {e(case.shown)}</h1><p class=ruo>{RUO}</p>
<figure><img class=big src="{case.name}_image.png" alt="image"><figcaption>image as the model saw it (native aspect ratio)</figcaption></figure>{overlays}
<h2>Probabilities</h2><table><tr><th>class</th><th>probability</th><th>threshold</th><th></th></tr>{probs}</table>
<h2>Ingestion record</h2><table>{info_rows}</table><ol>{steps}</ol><p>Warnings:</p><ul>{warns}</ul>
<h2>Model</h2><p>{e(meta.arch)} · medres {e(meta.medres_version)} · checkpoint sha256 <code>{ckpt_sha}</code> · calibration temperature {meta.temperature:.3f} · heatmap {e(method)} on {e(layer)}, {e(normalize)} scale ({e(", ".join(f"{meta.classes[k]}: 1.0 = {v:.4g}" for k, v in scales.items()))})</p>
</body></html>"""
