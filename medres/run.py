"""A run folder as an object: the one place that knows what `medres train` writes and how to read it
back. `evaluate --run`, `calibrate --run`, `card`, `export --quantize int8` and the demo read a run
through `RunDir`; nothing else parses a run's config.yaml or splits.csv.

    RUN/model.safetensors   best checkpoint (self-describing: classes, preprocessing, calibration, gate)
    RUN/last.safetensors    last epoch; RUN/state.pt optimiser state for --resume
    RUN/config.yaml         the resolved config (input paths absolute)
    RUN/selection.json      what data.manifest/views/filter selected, step by step, and label states
    RUN/splits.csv          path, patient_id, split of every selected row, in row order
    RUN/skipped.csv         rows whose image could not be decoded (code, message)
    RUN/metrics.jsonl       one line per epoch; RUN/curves.png; RUN/train.log; RUN/model_card.{md,html}
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from medres.errors import ManifestInvalid, UsageError

CHECKPOINT = "model.safetensors"
RUNS = Path("runs")  # where `medres train` puts a run without --out


def new_run_folder(name: str, *, root: Path = RUNS) -> Path:
    """runs/<config name>-<YYYYmmdd-HHMMSS>: a new run's folder when none is given."""
    return Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def training_paths(config: str | Path | None, out: str | Path | None, resume: str | Path | None) -> tuple[Path | None, Path | None]:
    """(config to load, run folder) for `medres train`: a resumed run continues in its own folder with
    its own config.yaml unless --config names another; the folder is None when the config's name must
    name it (`new_run_folder`)."""
    if resume is not None:
        return Path(config) if config is not None else Path(resume) / "config.yaml", Path(resume)
    return (Path(config) if config is not None else None), (Path(out) if out is not None else None)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder standing for its model.safetensors."""
    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT).is_file():
            raise UsageError(f"{path} is a folder without {CHECKPOINT}: pass a checkpoint file or a medres run folder")
        return path / CHECKPOINT
    return path


@dataclass(frozen=True)
class RunDir:
    folder: Path

    @classmethod
    def open(cls, folder: str | Path) -> "RunDir":
        folder = Path(folder)
        if not (folder / "config.yaml").is_file() or not (folder / "splits.csv").is_file():
            raise UsageError(f"--run {folder}: not a medres run folder (no config.yaml and splits.csv)")
        return cls(folder)

    @property
    def checkpoint(self) -> Path:
        return resolve_checkpoint(self.folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    def config(self):
        from medres.config import load_config

        return load_config(self.folder / "config.yaml")

    def splits(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "splits.csv", dtype=str, keep_default_na=False)

    def selection(self) -> dict | None:
        p = self.folder / "selection.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    def store_dir(self) -> Path | None:
        return self.config().data.store_dir

    def manifest(self):
        """Exactly the rows the run trained on — its manifest(s), data.root, views, filters — with the
        run's `split` column from splits.csv."""
        from medres.data.selection import select_rows

        manifest = select_rows(self.config().data).manifest
        return with_splits(manifest, self.splits(), str(self.folder / "splits.csv"))


def with_splits(manifest, splits: pd.DataFrame, source: str):
    """`manifest` with a `split` column: row by row when splits.csv lists the same paths in the same order
    (what train writes), else looked up by path (paths must then be unique)."""
    from medres.data.manifest import Manifest

    frame = manifest.frame.copy()
    paths = frame["path"].to_numpy(dtype=str)
    if len(splits) == len(frame) and (splits["path"].to_numpy(dtype=str) == paths).all():
        frame["split"] = splits["split"].to_numpy()
    else:
        lookup = dict(zip(splits["path"], splits["split"]))
        frame["split"] = [lookup.get(p, "") for p in paths]
        if not (frame["split"] != "").any():
            raise ManifestInvalid(f"{source}: none of the {len(frame)} manifest rows is listed there: the manifest changed since the run")
    return Manifest(frame, manifest.targets, manifest.classes, manifest.task, manifest.root, manifest.source, manifest.states, manifest.roots, manifest.root_of)


def manifest_for(manifest, meta, splits_csv: str | Path | None = None):
    """A Manifest as given (e.g. `RunDir.manifest()`: the run's own rows, roots and splits), or a manifest
    CSV read with the checkpoint's classes, plus a splits.csv when given."""
    from medres.data.manifest import Manifest, load_manifest

    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest, classes=meta.classes, task=meta.task)
    if splits_csv is None:
        return manifest
    return with_splits(manifest, pd.read_csv(splits_csv, dtype=str, keep_default_na=False), str(splits_csv))


def split_rows(manifest, split: str) -> np.ndarray:
    return np.nonzero((manifest.frame["split"] == split).to_numpy())[0]


class EvalInputs(NamedTuple):
    checkpoint: Path
    manifest: object  # a manifest CSV path, or a Manifest (`RunDir.manifest()`)
    splits_csv: Path | None
    store_dir: Path | None


def eval_inputs(run: str | Path | None, checkpoint: str | Path | None, manifest: str | Path | None, store_dir: str | Path | None) -> EvalInputs:
    """What `evaluate`/`calibrate` read: checkpoint, manifest (or the run's own selected rows with their
    splits), splits.csv and image-store folder, from --run's folder unless given."""
    if run is not None:
        rd = RunDir.open(run)
        ckpt = resolve_checkpoint(checkpoint) if checkpoint else rd.checkpoint
        store = Path(store_dir) if store_dir is not None else rd.store_dir()  # the training run's store: nothing is decoded again
        if manifest is not None:
            return EvalInputs(ckpt, manifest, rd.path("splits.csv"), store)
        return EvalInputs(ckpt, rd.manifest(), None, store)
    if checkpoint is None or manifest is None:
        raise UsageError("give --run RUN_DIR, or --checkpoint and --manifest")
    return EvalInputs(resolve_checkpoint(checkpoint), manifest, None, Path(store_dir) if store_dir is not None else None)
