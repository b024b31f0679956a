"""`medres predict --benchmark`: images/s per stage of the scoring path on *this* machine — the numbers a
hospital IT team asks for before scheduling an overnight run. Each stage is timed on its own, on the
user's own files, then the whole path end to end:

- start-up: checkpoint load (+ the OOD detector);
- decode: files → model pixels, in the decoding pool predict would use (`medres.data.pool`);
- forward: the model (and the OOD features) on batches of those pixels, predict's precision;
- write: rows → the output table's line format;
- end to end: `predict` on the same files (process start excluded).

The slowest stage bounds throughput. Results carry the machine (CPU model, cores, the instruction set
torch dispatches to, threads), so figures from different machines are never compared as if equal.
`benchmark` writes them as JSON; `summary_lines` is what the CLI prints.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FORWARD_SAMPLE = 256  # decoded images kept for timing the forward and write stages


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_isa": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "int8_isa": _int8_isa(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def _int8_isa() -> str | None:
    from medres.onnx import int8_isa

    return int8_isa()


def benchmark(checkpoint: str | Path, inputs: list, out: str | Path, **options) -> dict:
    """`stage_benchmark(checkpoint, inputs, **options)`, its figures also written as JSON to `out`."""
    from medres.files import atomic_write

    res = stage_benchmark(checkpoint, inputs, **options)
    atomic_write(Path(out), json.dumps(res, indent=2))
    return res


def summary_lines(res: dict) -> list[str]:
    """The machine, start-up and images/s per stage, one line each, then the slowest stage."""
    m = res["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_isa']}, {m['torch_threads']} threads){', ' + m['cuda'] if m['cuda'] else ''}",
             f"start-up (checkpoint load): {res['startup_seconds']:.2f} s; {res['files']} files, {res['decoded_ok']} decoded"]
    lines += [f"  {name:<11} {st['images_per_s']:8.1f} images/s" for name, st in res["stages"].items()]
    return lines + [f"slowest stage: {res['bottleneck']}"]


def stage_benchmark(checkpoint: str | Path, inputs: list, *, files: int = 200, batch_size: int = 32, workers: int | None = None,
                    device: str = "auto", precision: str = "auto", gate: str = "flag", backend: str = "torch", onnx_path=None) -> dict:
    from medres.io import PreprocessSpec
    from medres.model import load_checkpoint
    from medres.predict import Journal, columns, gate_of, predict, rows_of
    from medres.data.pool import resolve_workers
    from medres.scoring import ScoredBatch, decoded_stream, discover, scorer_for

    chosen = discover(inputs)[:files]
    if not chosen:
        from medres.errors import NoInputs

        raise NoInputs(f"no input files found in {', '.join(str(i) for i in inputs)} (hidden and sidecar files such as .csv/.json/.txt are skipped)")
    workers = resolve_workers(workers)
    t0 = time.perf_counter()
    model, meta = load_checkpoint(checkpoint)
    scorer = scorer_for(checkpoint, model, meta, device=device, precision=precision, backend=backend, onnx_path=onnx_path)
    expect, detector = gate_of(checkpoint, meta, expect=None, gate=gate, scorer=scorer)
    startup = time.perf_counter() - t0

    # Decoding is timed over every chosen file, streamed; the forward and write stages reuse the
    # first `FORWARD_SAMPLE` good images (memory stays bounded for --benchmark-files in the 10,000s).
    t0 = time.perf_counter()
    good, decoded_ok = [], 0
    for d in decoded_stream(chosen, spec=PreprocessSpec.from_dict(meta.preprocess), workers=workers if len(chosen) > 1 else 0, expect=expect):
        decoded_ok += d.ok
        if d.ok and len(good) < FORWARD_SAMPLE:
            good.append(d)
    decode_s = time.perf_counter() - t0
    x = torch.from_numpy(np.stack([d.pixels for d in good])) if good else torch.zeros(0, 1, 1)

    forward = scorer.logits_and_features if detector is not None else scorer.logits
    if len(good):
        forward(x[:batch_size])  # warm-up: first-call allocations and kernel selection
    t0 = time.perf_counter()
    batches = []
    for i in range(0, len(good), batch_size):
        out = forward(x[i : i + batch_size])
        logits, feats = out if detector is not None else (out, None)
        batch = ScoredBatch(good[i : i + batch_size], x[i : i + batch_size], scorer.probs(logits))
        if feats is not None:
            batch.ood = detector.score(feats)
        batches.append(batch)
    forward_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "rows.csv", columns(meta), "csv")
        journal.start(resume=False)
        t0 = time.perf_counter()
        for b in batches:
            journal.append(rows_of(b, meta, gate=gate, detector=detector))
        journal.close()
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        predict(checkpoint, [c.full for c in chosen if c.full], Path(tmp) / "e2e.csv", batch_size=batch_size, workers=workers, device=device, precision=precision, gate=gate, backend=backend, onnx_path=onnx_path)
        e2e_s = time.perf_counter() - t0

    n, n_ok = len(chosen), len(good)
    rate = lambda count, s: count / s if s > 0 else float("inf")  # noqa: E731
    stages = {
        "decode": {"images_per_s": rate(n, decode_s), "seconds": decode_s, "workers": workers},
        "forward": {"images_per_s": rate(n_ok, forward_s), "images": n_ok, "seconds": forward_s, "batch_size": batch_size, "precision": str(scorer.dtype or "fp32"), "device": str(scorer.device), "ood_features": detector is not None},
        "write": {"images_per_s": rate(n_ok, write_s), "seconds": write_s},
        "end_to_end": {"images_per_s": rate(n, e2e_s), "seconds": e2e_s},
    }
    bottleneck = min(("decode", "forward", "write"), key=lambda k: stages[k]["images_per_s"])
    return {"machine": machine(), "files": n, "decoded_ok": decoded_ok, "startup_seconds": startup, "stages": stages, "bottleneck": bottleneck}
