"""From `data:` in a config to the rows a run trains on: read one or several manifests, merge them
(each row keeps its `source`; patient ids stay distinct per source), then keep the views asked for,
apply the row filters, and drop rows with no label for any selected class. Every step is counted,
so the run can say what it selected and why (`train.log`, `selection.json`, the model card).

`select_rows(cfg.data)` is the one way a run's manifest is built: `train` calls it, and a run
folder (`medres/run.py`) calls it again to evaluate exactly the rows the run was trained on.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from medres.data.manifest import MISSING, Manifest, load_manifest
from medres.errors import ConfigInvalid, ManifestInvalid

_FILTER = re.compile(r"^\s*(?P<col>[^<>=!]+?)\s+(?P<op>==|!=|<=|>=|<|>|not in|in)\s+(?P<value>.+?)\s*$")
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass
class Selection:
    """The selected rows and how they came to be."""

    manifest: Manifest
    steps: list[dict] = field(default_factory=list)  # {"step", "removed", "remaining"} in order

    def summary(self) -> list[str]:
        return [f"{s['step']}: {s['remaining']} rows" + (f" ({s['removed']} removed)" if s["removed"] else "") for s in self.steps]


def select_rows(data) -> Selection:
    """`data`: a `DataConfig`. Raises ConfigInvalid/ManifestInvalid naming the key, file or column."""
    paths = data.manifests
    if not paths:
        raise ConfigInvalid("data.manifest is required for training")
    if not data.classes:
        raise ConfigInvalid("data.classes must list the class names")
    several = len(paths) > 1
    parts = [load_manifest(p, classes=data.classes, task=data.task, root=data.root, uncertain=data.uncertain, absent_classes_missing=several) for p in paths]
    steps = [{"step": f"read {p}", "removed": 0, "remaining": len(m)} for p, m in zip(paths, parts)]
    manifest = merge(parts) if several else parts[0]
    if several:
        steps.append({"step": f"merged {len(parts)} manifests (sources: {', '.join(sorted(set(manifest.frame['source'])))})", "removed": 0, "remaining": len(manifest)})
    selection = Selection(manifest, steps)
    if data.views:
        _keep(selection, _view_mask(manifest, data.views), f"data.views {data.views}")
    for expr in data.filter:
        _keep(selection, filter_mask(selection.manifest.frame, expr, selection.manifest.source), f"data.filter '{expr}'")
    if data.task == "multilabel":
        _keep(selection, selection.manifest.labelled.any(axis=1), "rows with a label for at least one class")
    if len(selection.manifest) == 0:
        raise ManifestInvalid(f"{manifest.source}: no rows left after selection ({'; '.join(selection.summary())})")
    return selection


def _keep(selection: Selection, mask: np.ndarray, step: str) -> None:
    removed = int((~mask).sum())
    selection.manifest = selection.manifest.subset(mask) if removed else selection.manifest
    selection.steps.append({"step": step, "removed": removed, "remaining": len(selection.manifest)})


def merge(parts: list[Manifest]) -> Manifest:
    """Several manifests as one: rows in order, each resolved against its own root; `source` is the
    manifest's own `source` column where filled, else its file name; patient ids become `source/id`
    so two archives' `1` never group together."""
    frames = []
    for m in parts:
        f = m.frame.copy()
        stem = Path(m.source).stem
        f["source"] = f["source"].where(f["source"].str.strip() != "", stem) if "source" in f.columns else stem
        f["patient_id"] = f["source"] + "/" + f["patient_id"]
        frames.append(f)
    frame = pd.concat(frames, ignore_index=True).fillna("")
    states = [m.states if m.states is not None else np.where(np.isnan(m.targets), MISSING, m.targets).astype(np.int8) for m in parts]
    root_of = np.concatenate([np.full(len(m), k, dtype=np.int32) for k, m in enumerate(parts)])
    return Manifest(frame, np.concatenate([m.targets for m in parts]), parts[0].classes, parts[0].task, parts[0].root,
                    " + ".join(m.source for m in parts), states=np.concatenate(states), roots=[m.root for m in parts], root_of=root_of)


def _view_mask(manifest: Manifest, views: list[str]) -> np.ndarray:
    if "view" not in manifest.frame.columns:
        raise ConfigInvalid(f"data.views is set but {manifest.source} has no 'view' column (medres manifest import writes one)")
    wanted = {v.strip().upper() for v in views}
    return manifest.frame["view"].str.strip().str.upper().isin(wanted).to_numpy()


def filter_mask(frame: pd.DataFrame, expr: str, source: str = "manifest") -> np.ndarray:
    """'COLUMN OP VALUE' → boolean mask. Ordering operators compare numbers (a blank or non-numeric cell
    never passes); == and != compare numbers when both sides are numeric, else text; `in`/`not in`
    take a YAML list (`sex in [F, M]`)."""
    match = _FILTER.match(expr)
    if not match:
        raise ConfigInvalid(f"data.filter '{expr}': expected 'COLUMN OP VALUE' with OP one of ==, !=, <, <=, >, >=, in, not in")
    col, op, raw = match["col"].strip(), match["op"], match["value"]
    if col not in frame.columns:
        raise ConfigInvalid(f"data.filter '{expr}': no column {col!r} in {source} (columns: {', '.join(c for c in frame.columns if not c.startswith('_'))})")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    text = frame[col].astype(str).str.strip()
    if op in ("in", "not in"):
        if not isinstance(value, list):
            raise ConfigInvalid(f"data.filter '{expr}': {op} takes a list, e.g. [PA, AP]")
        inside = text.isin([str(v) for v in value]).to_numpy()
        return inside if op == "in" else ~inside
    numbers = pd.to_numeric(text, errors="coerce")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (_COMPARE[op](numbers, value) & numbers.notna()).to_numpy()
    if op not in ("==", "!="):
        raise ConfigInvalid(f"data.filter '{expr}': {op} needs a number, got {raw!r}")
    return _COMPARE[op](text, str(value)).to_numpy()


def unlabelled_manifest(sources: list[Path], *, root: Path | None = None, filters: list[str] | None = None) -> Manifest:
    """Films without labels (`pretrain`, `train.unlabeled`): manifests (only `path` is needed) or folders
    (every candidate image below them, sniffed by content at decode time), concatenated."""
    from medres.io.listing import candidate_files

    if not sources:
        raise ConfigInvalid("data.manifest is required: a manifest (a path column is enough) or a folder of images")
    parts = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            rows = [(rel, Path(rel).stem) for _, rel in candidate_files(src)]
            frame = pd.DataFrame(rows, columns=["path", "patient_id"]).astype(str)
            parts.append(Manifest(frame, np.zeros((len(frame), 0), np.float32), [], "multiclass", src.resolve(), str(src)))
        else:
            parts.append(load_manifest(src, require_labels=False, root=root))
    if len(parts) > 1:
        frame = pd.concat([p.frame for p in parts], ignore_index=True).fillna("")
        root_of = np.concatenate([np.full(len(p), k, np.int32) for k, p in enumerate(parts)])
        roots = [p.root for p in parts]
        m = Manifest(frame, np.zeros((len(frame), 0), np.float32), [], "multiclass", roots[0], " + ".join(p.source for p in parts), roots=roots, root_of=root_of)
    else:
        m = parts[0]
    for expr in filters or []:
        m = m.subset(filter_mask(m.frame, expr, m.source))
    if len(m) < 2:
        raise ConfigInvalid(f"{m.source}: at least 2 unlabelled films are needed, found {len(m)}")
    return m
