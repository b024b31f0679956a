"""`medres report`: per-case Grad-CAM overlays on the original image, an index page and case pages.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medres import conformal
from medres.cam import CamResult, cam_from_features, compute_cam, find_layer, occlusion_maps, upsample
from medres.errors import NoInputs, UsageError
from medres.gate import flagged, verdicts
from medres.shift import monitor_for, summary_line
from medres.files import atomic_path, atomic_write
from medres.inference import Predictor
from medres.onnx import OnnxPredictor
from medres.io import Geometry, PreprocessSpec
from medres.metrics import predict_labels
from medres.model import CAM_LAYER, load_checkpoint
from medres.scoring import ScoredBatch, default_workers, discover, scored_batches

log = logging.getLogger(__name__)
DISPLAY_MAX = 1024
PNG_LEVEL = 1
ALL_MAPS_UP_TO = 8  # classes: up to this many, the case page offers a map for every class
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
    geometry: Geometry | None = None  # model space → original image
    deletion_auc: float | None = None
    insertion_auc: float | None = None
    header: dict = field(default_factory=dict)  # source_format, modality, body_part, view, laterality
    ood_score: float | None = None
    in_distribution: bool | None = None  # None: the checkpoint has no OOD detector
    orientation: str = ""  # what way up the film looks (gate.OrientationCheck); "" when not checked
    prediction_set: list[str] = field(default_factory=list)
    explained: int = 0  # the first `explained` targets are the prediction (or --class); the rest: other classes
    predicted: list[int] = field(default_factory=list)  # the model's call at the stored operating points
    truth: list[int] | None = None  # class indices of the ground truth when the input is a labelled manifest

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


def _save_png(path: Path, arr: np.ndarray) -> None:
    """No text chunks: PNGs carry pixels only. zlib level 1: PNG encoding was 41% of a report's time at
    the default level 6; level 1 encodes 2.5–4× faster for 15–65% more bytes (docs/benchmarks.md)."""
    with atomic_path(path, durable=False) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=PNG_LEVEL)


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
    workers: int | None = None,
    expect: list[str] | None = None,
    gate: str = "flag",
) -> dict:
    """Score and explain every input; write index.html, cases/*.html|png (+ Secondary Capture DICOMs
    with `dicom_sc`) and summary.json under `out`. Returns the summary."""
    out = Path(out)
    model, meta = load_checkpoint(checkpoint)
    _check_options(model, meta, layer=layer, target_class=target_class, normalize=normalize)
    files = discover(inputs)[: limit or None]
    if not files:
        raise NoInputs(f"no input files found in {', '.join(str(i) for i in inputs)} (hidden and sidecar files such as .csv/.json/.txt are skipped)")
    from medres.predict import gate_of
    from medres.scoring import scorer_for

    if precision == "int8" and (method == "occlusion" or layer != CAM_LAYER):
        raise UsageError(f"--precision int8 explains with gradcam or gradcam++ on {CAM_LAYER} (the int8 model returns those maps); got --method {method} --layer {layer}")
    predictor = scorer_for(checkpoint, model, meta, device=device, precision=precision)
    expectations, detector = gate_of(checkpoint, meta, expect=expect, gate=gate, scorer=predictor)
    opts = _Options(method, layer, target_class, normalize, weight_by_probability, faithfulness, include_identifiers, dicom_sc, gate, expectations, detector)
    truth = manifest_truth(inputs, meta)
    cases = [Case(i, f.shown, f.full, truth=truth.get(f.shown)) for i, f in enumerate(files)]
    (out / "cases").mkdir(parents=True, exist_ok=True)
    monitor = monitor_for(checkpoint, meta, predictor)
    cells = _score_and_explain(cases, files, predictor, out, opts, batch_size=batch_size, workers=default_workers() if workers is None else workers, model=model,
                               monitor=monitor)
    shift = monitor.result() if monitor is not None else None
    if shift is not None:
        atomic_write(out / "shift.json", json.dumps(shift, indent=2))
        if shift.get("detected"):
            log.warning(shift["warning"])
    spec = PreprocessSpec.from_dict(meta.preprocess)
    if cells and min(cells) < 7 and method != "occlusion":
        shallower = {"layer4": "layer3", "layer3": "layer2"}.get(layer)
        log.warning("%s gives %d×%d heatmaps at %d px (each cell %d px): lesions are located to a cell at best%s", layer, *cells, spec.image_size,
                    spec.image_size // cells[0], f"; --layer {shallower} doubles the resolution" if shallower else "")
    where = "occlusion patches" if method == "occlusion" else layer
    grid = f"{where} ({cells[0]}×{cells[1]} cells)" if cells else f"{where} (no maps)"
    scales = shared_scales(cases, len(meta.classes))
    for k, scale in scales.items():
        _write_colorbar(out / f"colorbar_{k}.png", meta.classes[k], scale, normalize, weight_by_probability, method)
    ckpt_sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    pages = [c for c in cases if c.status == "ok" and c.cams is not None]
    for i, case in enumerate(pages):  # prev/next in input order; the index's script passes its own order
        _write_overlays(case, out, scales, opts, meta)
        prev, nxt = (pages[i - 1].name if i else None), (pages[i + 1].name if i + 1 < len(pages) else None)
        atomic_write(out / "cases" / f"{case.name}.html", _case_html(case, meta, meta.effective_thresholds(), ckpt_sha, method, grid, normalize, scales, prev, nxt))
    atomic_write(out / "index.html", _index_html(cases, meta, meta.effective_thresholds(), method, grid, normalize, scales, faithfulness, shift))
    summary = _summary(cases, meta, scales, opts, cells)
    summary["shift"] = shift
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return summary


@dataclass(frozen=True)
class _Options:
    method: str
    layer: str
    target_class: str | None
    normalize: str
    weight_by_probability: bool
    faithfulness: bool
    include_identifiers: bool
    dicom_sc: bool
    gate: str = "flag"
    expect: dict | None = None
    detector: object = None  # gate.OodDetector or None


def _check_options(model, meta, *, layer: str, target_class: str | None, normalize: str) -> None:
    if normalize not in ("shared", "per-image"):
        raise UsageError(f"--normalize must be shared or per-image, got {normalize!r}")
    try:
        find_layer(model, layer)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if target_class is not None and target_class not in meta.classes:
        raise UsageError(f"--class {target_class!r} is not one of {', '.join(meta.classes)}")


def _score_and_explain(cases: list[Case], files, predictor: Predictor, out: Path, opts: _Options, *, batch_size: int, workers: int, model=None,
                       monitor=None) -> tuple[int, int] | None:
    """One pass over the scoring path: probabilities and raw CAMs (model space) per case; the display
    image and thumbnail are written as each file is decoded, so no file is decoded twice."""
    cells = None
    in_order = iter(cases)  # batches keep input order; keys may repeat across input folders
    members = None
    scorer = predictor if opts.method == "occlusion" else _ExplainingScorer(predictor, opts, model)
    for batch in scored_batches(files, scorer, batch_size=batch_size, workers=workers, display_max=DISPLAY_MAX, expect=opts.expect, detector=opts.detector,
                                features=monitor is not None):
        cam = getattr(scorer, "last", None)
        if monitor is not None:
            monitor.add(batch.probs, batch.features)
        good, kept = [], []
        if predictor.meta.conformal and len(batch.good):
            members = conformal.sets(batch.probs, predictor.meta.conformal, predictor.meta.task)
        judged = verdicts([d.file.shown for d in batch.good], batch.ood, batch.orientation, opts.detector, opts.gate)
        k = -1
        for d in batch.items:
            case = next(in_order)
            case.header = d.header()
            if not d.ok:
                case.status, case.error = d.status, d.message
                continue
            k += 1
            v = judged[k]
            case.ood_score, case.in_distribution, case.orientation = v.ood_score, v.in_distribution, v.orientation
            if v.refusal is not None:
                case.status, case.error = "rejected", v.refusal[1]
                continue
            if members is not None:
                case.prediction_set = conformal.ordered_set(batch.probs[k], members[k], predictor.meta.classes)
            case.record, case.geometry = d.record.to_dict(), d.record.geometry
            grey = (np.clip(d.display, 0, 1) * 255).astype(np.uint8)
            _save_png(out / "cases" / f"{case.name}_image.png", grey)
            thumb = Image.fromarray(grey)
            thumb.thumbnail((96, 96))
            _save_png(out / "cases" / f"{case.name}_thumb.png", np.asarray(thumb))
            good.append(case)
            kept.append(k)
        if good:
            if len(kept) < len(batch.probs):  # --gate reject took some out: explain only the rest
                batch = ScoredBatch([], batch.x[kept], batch.probs[kept])
                cam = cam and CamResult(cam.maps[kept], cam.targets[kept], cam.logits[kept])
            cells = _explain(batch, good, predictor, opts, cam)
    return cells


def _targets(probs: np.ndarray, meta, opts: _Options) -> tuple[list[list[int]], list[int]]:
    """Per case, the classes to map — the explained ones first (prediction, positives, or --class),
    then every other class for the case page's map buttons — and how many are explained."""
    labels = predict_labels(probs, meta.task, meta.effective_thresholds())
    targets, explained = [], []
    for p, lab in zip(probs, labels):
        if opts.target_class is not None:
            t = [meta.classes.index(opts.target_class)]
        elif meta.task == "multiclass":
            t = [int(lab)]
        else:
            t = [j for j, v in enumerate(lab) if v] or [int(np.argmax(p))]
        explained.append(len(t))
        if opts.method != "occlusion" and len(meta.classes) <= ALL_MAPS_UP_TO:
            t += [j for j in np.argsort(-p, kind="stable").tolist() if j not in t]
        targets.append(t)
    return targets, explained


def _padded(targets: list[list[int]]) -> torch.Tensor:
    k = max(len(t) for t in targets)
    return torch.tensor([t + [-1] * (k - len(t)) for t in targets])


def _cam_score(meta) -> str:
    return "log_odds" if meta.task == "multiclass" else "logit"


class _ExplainingScorer:
    """The scorer `report` hands the scoring path: one forward pass gives the probabilities, the OOD
    gate's features and the Grad-CAM maps (the explained classes chosen from that pass's own
    probabilities), where scoring and then explaining took two passes. `last` is the batch's CAM."""

    def __init__(self, predictor: "Predictor | OnnxPredictor", opts: _Options, model=None):
        self.predictor, self.opts, self.meta = predictor, opts, predictor.meta
        self.model = model if model is not None else predictor.model  # the torch head, for int8
        self.ood_threshold = getattr(predictor, "ood_threshold", None)
        self.last = None

    def probs(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        return self.predictor.probs(logits, calibrated)

    def _run(self, pixels: torch.Tensor):
        choose = lambda logits: _padded(_targets(self.probs(logits.cpu().numpy()), self.meta, self.opts)[0])  # noqa: E731
        p, method, score = self.predictor, self.opts.method, _cam_score(self.meta)
        if isinstance(p, OnnxPredictor):  # int8: layer4 maps from ONNX Runtime, the head's gradient in torch
            self.last = cam_from_features(self.model, torch.from_numpy(p.maps(pixels)), choose, method=method, score=score)
        else:
            self.last = compute_cam(p.model, p.prepare(pixels), choose, layer=self.opts.layer, method=method, score=score, autocast_dtype=p.dtype)
        return self.last

    def logits(self, pixels: torch.Tensor) -> np.ndarray:
        return self._run(pixels).logits.cpu().numpy()

    def logits_and_features(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        res = self._run(pixels)
        return res.logits.cpu().numpy(), res.features.cpu().numpy()


def _explain(batch, chunk: list[Case], predictor: Predictor, opts: _Options, cam=None) -> tuple[int, int]:
    """Targets (prediction, positives, or --class) and their maps: from `cam` (the scoring pass's own
    CAM, rows matching `chunk`) or, for occlusion, one occlusion pass for the batch."""
    meta = predictor.meta
    thresholds = meta.effective_thresholds()
    labels = predict_labels(batch.probs, meta.task, thresholds)
    targets, explained = _targets(batch.probs, meta, opts)
    for case, p, lab, t, n in zip(chunk, batch.probs, labels, targets, explained):
        case.probs = [float(v) for v in p]
        case.positive = [int(v >= th) for v, th in zip(p, thresholds)]
        case.predicted = [int(lab)] if meta.task == "multiclass" else [j for j, v in enumerate(lab) if v]
        case.targets, case.explained = t, n
    if opts.method == "occlusion":
        maps_t, cells = occlusion_maps(predictor.model, predictor.prepare(batch.x).float(), _padded(targets), score=_cam_score(meta))
        maps = maps_t.numpy()
    else:
        maps = upsample(cam.maps, batch.x.shape[-1]).numpy()
        cells = int(cam.maps.shape[-2]), int(cam.maps.shape[-1])
    for i, case in enumerate(chunk):
        cams = maps[i, : len(case.targets)]
        if opts.weight_by_probability:
            cams = cams * np.array([case.probs[j] for j in case.targets])[:, None, None]
        case.cams = cams.astype(np.float32)
        if opts.faithfulness:
            case.deletion_auc, case.insertion_auc = _faithfulness(predictor, batch.x[i].numpy(), cams[0], case.targets[0])
    return cells


def shared_scales(cases: list[Case], n_classes: int) -> dict[int, float]:
    """One absolute scale per class, shared by every case in the report: the 99.5th percentile of that
    class's maps. A class's maps are comparable across cases, and a weak map stays cold instead of
    being stretched to full colour."""
    scales: dict[int, float] = {}
    for k in range(n_classes):
        vals = [c.cams[i].ravel() for c in cases if c.cams is not None for i, t in enumerate(c.targets) if t == k]
        if vals:
            v = float(np.percentile(np.concatenate(vals), 99.5))
            scales[k] = v if v > 0 else 1.0
    return scales


def _write_overlays(case: Case, out: Path, scales: dict[int, float], opts: _Options, meta) -> None:
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


def _summary(cases: list[Case], meta, scales: dict[int, float], opts: _Options, cells) -> dict:
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


def _write_colorbar(path: Path, class_name: str, scale: float, normalize: str, weighted: bool, method: str = "gradcam") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 0.9))
    ax.imshow(np.linspace(0, 1, 256)[None, :], aspect="auto", cmap="inferno", extent=(0, 1, 0, 1))
    ax.set_yticks([])
    if normalize == "per-image":
        ax.set_xlabel(f"{'occlusion' if method == 'occlusion' else 'Grad-CAM'} for {class_name}, scaled per image (each image's maximum = 1): not comparable across cases")
    else:
        what = "score drop when occluded" if method == "occlusion" else "Grad-CAM"
        what = f"probability-weighted {what}" if weighted else what
        ax.set_xticks([0, 0.5, 1], ["0", f"{scale / 2:.3g}", f"≥{scale:.3g}"])
        ax.set_xlabel(f"{what} for {class_name}: one absolute scale for every case in this report")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def manifest_truth(inputs: list, meta) -> dict[str, list[int]]:
    """Ground truth (class indices) by row key for the inputs that are labelled manifests; {} for
    folders and files, or a manifest whose labels are not this model's classes."""
    from medres.data.manifest import load_manifest
    from medres.errors import MedresError
    from medres.scoring import _is_manifest

    truth: dict[str, list[int]] = {}
    for raw in inputs:
        p = Path(raw)
        if not (p.is_file() and p.suffix.lower() == ".csv" and _is_manifest(p)):
            continue
        try:
            m = load_manifest(p, classes=meta.classes, task=meta.task)
        except MedresError as err:  # unlabelled, or other classes: the report simply has no truth column
            log.info("no ground truth from %s: %s", p.name, err.one_line())
            continue
        for path, row in zip(m.frame["path"], m.targets):
            truth[str(path)] = [int(j) for j in np.nonzero(row)[0]]
    return truth


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
