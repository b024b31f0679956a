"""Batch scoring: files, folders (recursive, found by content) or a manifest → one row per file.

Decoding runs in worker processes (`Pool.imap`, ordered, prefetching) while the main process runs
the model in batches with bf16 autocast + channels_last. Rows are written atomically (temp file +
rename) every `flush_every` seconds, so a crash leaves the previous complete file; `--resume`
skips rows already present. Bad files become error rows with a stable code; the batch goes on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from medres.errors import IngestError, NoInputs, OutputExists, UsageError
from medres.files import atomic_path, csv_text, resolve_under_root
from medres.io import ImageCache, PreprocessSpec, load_image
from medres.metrics import predict_labels

log = logging.getLogger(__name__)


# Sidecar files commonly found next to images; skipped when walking folders (files named on the
# command line are always scored, so a text file named .dcm still becomes an error row).
SIDECAR_SUFFIXES = {".csv", ".json", ".txt", ".md", ".html", ".htm", ".yaml", ".yml", ".xml", ".log", ".npy", ".npz", ".pdf", ".py"}
SIDECAR_NAMES = {"DICOMDIR", "Thumbs.db"}


@dataclass(frozen=True)
class InputFile:
    full: str
    shown: str  # relative to its input root: the row key
    error: str = ""  # a problem found while listing (e.g. a manifest path outside its folder)


def discover(inputs: list[str | Path]) -> list[InputFile]:
    """Expand files, folders (recursive, hidden files skipped) and manifest CSVs, in a stable order."""
    found: list[InputFile] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            root = p
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(root)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts) and f.suffix.lower() not in SIDECAR_SUFFIXES and f.name not in SIDECAR_NAMES:
                    found.append(InputFile(str(f), rel.as_posix()))
        elif p.is_file() and p.suffix.lower() == ".csv" and _is_manifest(p):
            from medres.data.manifest import read_csv

            df = read_csv(p)
            for rel in df["path"]:
                try:
                    found.append(InputFile(str(resolve_under_root(p.resolve().parent, rel)), rel))
                except IngestError as err:
                    found.append(InputFile("", rel, err.one_line()))
        elif p.is_file():
            found.append(InputFile(str(p), p.name))
        else:
            raise NoInputs(f"input not found: {p}")
    return found


def _is_manifest(path: Path) -> bool:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = next(csv.reader(fh), [])
    return "path" in header


def shard(files: list[InputFile], index: int, count: int) -> list[InputFile]:
    """Deterministic split by a hash of the row key: every file in exactly one of `count` shards,
    independent of listing order, so N machines can share a folder."""
    if not 0 <= index < count:
        raise UsageError(f"--shard {index}/{count}: need 0 <= i < n")
    return [f for f in files if int(hashlib.sha1(f.shown.encode()).hexdigest(), 16) % count == index]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard expects i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need 0 <= i < n")
    return i, n


# --- decoding in worker processes ------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(spec: PreprocessSpec, cache_dir: str | None, in_process: bool = False) -> None:
    if not in_process:  # a decoding process gets one thread; the caller's process keeps its own
        torch.set_num_threads(1)
    _WORKER["spec"], _WORKER["cache"] = spec, ImageCache(cache_dir) if cache_dir else None


def _decode(item: InputFile) -> tuple[InputFile, np.ndarray | None, str, str]:
    if item.error:
        return item, None, item.error[1 : item.error.index("]")], item.error
    try:
        loaded = load_image(item.full, _WORKER["spec"], display_path=item.shown, cache=_WORKER["cache"])
        return item, loaded.pixels, "", ""
    except IngestError as err:
        return item, None, err.code, err.one_line()


def decoded_stream(files: list[InputFile], spec: PreprocessSpec, *, cache_dir: str | None, workers: int) -> Iterator[tuple[InputFile, np.ndarray | None, str, str]]:
    if workers <= 0:
        _init_worker(spec, cache_dir, in_process=True)
        yield from map(_decode, files)
        return
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec, cache_dir)) as pool:
        yield from pool.imap(_decode, files, chunksize=4)


# --- scoring backends ------------------------------------------------------------------------------
class OnnxBackend:
    def __init__(self, path: str | Path, meta):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
        self.meta = meta

    def logits(self, pixels: torch.Tensor) -> np.ndarray:
        from medres.inference import normalise

        x = normalise(pixels.float(), self.meta.mean, self.meta.std, self.meta.in_channels).numpy()
        return self.session.run(None, {self.session.get_inputs()[0].name: x})[0]


TTA_VARIANTS = ((1.0, 0.0, 0.0, 0.0), (1.04, 0.0, 0.0, 0.0), (1.0, 3.0, 0.0, 0.0), (1.0, -3.0, 0.0, 0.0), (1.0, 0.0, 0.02, 0.02))


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """Mild affine variants (zoom 4%, ±3°, 2% shift) of a (B, H, W) batch; the first is the original."""
    import math

    import torch.nn.functional as F

    views = []
    for scale, deg, tx, ty in TTA_VARIANTS:
        if (scale, deg, tx, ty) == (1.0, 0.0, 0.0, 0.0):
            views.append(x)
            continue
        a = math.radians(deg)
        theta = torch.tensor([[math.cos(a) / scale, -math.sin(a) / scale, tx], [math.sin(a) / scale, math.cos(a) / scale, ty]], dtype=x.dtype)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), (x.shape[0], 1, *x.shape[1:]), align_corners=False)
        views.append(F.grid_sample(x.unsqueeze(1), grid, align_corners=False, padding_mode="zeros").squeeze(1))
    return views


# --- output ----------------------------------------------------------------------------------------
def columns(meta) -> list[str]:
    cols = ["path", "status", "error_code", "message"] + [f"prob_{c}" for c in meta.classes]
    return cols + (["prediction"] if meta.task == "multiclass" else [f"positive_{c}" for c in meta.classes])


def read_existing(path: Path, fmt: str) -> list[dict]:
    if not path.exists():
        return []
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import pandas as pd

    return pd.read_parquet(path).astype(str).to_dict("records")


def write_rows(path: Path, rows: list[dict], cols: list[str], fmt: str) -> None:
    with atomic_path(path) as tmp:
        if fmt == "csv":
            tmp.write_text(csv_text(cols, [[r.get(c, "") for c in cols] for r in rows]), encoding="utf-8")
        elif fmt == "jsonl":
            tmp.write_text("".join(json.dumps({c: r.get(c, "") for c in cols}) + "\n" for r in rows), encoding="utf-8")
        else:
            import pandas as pd

            pd.DataFrame([{c: str(r.get(c, "")) for c in cols} for r in rows], columns=cols).to_parquet(tmp, index=False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


@dataclass
class PredictResult:
    out: Path
    total: int = 0
    scored: int = 0
    failed: int = 0
    skipped_existing: int = 0
    by_code: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def predict(
    checkpoint: str | Path,
    inputs: list[str | Path],
    out: str | Path,
    *,
    fmt: str = "csv",
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "torch",
    onnx_path: str | Path | None = None,
    tta: bool = False,
    shard_spec: str | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    fail_fast: bool = False,
    flush_every: float = 10.0,
    on_progress=None,
    on_total=None,
) -> PredictResult:
    """Score every input file; see the module docstring. Returns counts; raises only for usage or
    checkpoint problems (nothing scored)."""
    from medres.inference import Predictor
    from medres.model import load_checkpoint

    out = Path(out)
    if fmt not in ("csv", "jsonl", "parquet"):
        raise UsageError(f"--format must be csv, jsonl or parquet, got {fmt!r}")
    if out.exists() and not (overwrite or resume):
        raise OutputExists(f"{out} exists; pass --overwrite to replace it or --resume to finish it")
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a killed run (SIGKILL skips cleanup)
        stale.unlink(missing_ok=True)
    files = discover(inputs)
    sh = parse_shard(shard_spec)
    if sh:
        files = shard(files, *sh)
    if not files:
        raise NoInputs("no input files found")
    model, meta = load_checkpoint(checkpoint)
    spec = PreprocessSpec.from_dict(meta.preprocess)
    scorer = Predictor.create(model, meta, device=device, precision=precision)
    onnx = OnnxBackend(onnx_path, meta) if backend == "onnx" else None
    if backend == "onnx" and onnx_path is None:
        raise UsageError("--backend onnx needs --onnx MODEL.onnx (from medres export)")
    thresholds = meta.effective_thresholds()
    cols = columns(meta)

    existing = read_existing(out, fmt) if resume else []
    done = {r["path"]: r for r in existing}
    todo = [f for f in files if f.shown not in done]
    result = PredictResult(out=out, total=len(files), skipped_existing=len(files) - len(todo))
    if on_total:
        on_total(len(todo))
    rows_by_key: dict[str, dict] = dict(done)
    order = [f.shown for f in files]
    t0 = last_flush = time.perf_counter()

    def flush() -> None:
        write_rows(out, [rows_by_key[k] for k in order if k in rows_by_key], cols, fmt)

    if workers is None:
        workers = max(1, min(4, (os.cpu_count() or 2) - 1))
    pending: list[tuple[InputFile, np.ndarray]] = []

    def score_pending() -> None:
        if not pending:
            return
        x = torch.from_numpy(np.stack([p for _, p in pending]))
        views = tta_views(x) if tta else [x]
        probs = np.mean([scorer.probs(onnx.logits(v) if onnx else scorer.logits(v)) for v in views], axis=0)
        labels = predict_labels(probs, meta.task, thresholds)
        for (item, _), p, lab in zip(pending, probs, labels):
            row = {"path": item.shown, "status": "ok", "error_code": "", "message": ""}
            row.update({f"prob_{c}": f"{v:.6f}" for c, v in zip(meta.classes, p)})
            if meta.task == "multiclass":
                row["prediction"] = meta.classes[int(lab)]
            else:
                row.update({f"positive_{c}": int(v) for c, v in zip(meta.classes, lab)})
            rows_by_key[item.shown] = row
            result.scored += 1
        if on_progress:
            on_progress(len(pending))
        pending.clear()

    try:
        for item, pixels, code, message in decoded_stream(todo, spec, cache_dir=str(cache_dir) if cache_dir else None, workers=workers if len(todo) > 1 else 0):
            if pixels is None:
                rows_by_key[item.shown] = {"path": item.shown, "status": "error", "error_code": code, "message": message}
                result.failed += 1
                result.by_code[code] += 1
                log.warning(message)
                if on_progress:
                    on_progress(1)
                if fail_fast:
                    break
                continue
            pending.append((item, pixels))
            if len(pending) >= batch_size:
                score_pending()
            if time.perf_counter() - last_flush > flush_every:
                flush()
                last_flush = time.perf_counter()
        score_pending()
    finally:
        flush()
    result.by_code["ok"] = result.scored
    result.seconds = time.perf_counter() - t0
    return result
