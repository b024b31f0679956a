"""Batch scoring: files, folders (recursive, found by content) or a manifest → one row per file.

Decoding runs in a pool of threads (or processes, `--decode-pool`), ordered and prefetching, while
the main thread runs the model in batches: torch (bf16 autocast where the CPU has it, channels_last),
ONNX Runtime (`--backend onnx`, `--precision int8`: quantize.py) or OpenVINO (`--backend openvino`).
Finished rows are appended to a journal (`.{out}.partial`, fsync'd every `flush_every` seconds, so each
flush costs only the new rows); at the end it is renamed into place, so the output appears atomically. A killed run leaves the journal and
`--resume` continues it. Bad files become error rows with a stable code; the batch goes on.
Under `torchrun`, every rank scores its hash share and rank 0 joins the shares into one table.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from medres import conformal
from medres.errors import NoInputs, OutputExists, UsageError
from medres.gate import verdicts
from medres.shift import monitor_for
from medres.inference import PROB_DECIMALS
from medres.io.record import HEADER_COLUMNS
from medres.files import atomic_path, atomic_write, csv_text
from medres.metrics import predict_labels
from medres.scoring import (  # noqa: F401 — discover/shard/tta_views are part of predict's API too
    DECODE_POOL, InputFile, ScoredBatch, default_workers, discover, scorer_for, parse_shard, scored_batches, shard, shard_of, tta_views,
)

log = logging.getLogger(__name__)


# --- output ----------------------------------------------------------------------------------------
def columns(meta) -> list[str]:
    cols = ["path", "status", "error_code", "message", *HEADER_COLUMNS] + [f"prob_{c}" for c in meta.classes]
    cols += ["prediction"] if meta.task == "multiclass" else [f"positive_{c}" for c in meta.classes]
    if meta.conformal:
        cols += ["prediction_set", "set_size"]
    return cols + ["ood_score", "in_distribution", "orientation"]


def gate_of(checkpoint, meta, *, expect: list[str] | None, gate: str, scorer=None) -> tuple[dict, object]:
    """The header expectations (checkpoint defaults + --expect) and the OOD detector (`gate.OodDetector`,
    or None) that `--gate` asks for."""
    from medres.calibration import load_detector
    from medres.gate import parse_expect, resolve_expect

    if gate not in ("flag", "reject", "off"):
        raise UsageError(f"--gate must be flag, reject or off, got {gate!r}")
    expectations = resolve_expect(meta.expect, parse_expect(expect))
    detector = load_detector(checkpoint, meta) if gate != "off" else None
    if gate == "reject" and detector is None:
        raise UsageError(f"--gate reject: {Path(checkpoint).name} has no OOD detector (trained before the gate existed); run medres calibrate on its run first")
    if detector is not None and "features" not in getattr(scorer, "outputs", ["features"]):
        log.warning("this ONNX file has no features output (exported by an older medres): ood_score is left empty; export it again for the OOD gate")
        detector = None
    if detector is not None and getattr(scorer, "ood_threshold", None) is not None:
        detector = dataclasses.replace(detector, threshold=scorer.ood_threshold)  # int8: refitted on its own features
    return expectations, detector


def read_existing(path: Path, fmt: str) -> list[dict]:
    if not path.exists():
        return []
    if fmt == "parquet":
        import pandas as pd

        return pd.read_parquet(path).astype(str).to_dict("records")
    return list(_read_lines(path, fmt))


def _read_lines(path: Path, fmt: str) -> Iterator[dict]:
    """Rows of a CSV or JSONL table, streamed."""
    with open(path, newline="", encoding="utf-8") as fh:
        if fmt == "csv":
            yield from csv.DictReader(fh)
        else:
            yield from (json.loads(line) for line in fh if line.strip())


def _encode(rows: list[dict], cols: list[str], fmt: str, header: bool) -> bytes:
    if fmt == "csv":
        text = csv_text(cols, [[r.get(c, "") for c in cols] for r in rows])
        return (text if header else text.split("\n", 1)[1]).encode("utf-8")
    return "".join(json.dumps({c: r.get(c, "") for c in cols}) + "\n" for r in rows).encode("utf-8")


class Journal:
    """Finished rows, appended as they are scored to `.{out}.partial` in a line format (CSV, or JSONL for
    `--format jsonl`) and fsync'd every `flush_every` seconds: each flush costs only the new rows. At the
    end the final table is the journal renamed into place (atomic), or written once from it when its
    rows are out of input order or the format is parquet. A killed run leaves the journal; `--resume`
    drops a torn last line and continues it."""

    def __init__(self, out: Path, cols: list[str], fmt: str, *, name: str | None = None):
        self.out, self.cols, self.fmt = out, cols, fmt
        self.line_fmt = "jsonl" if fmt == "jsonl" else "csv"
        self.path = out.with_name(name or f".{out.name}.partial")
        self.keys: list[str] = []
        self.bytes_written = 0
        self._fh = None

    def start(self, *, resume: bool) -> dict[str, dict]:
        """Open for appending; with `resume`, the rows already done (from the journal, else the output)."""
        done: dict[str, dict] = {}
        if resume and not self.path.exists() and self.out.exists():  # a finished run: continue it
            if self.fmt == "parquet":
                self._write_new(read_existing(self.out, self.fmt))
            else:
                os.replace(self.out, self.path)
        if resume and self.path.exists():
            _drop_torn_tail(self.path)
            for row in _read_lines(self.path, self.line_fmt):
                if row.get("path") is not None and row["path"] not in done:
                    done[row["path"]] = row
                    self.keys.append(row["path"])
        else:
            self.path.unlink(missing_ok=True)
        self._fh = open(self.path, "ab")
        if self._fh.tell() == 0 and self.line_fmt == "csv":
            self._write(_encode([], self.cols, "csv", header=True))
        return done

    def _write_new(self, rows: list[dict]) -> None:
        with open(self.path, "wb") as fh:
            fh.write(_encode(rows, self.cols, self.line_fmt, header=True))

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self.bytes_written += len(data)

    def append(self, rows: list[dict]) -> None:
        self._write(_encode(rows, self.cols, self.line_fmt, header=False))
        self._fh.flush()  # in the page cache: survives kill -9 of this process
        self.keys += [r["path"] for r in rows]

    def sync(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None

    def in_order(self, order: list[str]) -> bool:
        present = set(self.keys)
        return self.keys == [k for k in order if k in present]

    def finish(self, order: list[str]) -> None:
        """The final table, atomically: a rename when the journal already is it, else one rewrite."""
        self.close()
        if self.fmt != "parquet" and self.in_order(order):
            os.replace(self.path, self.out)
            return
        rows = {r["path"]: r for r in _read_lines(self.path, self.line_fmt)}
        self.bytes_written += write_rows(self.out, [rows[k] for k in order if k in rows], self.cols, self.fmt)
        self.path.unlink(missing_ok=True)


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (a run killed mid-write)."""
    with open(path, "rb+") as fh:
        data_end = fh.seek(0, os.SEEK_END)
        if data_end == 0:
            return
        fh.seek(max(0, data_end - 65536))
        tail = fh.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        fh.truncate(data_end - len(tail) + cut + 1 if cut >= 0 else 0)


def write_rows(path: Path, rows: Iterable[dict], cols: list[str], fmt: str) -> int:
    """Write a whole table atomically; returns the bytes written."""
    with atomic_path(path) as tmp:
        if fmt in ("csv", "jsonl"):
            with open(tmp, "wb") as fh:
                fh.write(_encode([], cols, fmt, header=True) if fmt == "csv" else b"")
                chunk: list[dict] = []
                for r in rows:
                    chunk.append(r)
                    if len(chunk) == 4096:
                        fh.write(_encode(chunk, cols, fmt, header=False))
                        chunk = []
                fh.write(_encode(chunk, cols, fmt, header=False))
        else:
            import pandas as pd

            pd.DataFrame([{c: str(r.get(c, "")) for c in cols} for r in rows], columns=cols).to_parquet(tmp, index=False)
        return tmp.stat().st_size


@dataclass
class PredictResult:
    out: Path
    total: int = 0
    scored: int = 0
    failed: int = 0
    skipped_existing: int = 0
    rejected: int = 0  # readable files the input gate refused (not failures: the exit code stays 0)
    by_code: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    bytes_written: int = 0  # journal + final table: ≈ the table's size for csv/jsonl
    shift: dict | None = None  # the folder-level shift test (medres/shift.py), also written to OUT.shift.json
    shift_path: Path | None = None

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
    decode_pool: str = DECODE_POOL,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "torch",
    onnx_path: str | Path | None = None,
    tta: bool = False,
    expect: list[str] | None = None,
    gate: str = "flag",
    shard_spec: str | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    fail_fast: bool = False,
    flush_every: float = 10.0,
    on_progress=None,
    on_total=None,
    shift: bool = True,
    shift_window: int = 0,
) -> PredictResult:
    """Score every input file; see the module docstring. Returns counts; raises only for usage or
    checkpoint problems (nothing scored). Under torchrun each rank scores its share and rank 0 joins
    the shares into `out`."""
    from medres.model import load_checkpoint

    out = Path(out)
    ranks = torchrun_rank()
    _check_output(out, fmt=fmt, ranks=ranks, shard_spec=shard_spec, overwrite=overwrite, resume=resume)
    files = discover(inputs)
    if not files:
        raise NoInputs(f"no input files found in {', '.join(str(i) for i in inputs)} (hidden and sidecar files such as .csv/.json/.txt are skipped)")
    sh = parse_shard(shard_spec) or ranks
    mine = shard(files, *sh) if sh else files
    if ranks and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    model, meta = load_checkpoint(checkpoint)
    scorer = scorer_for(checkpoint, model, meta, device=device, precision=precision, backend=backend, onnx_path=onnx_path)
    expectations, detector = gate_of(checkpoint, meta, expect=expect, gate=gate, scorer=scorer)
    journal = _open_journal(out, meta, fmt=fmt, ranks=ranks, overwrite=overwrite, resume=resume)
    done = journal.start(resume=resume)
    todo = [f for f in mine if f.shown not in done]
    result = PredictResult(out=out, total=len(mine), skipped_existing=len(mine) - len(todo))
    if on_total:
        on_total(len(todo))
    if workers is None:
        workers = default_workers(decode_pool)
    t0 = time.perf_counter()
    monitor = monitor_for(checkpoint, meta, scorer, window=shift_window) if shift else None
    try:
        _score_files(todo, scorer, meta, journal, result, cache_dir=cache_dir, workers=workers if len(todo) > 1 else 0,
                     batch_size=batch_size, tta=tta, fail_fast=fail_fast, flush_every=flush_every, on_progress=on_progress,
                     expect=expectations, detector=detector, gate=gate, pool=decode_pool, monitor=monitor)
    finally:
        journal.close()  # a crash keeps every finished row in the journal for --resume
    _finish(journal, files, ranks, result, monitor)
    result.seconds = time.perf_counter() - t0
    if monitor is not None and not ranks:
        _write_shift(result, monitor, out)
    return result


def _check_output(out: Path, *, fmt: str, ranks: tuple[int, int] | None, shard_spec: str | None, overwrite: bool, resume: bool) -> None:
    """Refuse a bad format, --shard under torchrun and an existing output (unless --overwrite/--resume);
    remove the temporary files a killed run left beside `out`."""
    if fmt not in ("csv", "jsonl", "parquet"):
        raise UsageError(f"--format must be csv, jsonl or parquet, got {fmt!r}")
    if ranks and shard_spec:
        raise UsageError("--shard and torchrun both split the inputs: use one of them")
    if out.exists() and not (overwrite or resume):
        raise OutputExists(f"{out} exists; pass --overwrite to replace it or --resume to finish it")
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a killed run (SIGKILL skips cleanup)
        stale.unlink(missing_ok=True)


def _open_journal(out: Path, meta, *, fmt: str, ranks: tuple[int, int] | None, overwrite: bool, resume: bool) -> Journal:
    """This process's journal (one per rank under torchrun), refusing to drop an interrupted run's rows."""
    journal = Journal(out, columns(meta), fmt, name=f".{out.name}.part-{ranks[0]}-of-{ranks[1]}" if ranks else None)
    if journal.path.exists() and not (resume or overwrite):  # a killed run's rows: never dropped silently
        raise OutputExists(f"{journal.path} holds the rows of an interrupted run; pass --resume to continue it or --overwrite to start over")
    if ranks and resume and out.exists() and not journal.path.exists():
        raise UsageError(f"{out} is complete; under torchrun --resume continues from the per-rank journals of a killed run (use --overwrite to score again)")
    return journal


def _finish(journal: Journal, files: list[InputFile], ranks: tuple[int, int] | None, result: PredictResult, monitor) -> None:
    """The final table (joined over ranks under torchrun) and the totals in `result`."""
    if ranks:
        _join_ranks(journal, files, ranks, result)
    else:
        journal.finish([f.shown for f in files])
    result.bytes_written = journal.bytes_written
    result.by_code["ok"] = result.scored


def _write_shift(result: PredictResult, monitor, out: Path) -> None:
    """The folder-level shift test, into `result` and OUT.shift.json; a warning when a shift is detected."""
    result.shift, result.shift_path = monitor.result(), shift_path(out)
    atomic_write(result.shift_path, json.dumps(result.shift, indent=2))
    if result.shift.get("detected"):
        log.warning(result.shift["warning"])


def shift_path(out: Path) -> Path:
    """Where a scoring run's folder-level shift test goes: OUT.shift.json beside the table."""
    return out.with_name(out.name.rsplit(".", 1)[0] + ".shift.json")


def _score_files(todo: list[InputFile], scorer, meta, journal: Journal, result: PredictResult, *, cache_dir, workers: int, batch_size: int, tta: bool,
                 fail_fast: bool, flush_every: float, on_progress, expect: dict, detector, gate: str, pool: str = DECODE_POOL, monitor=None) -> None:
    """The scoring path's batches → journal rows, in input order (so a fresh run's journal already
    is the final table), fsync'd every `flush_every` seconds."""
    last_sync = time.perf_counter()

    def failed(d) -> None:
        result.failed += 1
        result.by_code[d.code] += 1
        log.warning(d.message)

    for batch in scored_batches(todo, scorer, batch_size=batch_size, workers=workers, cache_dir=str(cache_dir) if cache_dir else None,
                                tta=tta, detector=detector, expect=expect, fail_fast=fail_fast, on_error=failed, pool=pool, features=monitor is not None):
        rows = rows_of(batch, meta, gate=gate, detector=detector)
        if monitor is not None:
            monitor.add(batch.probs, batch.features)
        journal.append(rows)
        for r in rows:
            if r["status"] == "rejected":
                result.rejected += 1
                result.by_code[r["error_code"]] += 1
        result.scored += sum(r["status"] == "ok" for r in rows)
        if on_progress:
            on_progress(len(batch.items))
        if time.perf_counter() - last_sync > flush_every:
            journal.sync()
            last_sync = time.perf_counter()


def rows_of(batch: ScoredBatch, meta, *, gate: str = "flag", detector=None) -> list[dict]:
    """One output row per file of the batch: header columns, then probabilities, labels, conformal set,
    OOD score and orientation — or the error, or the gate's refusal (`--gate reject`: no probabilities)."""
    labels = predict_labels(batch.probs, meta.task, meta.effective_thresholds()) if len(batch.good) else []
    members = conformal.sets(batch.probs, meta.conformal, meta.task) if meta.conformal and len(batch.good) else None
    judged = verdicts([d.file.shown for d in batch.good], batch.ood, batch.orientation, detector, gate)
    rows = []
    k = 0
    for d in batch.items:
        row = {"path": d.file.shown, "status": d.status, "error_code": d.code, "message": d.message, **d.header()}
        rows.append(row)
        if not d.ok:
            continue
        p, lab, v = batch.probs[k], labels[k], judged[k]
        if v.ood_score is not None:
            row.update(ood_score=f"{v.ood_score:.5g}", in_distribution=int(v.in_distribution))
        row["orientation"] = v.orientation
        if v.refusal is not None:
            row.update(status="rejected", error_code=v.refusal[0], message=v.refusal[1])
            k += 1
            continue
        row.update({f"prob_{c}": f"{v:.{PROB_DECIMALS}f}" for c, v in zip(meta.classes, p)})
        if meta.task == "multiclass":
            row["prediction"] = meta.classes[int(lab)]
        else:
            row.update({f"positive_{c}": int(v) for c, v in zip(meta.classes, lab)})
        if members is not None:
            in_set = conformal.ordered_set(p, members[k], meta.classes)
            row.update(prediction_set="|".join(in_set), set_size=len(in_set))
        k += 1
    return rows


# --- several processes: torchrun ------------------------------------------------------------------
def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def _join_ranks(journal: Journal, files: list[InputFile], ranks: tuple[int, int], result: PredictResult) -> None:
    """Wait for every rank; rank 0 merges the per-rank journals into the one output table (input
    order) and removes them; the counts in `result` become the totals over all ranks."""
    import torch.distributed as dist

    rank, world = ranks
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # a CPU barrier even on GPU machines
    try:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (result.total, result.scored, result.failed, result.skipped_existing, result.rejected, dict(result.by_code)))
        result.total, result.scored, result.failed, result.skipped_existing, result.rejected = (sum(g[k] for g in gathered) for k in range(5))
        result.by_code = sum((Counter(g[5]) for g in gathered), Counter())
        if rank == 0:
            parts = [journal.path.with_name(f".{journal.out.name}.part-{r}-of-{world}") for r in range(world)]
            merge_parts(journal.out, parts, [f.shown for f in files], journal.cols, journal.fmt)
            journal.bytes_written += journal.out.stat().st_size
        dist.barrier()
    finally:
        dist.destroy_process_group()


def merge_parts(out: Path, parts: list[Path], order: list[str], cols: list[str], fmt: str) -> None:
    """Join per-shard journals (each in input order, shard r = files whose key hashes to r) into `out`,
    streaming; then remove them."""
    line_fmt = "jsonl" if fmt == "jsonl" else "csv"
    rows: dict[str, dict] = {}
    for p in parts:
        if p.exists():
            _drop_torn_tail(p)
            rows.update((r["path"], r) for r in _read_lines(p, line_fmt))
    write_rows(out, (rows[k] for k in order if k in rows), cols, fmt)
    for p in parts:
        p.unlink(missing_ok=True)
