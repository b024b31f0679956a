"""`evaluate --top-losses N`: the N evaluated cases the model got most wrong, by per-case loss, as a
small review page (top_losses/index.html) with the Grad-CAM of the true and the predicted class.

The loss is computed on the calibrated probabilities as per_case.csv writes them (PROB_DECIMALS),
clipped to [EPS, 1 - EPS]: multiclass, the cross-entropy -log p(true class); multilabel, the binary
cross-entropy summed over the labelled classes (a masked label, NaN, adds nothing). Ties keep the
evaluated order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medres.files import atomic_write
from medres.inference import PROB_DECIMALS
from medres.metrics import predict_labels

EPS = 1e-7
MAX_MAPS = 4  # multilabel: Grad-CAMs per case (true classes first, then predicted ones)


def per_case_loss(y: np.ndarray, p: np.ndarray, task: str) -> np.ndarray:
    """(N,) loss of each case; y (N, C) with NaN for masked labels, p (N, C) calibrated probabilities."""
    p = np.clip(np.round(np.asarray(p, dtype=np.float64), PROB_DECIMALS), EPS, 1 - EPS)
    if task == "multiclass":
        return -np.log(p[np.arange(len(p)), np.nan_to_num(y).argmax(1)])
    labelled = ~np.isnan(y)
    t = np.nan_to_num(y)
    each = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    return (each * labelled).sum(1)


def top_loss_rows(loss: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` largest losses, largest first; ties in evaluated order."""
    return np.argsort(-loss, kind="stable")[:n]


def write_top_losses(out: Path, model, meta, *, files: list[Path], shown: list[str], y: np.ndarray, p_cal: np.ndarray,
                     thresholds: list[float], n: int) -> dict:
    """top_losses/index.html, top_losses.json and the overlays in `out` (a folder of its own)."""
    from medres.inference import Predictor
    from medres.templates import render

    out.mkdir(parents=True, exist_ok=True)
    loss = per_case_loss(y, p_cal, meta.task)
    labels = predict_labels(p_cal, meta.task, thresholds)
    predictor = Predictor.create(model, meta, device="cpu", precision="fp32")
    cases = []
    for rank, i in enumerate(top_loss_rows(loss, n)):
        truth, predicted = _classes_of(y[i], labels[i], meta.task)
        shown_classes = list(dict.fromkeys(truth + predicted))[: 2 if meta.task == "multiclass" else MAX_MAPS]
        maps, pixels = _cams(predictor, meta, files[i], shown_classes)
        cases.append({"rank": rank + 1, "row": int(i), "path": shown[i], "loss": float(loss[i]), "truth": [meta.classes[k] for k in truth],
                      "prediction": [meta.classes[k] for k in predicted], "probs": {c: float(v) for c, v in zip(meta.classes, p_cal[i])},
                      "_maps": maps, "_pixels": pixels, "_truth": truth, "_predicted": predicted})
    scales = _scales(cases)
    for case in cases:
        case["images"] = _write_overlays(out, case, scales, meta.classes)
    public = [{k: v for k, v in c.items() if not k.startswith("_")} for c in cases]
    atomic_write(out / "top_losses.json", json.dumps({"task": meta.task, "loss": _loss_text(meta.task), "cases": public}, indent=2))
    atomic_write(out / "index.html", render("top_losses.html", cases=public, task=meta.task, loss_text=_loss_text(meta.task), classes=meta.classes))
    return {"cases": len(public), "index": str(Path(out.name) / "index.html"), "paths": [c["path"] for c in public]}


def _cams(predictor, meta, path: Path, classes: list[int]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """({class: Grad-CAM on the input grid}, the input pixels) of one image, on the report's CAM score."""
    import torch

    from medres.cam import compute_cam, upsample
    from medres.explain import cam_score
    from medres.inference import normalise
    from medres.io import PreprocessSpec, load_image

    spec = PreprocessSpec.from_dict(meta.preprocess)
    pixels = torch.from_numpy(load_image(path, spec).pixels)[None]
    x = normalise(pixels.float(), meta.mean, meta.std, meta.in_channels)
    result = compute_cam(predictor.model.float(), x, torch.tensor([classes]), layer="layer4", method="gradcam", score=cam_score(meta))
    maps = upsample(result.maps, spec.image_size)[0].numpy()
    return {k: maps[j] for j, k in enumerate(classes)}, pixels[0].numpy()


def _classes_of(y_row: np.ndarray, label, task: str) -> tuple[list[int], list[int]]:
    """(true class indices, predicted class indices) of one case."""
    if task == "multiclass":
        return [int(np.nan_to_num(y_row).argmax())], [int(label)]
    return [int(k) for k in np.nonzero(y_row == 1)[0]], [int(k) for k in np.nonzero(label)[0]]


def _scales(cases: list[dict]) -> dict[int, float]:
    """One absolute scale per class over this page (99.5th percentile of its maps here): a weak map stays cold."""
    from medres.report import shared_scale

    return {k: shared_scale([c["_maps"][k] for c in cases if k in c["_maps"]]) for k in {k for c in cases for k in c["_maps"]}}


def _write_overlays(out: Path, case: dict, scales: dict[int, float], classes: list[str]) -> list[dict]:
    from medres.report import _colormap, _save_png, overlay

    cmap, images = _colormap(), []
    for k, cam in case["_maps"].items():
        name = f"case-{case['rank']:03d}_cam_{k}.png"
        _save_png(out / name, overlay(case["_pixels"], np.clip(cam / scales[k], 0, 1), cmap))
        role = " and ".join(r for r, ks in (("truth", case["_truth"]), ("prediction", case["_predicted"])) if k in ks)
        images.append({"file": name, "class": classes[k], "role": role})
    return images


def _loss_text(task: str) -> str:
    if task == "multiclass":
        return "cross-entropy −log p(true class) on the calibrated probabilities in per_case.csv"
    return "binary cross-entropy summed over the labelled classes (masked labels left out), calibrated probabilities as in per_case.csv"
