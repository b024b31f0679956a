"""The Python API, for notebooks and scripts: the same library functions the CLI calls, returning
pandas DataFrames and arrays instead of files.

    from medres import api
    model = api.load("runs/covid")                      # a run folder or a model.safetensors
    table = model.predict(["scan.dcm", "studies/"])     # one row per file, predict's columns
    table = model.predict(frame)                        # a DataFrame with a `path` column
    cam = model.explain("scan.dcm")                     # probabilities and Grad-CAM maps of one image
    summary = api.train("covid_xray", ["data.manifest=xrays/manifest.csv"], out="runs/covid")
    metrics = api.evaluate("runs/covid", out="runs/covid/eval")

Nothing here is new logic: `Model.predict` runs predict's scoring path (input gate, calibration,
conformal sets, OOD score, orientation) and `explain` the report's Grad-CAM, on the checkpoint's own
preprocessing. Progress bars are off: a notebook shows its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Model:
    """A loaded checkpoint: `model` (the torch ResNet50), `meta` (classes, preprocessing, calibration)."""

    checkpoint: Path
    model: object
    meta: object
    device: str = "auto"
    precision: str = "auto"

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    def predict(self, inputs: "list[str | Path] | str | Path | pd.DataFrame", *, gate: str = "flag", batch_size: int = 32,
                workers: int = 0, tta: bool = False) -> pd.DataFrame:
        """Score files, folders or a DataFrame's `path` column (absolute, or relative to its `root`
        column / the current folder); one row per file in input order, errors included. Values are
        as predict writes them (strings; blank where a column does not apply)."""
        from medres.predict import columns
        from medres.scoring import InputFile, discover

        if isinstance(inputs, pd.DataFrame):
            roots = inputs["root"] if "root" in inputs.columns else [""] * len(inputs)
            files = [InputFile(str(Path(r) / p) if r else str(Path(p)), str(p)) for p, r in zip(inputs["path"], roots)]
        else:
            files = discover([inputs] if isinstance(inputs, (str, Path)) else list(inputs))
        rows = self.rows(files, gate=gate, batch_size=batch_size, workers=workers, tta=tta)
        return pd.DataFrame(rows, columns=columns(self.meta), dtype=object).fillna("")

    def rows(self, files: list, *, gate: str = "flag", batch_size: int = 32, workers: int = 0, tta: bool = False) -> list[dict]:
        """predict's output rows (dicts) for `scoring.InputFile`s; the scorer and the gate are built once
        per model and gate setting and reused across calls."""
        from medres.predict import gate_of, rows_of
        from medres.scoring import scored_batches, scorer_for

        if getattr(self, "_scoring", (None,))[0] != gate:
            scorer = scorer_for(self.checkpoint, self.model, self.meta, device=self.device, precision=self.precision)
            self._scoring = (gate, scorer, *gate_of(self.checkpoint, self.meta, expect=None, gate=gate, scorer=scorer))
        _, scorer, expect, detector = self._scoring
        out = []
        for batch in scored_batches(files, scorer, batch_size=batch_size, workers=workers, tta=tta, detector=detector, expect=expect):
            out += rows_of(batch, self.meta, gate=gate, detector=detector)
        return out

    def explain(self, path: str | Path, *, method: str = "gradcam", layer: str = "layer4", target: str | None = None) -> dict:
        """One image → {"probs": {class: p}, "maps": {class: (S, S) float32 on the model's input grid},
        "pixels": (S, S) the model's input}: the predicted class's map (or `target`'s), on the report's
        log-odds score, upsampled onto the cells' receptive-field centres."""
        import torch

        from medres.cam import compute_cam, upsample
        from medres.inference import Predictor, normalise
        from medres.io import PreprocessSpec, load_image

        spec = PreprocessSpec.from_dict(self.meta.preprocess)
        pixels = torch.from_numpy(load_image(path, spec).pixels)[None]
        predictor = Predictor.create(self.model, self.meta, device="cpu", precision="fp32")
        probs = predictor.probs(predictor.logits(pixels))[0]
        k = self.classes.index(target) if target else int(np.argmax(probs))
        x = normalise(pixels.float(), self.meta.mean, self.meta.std, self.meta.in_channels)
        score = "log_odds" if self.meta.task == "multiclass" else "logit"
        result = compute_cam(predictor.model.float(), x, torch.tensor([[k]]), layer=layer, method=method, score=score)
        maps = upsample(result.maps[:, :1], spec.image_size)[0, 0].numpy()
        return {"probs": dict(zip(self.classes, map(float, probs))), "maps": {self.classes[k]: maps}, "pixels": pixels[0].numpy()}


def load(path: str | Path, *, device: str = "auto", precision: str = "auto") -> Model:
    """A run folder (its model.safetensors) or a checkpoint file."""
    from medres.model import load_checkpoint
    from medres.run import resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    model, meta = load_checkpoint(checkpoint)
    return Model(checkpoint, model, meta, device, precision)


def train(config: str | Path | None, overrides: list[str] | None = None, *, out: str | Path, resume: bool = False) -> dict:
    """`medres train --config CONFIG --set ... --out OUT`: a shipped config's name or a YAML path."""
    from medres.config import load_config
    from medres.train import fit

    return fit(load_config(config, overrides), out, resume=resume, show_progress=False)


def evaluate(run: str | Path, *, out: str | Path, split: str = "test", by: list[str] | None = None, bootstrap: int = 1000) -> dict:
    """`medres evaluate --run RUN`: exactly the rows the run trained on; returns what metrics.json holds."""
    from medres.evaluate import evaluate as run_evaluate
    from medres.run import RunDir

    rd = RunDir.open(run)
    return run_evaluate(rd.checkpoint, rd.manifest(), out, split=split or None, by=by, bootstrap=bootstrap, store_dir=rd.store_dir())
