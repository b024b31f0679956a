"""The report's computing room: score every input and explain it — probabilities, the input gate's
verdict, the classes to map and their raw maps (model space) per case — in one pass over the scoring
path. Nothing here writes a file; `report.py` renders what it returns.

Which method makes the maps, and what that implies (a layer or not, maps from the scoring pass or
passes of their own, every class or the explained ones only), is a lookup in `cam.METHODS`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medres import conformal
from medres.cam import CamResult, cam_from_features, cam_method, compute_cam, find_layer, input_maps
from medres.errors import UsageError
from medres.gate import verdicts
from medres.inference import Predictor
from medres.io import Geometry
from medres.metrics import predict_labels
from medres.onnx import OnnxPredictor
from medres.scoring import ScoredBatch, scored_batches

log = logging.getLogger(__name__)
DISPLAY_MAX = 1024
ALL_MAPS_UP_TO = 8  # classes: up to this many, the case page offers a map for every class


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


@dataclass(frozen=True)
class Options:
    """The report's options, as explaining and rendering read them."""

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


def check_options(model, meta, *, method: str, layer: str, target_class: str | None, normalize: str) -> None:
    if normalize not in ("shared", "per-image"):
        raise UsageError(f"--normalize must be shared or per-image, got {normalize!r}")
    try:
        cam_method(method)
        find_layer(model, layer)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if target_class is not None and target_class not in meta.classes:
        raise UsageError(f"--class {target_class!r} is not one of {', '.join(meta.classes)}")


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


def score_and_explain(cases: list[Case], files, predictor: Predictor, opts: Options, *, batch_size: int, workers: int, model=None, monitor=None,
                      on_image: Callable[[Case, np.ndarray], None] = lambda case, display: None) -> tuple[int, int] | None:
    """One pass over the scoring path: probabilities and raw maps (model space) per case. `on_image`
    gets each accepted case's display image ((H, W) in [0, 1]) as its file is decoded, so the renderer
    never decodes a file twice. Returns the maps' grid (cells), None when nothing was explained."""
    cells = None
    in_order = iter(cases)  # batches keep input order; keys may repeat across input folders
    scorer = ExplainingScorer(predictor, opts, model) if cam_method(opts.method).gradient else predictor
    for batch in scored_batches(files, scorer, batch_size=batch_size, workers=workers, display_max=DISPLAY_MAX, expect=opts.expect, detector=opts.detector,
                                features=monitor is not None):
        cam = getattr(scorer, "last", None)
        if monitor is not None:
            monitor.add(batch.probs, batch.features)
        good, kept = _judge(batch, in_order, predictor.meta, opts, on_image)
        if good:
            if len(kept) < len(batch.probs):  # --gate reject took some out: explain only the rest
                batch = ScoredBatch([], batch.x[kept], batch.probs[kept])
                cam = cam and CamResult(cam.maps[kept], cam.targets[kept], cam.logits[kept])
            cells = explain_batch(batch, good, predictor, opts, cam)
    return cells


def _judge(batch, in_order, meta, opts: Options, on_image) -> tuple[list[Case], list[int]]:
    """Fill the batch's cases from their decoding and the input gate's verdicts; the cases that go on
    to be explained and their rows in the batch's good images."""
    members = None
    if meta.conformal and len(batch.good):
        members = conformal.sets(batch.probs, meta.conformal, meta.task)
    judged = verdicts([d.file.shown for d in batch.good], batch.ood, batch.orientation, opts.detector, opts.gate)
    good, kept = [], []
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
            case.prediction_set = conformal.ordered_set(batch.probs[k], members[k], meta.classes)
        case.record, case.geometry = d.record.to_dict(), d.record.geometry
        on_image(case, d.display)
        good.append(case)
        kept.append(k)
    return good, kept


def targets_of(probs: np.ndarray, meta, opts: Options) -> tuple[list[list[int]], list[int]]:
    """Per case, the classes to map — the explained ones first (prediction, positives, or --class),
    then, where the method maps every class, every other class for the case page's map buttons — and
    how many are explained."""
    labels = predict_labels(probs, meta.task, meta.effective_thresholds())
    every_class = cam_method(opts.method).every_class and len(meta.classes) <= ALL_MAPS_UP_TO
    targets, explained = [], []
    for p, lab in zip(probs, labels):
        if opts.target_class is not None:
            t = [meta.classes.index(opts.target_class)]
        elif meta.task == "multiclass":
            t = [int(lab)]
        else:
            t = [j for j, v in enumerate(lab) if v] or [int(np.argmax(p))]
        explained.append(len(t))
        if every_class:
            t += [j for j in np.argsort(-p, kind="stable").tolist() if j not in t]
        targets.append(t)
    return targets, explained


def padded(targets: list[list[int]]) -> torch.Tensor:
    k = max(len(t) for t in targets)
    return torch.tensor([t + [-1] * (k - len(t)) for t in targets])


def cam_score(meta) -> str:
    return "log_odds" if meta.task == "multiclass" else "logit"


class ExplainingScorer:
    """The scorer `report` hands the scoring path for a gradient method: one forward pass gives the
    probabilities, the OOD gate's features and the maps (the explained classes chosen from that pass's
    own probabilities), where scoring and then explaining took two passes. `last` is the batch's CAM."""

    def __init__(self, predictor: "Predictor | OnnxPredictor", opts: Options, model=None):
        self.predictor, self.opts, self.meta = predictor, opts, predictor.meta
        self.model = model if model is not None else predictor.model  # the torch head, for int8
        self.ood_threshold = getattr(predictor, "ood_threshold", None)
        self.last = None

    def probs(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        return self.predictor.probs(logits, calibrated)

    def _run(self, pixels: torch.Tensor):
        choose = lambda logits: padded(targets_of(self.probs(logits.cpu().numpy()), self.meta, self.opts)[0])  # noqa: E731
        p, method, score = self.predictor, self.opts.method, cam_score(self.meta)
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


def explain_batch(batch, chunk: list[Case], predictor: Predictor, opts: Options, cam: CamResult | None = None) -> tuple[int, int]:
    """Targets (prediction, positives, or --class) and their maps at input resolution: from `cam` (a
    gradient method's maps from the scoring pass itself, rows matching `chunk`) or, for a forward-only
    method (no `cam`), the method's own passes over the batch."""
    meta = predictor.meta
    thresholds = meta.effective_thresholds()
    labels = predict_labels(batch.probs, meta.task, thresholds)
    targets, explained = targets_of(batch.probs, meta, opts)
    for case, p, lab, t, n in zip(chunk, batch.probs, labels, targets, explained):
        case.probs = [float(v) for v in p]
        case.positive = [int(v >= th) for v, th in zip(p, thresholds)]
        case.predicted = [int(lab)] if meta.task == "multiclass" else [j for j, v in enumerate(lab) if v]
        case.targets, case.explained = t, n
    score = cam_score(meta)
    if cam is None:  # a forward-only method: its own passes over the batch, on the torch model
        maps_t, cells = input_maps(predictor.model, predictor.prepare(batch.x).float(), padded(targets), method=opts.method, score=score)
    else:  # the scoring pass's maps (int8 too: no torch model to run here), brought onto the input's grid
        maps_t, cells = input_maps(None, batch.x, padded(targets), method=opts.method, score=score, cam=cam)
    maps = maps_t.numpy()
    for i, case in enumerate(chunk):
        cams = maps[i, : len(case.targets)]
        if opts.weight_by_probability:
            cams = cams * np.array([case.probs[j] for j in case.targets])[:, None, None]
        case.cams = cams.astype(np.float32)
        if opts.faithfulness:
            case.deletion_auc, case.insertion_auc = deletion_insertion_auc(predictor, batch.x[i].numpy(), cams[0], case.targets[0])
    return cells


def deletion_insertion_auc(predictor: Predictor, pixels: np.ndarray, heat: np.ndarray, cls: int, steps: int = 16) -> tuple[float, float]:
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
