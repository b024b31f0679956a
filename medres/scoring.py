"""The one scoring path of `predict` and `report`: input files → decoded batches → probabilities.

- `discover` expands files, folders and manifest CSVs into `InputFile`s in a stable order; `shard`
  splits them between machines or torchrun ranks by a hash of the row key.
- `scored_batches` decodes in the shared decoding pool (`medres.data.pool`: threads, or processes with
  `pool="process"`), ordered and prefetching a bounded window, while the caller's thread runs the
  model, and yields `ScoredBatch`es in input order: every file of the batch (bad ones with their error code) plus the probabilities of the
  good ones (calibrated; averaged over TTA views when asked) from `scorer_for`'s model (torch or
  ONNX Runtime, fp32/bf16/int8). Reports ask for a display-size copy of the original too
  (`display_max`), so no file is decoded twice.
- `evaluate`, `calibrate` and training's validation read their batches from the image store instead
  (`data/dataset.py: stream`) and share the last step, `Predictor.logits_of`.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from medres.data import pool as decoding
from medres.data.pool import DEFAULT_KIND as DECODE_POOL, default_workers  # noqa: F401 — predict and report import them from here
from medres.errors import IngestError, NoInputs, UsageError
from medres.gate import OodDetector, check_header
from medres.files import resolve_under_root
from medres.inference import round_probs
from medres.io import ImageCache, PreprocessSpec, load_image
from medres.io.listing import candidate_files
from medres.io.record import Record
from medres.io.resize import fit_within




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
            found += [InputFile(str(f), rel) for f, rel in candidate_files(p)]
        elif p.is_file() and p.suffix.lower() == ".csv" and _is_manifest(p):
            from medres.data.manifest import read_csv

            df = read_csv(p)  # paths relative to its folder, or to its `root` column (manifest import)
            roots = df["root"] if "root" in df.columns else [""] * len(df)
            for rel, root in zip(df["path"], roots):
                try:
                    found.append(InputFile(str(resolve_under_root(Path(root.strip()) if root.strip() else p.resolve().parent, rel)), rel))
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


def shard_of(key: str, count: int) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % count


def shard(files: list[InputFile], index: int, count: int) -> list[InputFile]:
    """Deterministic split by a hash of the row key: every file in exactly one of `count` shards,
    independent of listing order, so N machines (or torchrun ranks) can share a folder."""
    if not 0 <= index < count:
        raise UsageError(f"--shard {index}/{count}: need 0 <= i < n")
    return [f for f in files if shard_of(f.shown, count) == index]


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


# --- decoding (the shared pool: medres.data.pool) --------------------------------------------------
@dataclass
class Decoded:
    """One input file after decoding: model pixels and record, or the error that stopped it."""

    file: InputFile
    pixels: np.ndarray | None = None  # (S, S) float32 in [0, 1]
    record: Record | None = None
    display: np.ndarray | None = None  # the original at most `display_max` px a side (reports)
    display_scale: float = 1.0
    code: str = ""
    message: str = ""
    rejected: bool = False  # readable, but the header gate refused it (status "rejected", not "error")

    @property
    def ok(self) -> bool:
        return self.pixels is not None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "rejected" if self.rejected else "error"

    def header(self) -> dict[str, str]:
        return self.record.header() if self.record is not None else {}


@dataclass(frozen=True)
class _Decoding:
    """What decoding a file needs (one per decoding process, or shared by the decoding threads)."""

    spec: PreprocessSpec
    cache: ImageCache | None
    display_max: int | None
    expect: dict


def _start_decoding(spec: PreprocessSpec, cache_dir: str | None, display_max: int | None, expect: dict | None) -> _Decoding:
    return _Decoding(spec, ImageCache(cache_dir) if cache_dir else None, display_max, expect or {})


def _decode(how: _Decoding, item: InputFile) -> Decoded:
    if item.error:
        return Decoded(item, code=item.error[1 : item.error.index("]")], message=item.error)
    try:
        loaded = load_image(item.full, how.spec, display_path=item.shown, cache=None if how.display_max else how.cache, keep_original=how.display_max is not None)
    except IngestError as err:
        return Decoded(item, code=err.code, message=err.one_line())
    refused = check_header(loaded.record.header(), how.expect)
    if refused:
        code, why = refused
        return Decoded(item, record=loaded.record, code=code, message=f"[{code}] {item.shown}: {why}", rejected=True)
    out = Decoded(item, loaded.pixels, loaded.record)
    if how.display_max is not None:
        out.display, out.display_scale = fit_within(loaded.original, how.display_max)
    return out


def decoded_stream(files: list[InputFile], *, spec: PreprocessSpec, cache_dir: str | None = None, workers: int | None = 0, display_max: int | None = None,
                   expect: dict | None = None, chunk: int = decoding.CHUNK, pool: str = DECODE_POOL) -> Iterator[Decoded]:
    """Every file decoded, in input order, by the shared decoding pool (`medres.data.pool`): `workers`
    threads (or processes: `pool`), 0 in the calling thread, None the default number."""
    return decoding.imap(_decode, files, setup=_start_decoding, args=(spec, cache_dir, display_max, expect), workers=workers, kind=pool, chunk=chunk)


# --- scoring backends ------------------------------------------------------------------------------
def scorer_for(checkpoint, model, meta, *, device: str = "auto", precision: str = "auto", backend: str = "torch", onnx_path=None):
    """The model that scores a batch: torch (`Predictor`, fp32/bf16/fp16); ONNX Runtime (`OnnxPredictor`)
    for `--backend onnx` and for `--precision int8` (the quantized file beside the checkpoint unless
    `onnx_path` names one); OpenVINO (`OpenVinoPredictor`) for `--backend openvino`, on `onnx_path`, the
    int8 file, or an fp32 graph made from the checkpoint on the spot. All give logits and the gate's
    features in one pass."""
    from medres.inference import Predictor

    if backend == "torch" and precision != "int8":
        return Predictor.create(model, meta, device=device, precision=precision)
    from medres.onnx import check_onnx_matches, default_int8_path, require_int8_cpu

    what = f"--backend {backend}" if backend != "torch" else "--precision int8"
    if device not in ("auto", "cpu"):
        raise UsageError(f"{what} runs on the CPU; --device {device} asks for another device")
    from medres.onnx import require_onnxruntime, require_openvino

    (require_openvino if backend == "openvino" else require_onnxruntime)(what)
    if precision == "int8":
        require_int8_cpu()
        path = Path(onnx_path) if onnx_path else default_int8_path(checkpoint)
        if not path.exists():
            raise UsageError(f"--precision int8: {path} not found; make it with: medres export --checkpoint {checkpoint} --format onnx --quantize int8 --out {path}")
    elif onnx_path is not None:
        path = Path(onnx_path)
    elif backend == "onnx":
        raise UsageError("--backend onnx needs --onnx MODEL.onnx (from medres export)")
    else:
        path = None  # OpenVINO: the graph is made from the checkpoint
    if backend == "openvino":
        return _openvino(model, meta, path, precision)
    from medres.onnx import OnnxPredictor

    props = check_onnx_matches(path, model, want_int8=precision == "int8")
    return OnnxPredictor(path, meta, precision=props.get("medres.precision", "fp32"))


def _openvino(model, meta, path: Path | None, precision: str):
    """OpenVinoPredictor at `precision`: auto means bf16 compute where the CPU has native bf16, as torch's
    auto does; an int8 file keeps its int8 layers and runs the rest at that precision."""
    from medres.inference import cpu_supports_bf16
    from medres.onnx import OpenVinoPredictor, check_onnx_matches, openvino_graph

    if precision == "fp16":
        raise UsageError("--backend openvino runs fp32, bf16 or int8 on the CPU; --precision fp16 is for CUDA")
    inference = "bf16" if precision == "bf16" or (precision in ("auto", "int8") and cpu_supports_bf16()) else "f32"
    if path is not None:
        props = check_onnx_matches(path, model, want_int8=precision == "int8")
        return OpenVinoPredictor(path, meta, inference=inference, props=props)
    graph = openvino_graph(model, meta)
    if graph is not None:
        return OpenVinoPredictor(graph, meta, inference=inference, props={})
    import tempfile

    from medres.onnx import write_onnx

    with tempfile.TemporaryDirectory(prefix="medres-openvino-") as tmp:
        write_onnx(model, meta, Path(tmp) / "model.onnx")
        return OpenVinoPredictor(Path(tmp) / "model.onnx", meta, inference=inference, props={})


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


# --- batches of probabilities ----------------------------------------------------------------------
@dataclass
class ScoredBatch:
    items: list[Decoded]  # every file of the batch, in input order
    x: torch.Tensor | None = None  # (B_ok, S, S) pixels of the good ones
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # (B_ok, C), calibrated
    ood: np.ndarray | None = None  # (B_ok,) OOD scores when the checkpoint has a detector (torch backend)
    features: np.ndarray | None = None  # (B_ok, 2048) pooled features, when asked for (the OOD gate, the shift test)
    orientation: list | None = None  # (B_ok,) (code or None, label) from the gate's orientation check

    @property
    def good(self) -> list[Decoded]:
        return [d for d in self.items if d.ok]


def scored_batches(
    files: list[InputFile],
    scorer,
    *,
    batch_size: int = 32,
    workers: int = 0,
    cache_dir: str | None = None,
    display_max: int | None = None,
    tta: bool = False,
    detector: OodDetector | None = None,
    expect: dict | None = None,
    fail_fast: bool = False,
    on_error: Callable[[Decoded], None] | None = None,
    pool: str = DECODE_POOL,
    features: bool = False,
) -> Iterator[ScoredBatch]:
    """Decode `files` and score them with `scorer` (`scorer_for`: torch or ONNX Runtime) in batches of `batch_size` good
    images (a run of bad files also closes a batch at 4 × batch_size). With `fail_fast`, stops after
    the batch holding the first bad file. `expect`: header expectations (rejected files are not
    scored); `detector`: OOD scores from the same forward pass (the original view's features)."""
    spec = PreprocessSpec.from_dict(scorer.meta.preprocess)
    pending: list[Decoded] = []

    def score() -> ScoredBatch:
        batch = ScoredBatch(list(pending))
        pending.clear()
        good = batch.good
        if good:
            batch.x = torch.from_numpy(np.stack([d.pixels for d in good]))
            views = tta_views(batch.x) if tta else [batch.x]
            if detector is not None or features:
                first, batch.features = scorer.logits_and_features(views[0])
                logits = [first] + [scorer.logits(v) for v in views[1:]]
                if detector is not None and batch.features is not None:
                    batch.ood = detector.score(batch.features)
                    if detector.orientation is not None:
                        batch.orientation = detector.orientation.judge(batch.features)
            else:
                logits = [scorer.logits(v) for v in views]
            batch.probs = round_probs(np.mean([scorer.probs(z) for z in logits], axis=0))  # TTA: the mean, as written
        return batch

    for d in decoded_stream(files, spec=spec, cache_dir=cache_dir, workers=workers, display_max=display_max, expect=expect, pool=pool):
        pending.append(d)
        if not d.ok and not d.rejected:
            if on_error:
                on_error(d)
            if fail_fast:
                break
        if sum(p.ok for p in pending) >= batch_size or len(pending) >= 4 * batch_size:
            yield score()
    if pending:
        yield score()
