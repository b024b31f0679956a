"""`medres report`: per-case Grad-CAM overlays on the original image, an index page and case pages.

Two rooms: `medres.explain` scores and explains the inputs (probabilities, gate verdicts, raw maps per
case); this module orchestrates the run and renders what comes back (overlays, pages, summary.json;
the colour bars through `medres.plots`).

Heatmaps share one absolute scale across the report (the 99th percentile of all target maps), so a
confident negative looks cold; `normalize="per-image"` only on request. Overlays are drawn on the
original image at its native aspect ratio (the ingestion geometry undoes letterbox/crop), with the
same intensity pipeline the model saw. Pages work offline (no external assets). No DICOM identifiers
are written unless `include_identifiers` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from medres.cam import cam_method, gradient_methods
from medres.errors import NoInputs, UsageError
from medres.explain import Case, Options, check_options, manifest_truth, score_and_explain
from medres.gate import flagged
from medres.shift import monitor_for, summary_line
from medres.files import atomic_path, atomic_write
from medres.io import PreprocessSpec
from medres.model import CAM_LAYER, load_checkpoint
from medres.scoring import default_workers, discover

__all__ = ["Case", "heat_layer", "manifest_truth", "overlay", "report", "shared_scale", "shared_scales"]  # Case, manifest_truth: from medres.explain

log = logging.getLogger(__name__)
PNG_LEVEL = 1
RUO = "Research use only — not for diagnosis."


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


def _save_png(path: Path, arr: np.ndarray) -> None:
    """No text chunks: PNGs carry pixels only. zlib level 1: PNG encoding was 41% of a report's time at
    the default level 6; level 1 encodes 2.5–4× faster for 15–65% more bytes (docs/benchmarks.md)."""
    with atomic_path(path, durable=False) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=PNG_LEVEL)


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
    workers: int | None = None,
    expect: list[str] | None = None,
    gate: str = "flag",
) -> dict:
    """Score and explain every input; write index.html, cases/*.html|png (+ Secondary Capture DICOMs
    with `dicom_sc`) and summary.json under `out`. Returns the summary."""
    out = Path(out)
    model, meta = load_checkpoint(checkpoint)
    check_options(model, meta, method=method, layer=layer, target_class=target_class, normalize=normalize)
    files = discover(inputs)[: limit or None]
    if not files:
        raise NoInputs(f"no input files found in {', '.join(str(i) for i in inputs)} (hidden and sidecar files such as .csv/.json/.txt are skipped)")
    from medres.predict import gate_of
    from medres.scoring import scorer_for

    if precision == "int8" and not (cam_method(method).gradient and layer == CAM_LAYER):
        raise UsageError(f"--precision int8 explains with {' or '.join(gradient_methods())} on {CAM_LAYER} (the int8 model returns those maps); got --method {method} --layer {layer}")
    predictor = scorer_for(checkpoint, model, meta, device=device, precision=precision)
    expectations, detector = gate_of(checkpoint, meta, expect=expect, gate=gate, scorer=predictor)
    opts = Options(method, layer, target_class, normalize, weight_by_probability, faithfulness, include_identifiers, dicom_sc, gate, expectations, detector)
    truth = manifest_truth(inputs, meta)
    cases = [Case(i, f.shown, f.full, truth=truth.get(f.shown)) for i, f in enumerate(files)]
    (out / "cases").mkdir(parents=True, exist_ok=True)
    monitor = monitor_for(checkpoint, meta, predictor)
    cells = score_and_explain(cases, files, predictor, opts, batch_size=batch_size, workers=default_workers() if workers is None else workers, model=model,
                              monitor=monitor, on_image=partial(_write_image, out))
    shift = monitor.result() if monitor is not None else None
    if shift is not None:
        atomic_write(out / "shift.json", json.dumps(shift, indent=2))
        if shift.get("detected"):
            log.warning(shift["warning"])
    return _render(cases, out, checkpoint, meta, opts, cells, shift)


def _write_image(out: Path, case: Case, display: np.ndarray) -> None:
    """The display image and a provisional thumbnail (the first overlay replaces it), as decoded."""
    grey = (np.clip(display, 0, 1) * 255).astype(np.uint8)
    _save_png(out / "cases" / f"{case.name}_image.png", grey)
    thumb = Image.fromarray(grey)
    thumb.thumbnail((96, 96))
    _save_png(out / "cases" / f"{case.name}_thumb.png", np.asarray(thumb))


def _render(cases: list[Case], out: Path, checkpoint: str | Path, meta, opts: Options, cells: tuple[int, int] | None, shift: dict | None) -> dict:
    """Colour bars, overlays, case pages, the index page and summary.json from the explained cases."""
    method, normalize = opts.method, opts.normalize
    spec = PreprocessSpec.from_dict(meta.preprocess)
    if cells and min(cells) < 7 and cam_method(method).gradient:
        shallower = {"layer4": "layer3", "layer3": "layer2"}.get(opts.layer)
        log.warning("%s gives %d×%d heatmaps at %d px (each cell %d px): lesions are located to a cell at best%s", opts.layer, *cells, spec.image_size,
                    spec.image_size // cells[0], f"; --layer {shallower} doubles the resolution" if shallower else "")
    where = cam_method(method).where(opts.layer)
    grid = f"{where} ({cells[0]}×{cells[1]} cells)" if cells else f"{where} (no maps)"
    scales = shared_scales(cases, len(meta.classes))
    _write_colorbars(out, meta, scales, opts)
    ckpt_sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    pages = [c for c in cases if c.status == "ok" and c.cams is not None]
    for i, case in enumerate(pages):  # prev/next in input order; the index's script passes its own order
        _write_overlays(case, out, scales, opts, meta)
        prev, nxt = (pages[i - 1].name if i else None), (pages[i + 1].name if i + 1 < len(pages) else None)
        atomic_write(out / "cases" / f"{case.name}.html", _case_html(case, meta, meta.effective_thresholds(), ckpt_sha, method, grid, normalize, scales, prev, nxt))
    atomic_write(out / "index.html", _index_html(cases, meta, meta.effective_thresholds(), method, grid, normalize, scales, opts.faithfulness, shift))
    summary = _summary(cases, meta, scales, opts, cells)
    summary["shift"] = shift
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _write_colorbars(out: Path, meta, scales: dict[int, float], opts: Options) -> None:
    """colorbar_k.png per mapped class, labelled with what the method's maps measure."""
    from medres.plots import write_colorbar

    spec = cam_method(opts.method)
    per_image = opts.normalize == "per-image"
    quantity = spec.title if per_image else f"probability-weighted {spec.measures}" if opts.weight_by_probability else spec.measures
    for k, scale in scales.items():
        write_colorbar(out / f"colorbar_{k}.png", meta.classes[k], scale, quantity=quantity, per_image=per_image)


def shared_scales(cases: list[Case], n_classes: int) -> dict[int, float]:
    """One absolute scale per class, shared by every case in the report: the 99.5th percentile of that
    class's maps. A class's maps are comparable across cases, and a weak map stays cold instead of
    being stretched to full colour."""
    scales: dict[int, float] = {}
    for k in range(n_classes):
        vals = [c.cams[i] for c in cases if c.cams is not None for i, t in enumerate(c.targets) if t == k]
        if vals:
            scales[k] = shared_scale(vals)
    return scales


def shared_scale(maps: list[np.ndarray]) -> float:
    """The absolute scale of one class's maps: their 99.5th percentile (1.0 when that is not positive)."""
    v = float(np.percentile(np.concatenate([m.ravel() for m in maps]), 99.5))
    return v if v > 0 else 1.0


def _write_overlays(case: Case, out: Path, scales: dict[int, float], opts: Options, meta) -> None:
    """Each target's map, back on the original's grid (geometry undoes letterbox/crop): a transparent
    heat layer per class for the case page's overlay (`_heat_k.png`), and for the explained classes
    the overlay drawn into the image (`_cam_k.png`, also the thumbnail and the DICOM SC)."""
    cmap = _colormap()
    grey = np.asarray(Image.open(out / "cases" / f"{case.name}_image.png"), dtype=np.float32) / 255
    for k, cls in enumerate(case.targets):
        cam = case.cams[k]
        heat = cam / (cam.max() if opts.normalize == "per-image" and cam.max() > 0 else scales[cls])
        native = case.geometry.to_original(np.clip(heat, 0, 1))
        if native.shape != grey.shape:  # the display image is downscaled (or a decoder returned another size)
            native = np.asarray(Image.fromarray(np.nan_to_num(native, nan=0.0).astype(np.float32), mode="F").resize((grey.shape[1], grey.shape[0]), Image.Resampling.BILINEAR))
        _save_png(out / "cases" / f"{case.name}_heat_{cls}.png", heat_layer(native, cmap))
        if k >= case.explained:
            continue
        image = overlay(grey, native, cmap)
        _save_png(out / "cases" / f"{case.name}_cam_{cls}.png", image)
        if k == 0:
            thumb = Image.fromarray(image)
            thumb.thumbnail((96, 96))
            _save_png(out / "cases" / f"{case.name}_thumb.png", np.asarray(thumb))
        if opts.dicom_sc and case.record and case.record.get("format") == "dicom":
            from medres.dicom_out import write_secondary_capture

            write_secondary_capture(Path(case.full), image, out / "cases" / f"{case.name}_cam_{cls}.dcm", include_identifiers=opts.include_identifiers, description=f"medres Grad-CAM {meta.classes[cls]}")


def heat_layer(heat: np.ndarray, cmap: np.ndarray) -> np.ndarray:
    """(H, W) heat in [0, 1] or NaN → RGBA uint8: the colour map, opaque where hot, clear where cold
    or unseen; the page's opacity slider scales it."""
    h = np.clip(np.nan_to_num(heat, nan=0.0), 0, 1)
    rgb = cmap[(h * 255).astype(int)]
    alpha = (np.sqrt(h) * 255).astype(np.uint8)  # sqrt: a faint map stays visible at full opacity
    return np.dstack([rgb, alpha])


def _summary(cases: list[Case], meta, scales: dict[int, float], opts: Options, cells) -> dict:
    summary = {
        "cases": len(cases),
        "ok": sum(c.status == "ok" for c in cases),
        "failed": sum(c.status == "error" for c in cases),
        "rejected": sum(c.status == "rejected" for c in cases),
        "flagged_out_of_distribution": sum(c.in_distribution is False for c in cases),
        "ood_threshold": opts.detector.threshold if opts.detector is not None else None,
        "scales": {meta.classes[k]: v for k, v in scales.items()},
        "normalize": opts.normalize,
        "method": opts.method,
        "layer": opts.layer,
        "map_cells": list(cells) if cells else None,
    }
    if opts.faithfulness:
        d = [c.deletion_auc for c in cases if c.deletion_auc is not None]
        i = [c.insertion_auc for c in cases if c.insertion_auc is not None]
        summary["mean_deletion_auc"] = float(np.mean(d)) if d else None
        summary["mean_insertion_auc"] = float(np.mean(i)) if i else None
    return summary


def _index_rows(cases: list[Case], meta) -> list[dict]:
    """What the index page's script sorts, filters and pages: one small dict per case."""
    rows = []
    for c in cases:
        r = {"name": c.name, "file": c.shown, "status": c.status, "view": c.header.get("view", ""), "truth": c.truth}
        if c.status != "ok":
            code = c.error[1 : c.error.index("]")] if c.error.startswith("[") and "]" in c.error else ""
            r.update(code=code, message=c.error)
        else:
            r.update(probs=[round(v, 6) for v in c.probs], pos=c.positive, pred=c.predicted, set=c.prediction_set, ood=c.ood_score,
                     flag=flagged(c.in_distribution, c.orientation), page=f"cases/{c.name}.html",
                     thumb=f"cases/{c.name}_thumb.png")
            if c.deletion_auc is not None:
                r.update(deletion=round(c.deletion_auc, 4), insertion=round(c.insertion_auc, 4))
        rows.append(r)
    return rows


def _index_html(cases: list[Case], meta, thresholds, method, layer, normalize, scales, faithfulness, shift: dict | None = None) -> str:
    from medres.templates import render

    summary = None
    if faithfulness:
        d = [c.deletion_auc for c in cases if c.deletion_auc is not None]
        i = [c.insertion_auc for c in cases if c.insertion_auc is not None]
        summary = (float(np.mean(d)), float(np.mean(i))) if d else None
    data = {"classes": meta.classes, "task": meta.task, "thresholds": thresholds, "rows": _index_rows(cases, meta),
            "hasTruth": any(c.truth is not None for c in cases), "conformal": bool(meta.conformal), "ood": bool(meta.ood), "faithfulness": faithfulness}
    return render("report_index.html", ruo=RUO, n=len(cases), classes=meta.classes, method=method, layer=layer, normalize=normalize,
                  scales=scales, faithfulness_summary=summary, conformal=meta.conformal, ood=meta.ood, data=data,
                  counts={s: sum(c.status == s for c in cases) for s in ("ok", "error", "rejected")}, flagged=sum(c.in_distribution is False for c in cases),
                  shift=shift, shift_line=summary_line(shift) if shift else None)


def _case_html(case: Case, meta, thresholds, ckpt_sha, method, layer, normalize, scales, prev: str | None, nxt: str | None) -> str:
    from medres.templates import render

    record = case.record or {}
    info = {k: record.get(k) for k in ("format", "modality", "body_part", "view", "laterality", "photometric", "bits_stored", "bits_allocated", "transfer_syntax", "sop_class")}
    scale_text = ", ".join(f"{meta.classes[k]}: 1.0 = {v:.4g}" for k, v in scales.items())
    g = case.geometry
    maps = [{"k": k, "name": meta.classes[k], "explained": i < case.explained} for i, k in enumerate(case.targets)]
    return render("report_case.html", ruo=RUO, case=case, classes=meta.classes, thresholds=thresholds, record=record, info=info, maps=maps,
                  meta=meta, ckpt_sha=ckpt_sha, method=method, layer=layer, normalize=normalize, scale_text=scale_text, zip=zip,
                  prev=prev, next=nxt, predicted=[meta.classes[k] for k in case.predicted], truth=[meta.classes[j] for j in case.truth] if case.truth is not None else None,
                  size=(g.original_width, g.original_height) if g else None)
