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


RESNET50_GFLOP_224 = 8.2  # one ResNet50 forward at 224 px: 4.1 G multiply-adds = 8.2 GFLOP (He et al. 2016, Table 1: 3.8e9 FLOPs as MACs + the head)


def gemm_limit(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of one n×n GEMM at each precision this CPU offers, best of `repeats`: fp32 and bf16 through
    torch (the engine `predict` uses), int8 through ONNX Runtime's MatMulInteger (the engine of the int8
    path) where onnxruntime is installed. The limit a ResNet50 run can reach is GFLOP/s / RESNET50_GFLOP_224
    × (224 / size)² images/s (`resnet50_limit`); every scoring benchmark prints its rate as a share of it."""
    import torch

    out: dict[str, float] = {}
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype is torch.bfloat16 and not _bf16_fast():
            continue
        a, b = a32.to(dtype), b32.to(dtype)
        torch.mm(a, b)
        best = min(timed(torch.mm, a, b)[0] for _ in range(repeats))
        out[name] = 2 * n**3 / best / 1e9
    int8 = _ort_int8_gemm(n, repeats)
    if int8:
        out["int8"] = int8
    return out


def resnet50_limit(gflops: float, size: int) -> float:
    """Images/s a ResNet50 forward at `size` px could reach at `gflops` GFLOP/s."""
    return gflops / (RESNET50_GFLOP_224 * (size / 224) ** 2)


def _bf16_fast() -> bool:
    """bf16 GEMMs run on native instructions (AVX-512 BF16 or AMX), not emulated."""
    return _cpu_has("avx512_bf16", "amx_bf16")


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {f}" in text for f in flags)


def _ort_int8_gemm(n: int, repeats: int) -> float | None:
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]), helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    sess.run(None, feeds)
    best = min(timed(sess.run, None, feeds)[0] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def limit_lines(size: int, rates: dict[str, float] | None = None) -> str:
    """The machine's GEMM limit at each precision, the ResNet50 images/s it allows at `size`, and each of
    `rates` ({label: images/s}) as a share of the limit at its precision (label 'name (fp32)' etc.)."""
    limits = gemm_limit()
    lines = [f"GEMM limit ({size}px ResNet50): " + ", ".join(f"{k} {v:.0f} GFLOP/s = {resnet50_limit(v, size):.1f} img/s" for k, v in limits.items())]
    for label, rate in (rates or {}).items():
        prec = label[label.rfind("(") + 1 : -1] if label.endswith(")") else "fp32"
        if prec in limits:
            lines.append(f"  {label}: {rate:.1f} img/s = {rate / resnet50_limit(limits[prec], size):.2f} of the {prec} limit")
    return "\n".join(lines)
