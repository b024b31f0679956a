"""Shared helpers for the benchmarks: paths, timing, a results table."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def need(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"{path} not found: this benchmark needs ../shared/data")
    return path


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def machine() -> str:
    """CPU model, cores, the instruction-set level torch dispatches to, and torch's threads (the same
    facts `medres predict --benchmark` records: medres.speed.machine)."""
    from medres.speed import machine as facts

    m = facts()
    return f"{m['cpu']}, {m['cores']} cores, {m['torch_isa']} (int8: {m['int8_isa'] or 'none'}), torch {m['torch']}, threads {m['torch_threads']}" + (f", {m['cuda']}" if m["cuda"] else "")


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, payload: dict) -> None:
    out = ROOT / "runs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
