"""The int8 path: `medres export --format onnx --quantize int8` and `medres predict --precision int8`.

Static post-training quantization with ONNX Runtime's tools (QDQ format, per-channel symmetric int8
weights, uint8 activations, min/max ranges), calibrated on validation images through the same
decoding path as `predict`. Why ONNX Runtime rather than PyTorch's x86 int8 (PT2E + inductor) or
OpenVINO: it needs no compiler at run time (inductor's int8 lowering needs a C++ toolchain and minutes of
compile time on a 2-core machine), it is already medres's export format, and it was the fastest measured
(docs/benchmarks.md, "int8"). The ONNX file carries the checkpoint's metadata, the hash of the weights it
was made from, the calibration files and the settings; `predict` refuses a file made from other weights.

Weights use 7 bits (`reduce_range`): on x86 CPUs without VNNI, ONNX Runtime multiplies uint8 × int8 with
`vpmaddubsw`, whose int16 pair sums saturate for full-range weights (measured: max |Δprob| 0.15 vs 0.036
with reduce_range on a real chest X-ray model). With 7-bit weights one file is correct on every CPU.
See onnxruntime.ai/docs/performance/model-optimizations/quantization.html ("when to use reduce-range").

Instruction sets: int8 runs only where it beats fp32 — x86 with AVX2 (the u8×s8 kernels; faster with
AVX-VNNI / AVX512-VNNI / AMX-INT8) or 64-bit ARM with the dot-product extension. Elsewhere ONNX Runtime
falls back to generic code slower than fp32, so medres refuses instead (`INT8_UNSUPPORTED`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from medres.errors import ExportParityError, MedresError, UsageError
from medres.files import atomic_path
from medres.model import ModelMeta, load_checkpoint
from medres.onnx import max_prob_diff, model_props, require_onnxruntime, set_onnx_meta, write_onnx

# max |Δprob| between int8 and fp32 on the calibration images above which export fails: a broken
# quantization, not a rounding difference (real models measured 0.02–0.04; docs/benchmarks.md).
INT8_PARITY_LIMIT = 0.1
# The head (pooling, flatten, classifier) stays fp32: 0.01% of the compute, and the pooled features
# the OOD gate measures distances on keep their precision (quantized to 8 bits, in-distribution
# Mahalanobis distances of a small model grew ~50×; averaging dequantized maps in fp32 does not).
HEAD_OPS = ("GlobalAveragePool", "Flatten", "Gemm")
# When parity fails, the layers whose activations quantize worst (lowest signal-to-quantization-noise
# ratio of the QDQ pair, ONNX Runtime's qdq_loss_debug) are kept in fp32 and the model is quantized
# again: EXCLUDE_PER_ROUND more each round, at most EXCLUDE_ROUNDS rounds; then the error names them.
EXCLUDE_PER_ROUND = 4
EXCLUDE_ROUNDS = 2
SCAN_IMAGES = 8


# --- calibration images ----------------------------------------------------------------------------
def calibration_files(checkpoint: Path, source: str | Path | None, count: int) -> tuple[list, str]:
    """`count` files spread evenly over the calibration source: a folder, file or manifest CSV as given,
    or by default the validation split of the checkpoint's own run (splits.csv + config.yaml beside it)."""
    from medres.scoring import InputFile, discover

    if source is not None:
        files, described = discover([source]), str(source)
    else:
        from medres.run import RunDir, split_rows

        try:
            run = RunDir.open(checkpoint.parent)
        except UsageError:
            raise UsageError(f"{checkpoint}: no run folder beside it (splits.csv, config.yaml) to take validation images from; pass --calibration FOLDER_OR_MANIFEST") from None
        manifest = run.manifest()
        files = []
        for i in split_rows(manifest, "val"):
            try:
                files.append(InputFile(str(manifest.absolute(i)), manifest.frame["path"].iloc[i]))
            except MedresError as err:
                files.append(InputFile("", manifest.frame["path"].iloc[i], err.one_line()))
        files.sort(key=lambda f: f.shown)
        described = f"{run.path('splits.csv')} (split val)"
    files = [f for f in files if not f.error]
    if not files:
        raise UsageError(f"no calibration images in {described}")
    step = max(1, len(files) // count)
    return files[::step][:count], described


def _calibration_pixels(files: list, meta: ModelMeta) -> tuple[np.ndarray, list[str]]:
    from medres.io import PreprocessSpec
    from medres.scoring import decoded_stream, default_workers

    good = [d for d in decoded_stream(files, spec=PreprocessSpec.from_dict(meta.preprocess), workers=default_workers()) if d.ok]
    if not good:
        raise UsageError("none of the calibration images could be decoded")
    return np.stack([d.pixels for d in good]), [d.file.shown for d in good]


# --- export -----------------------------------------------------------------------------------------
def export_int8(checkpoint: str | Path, out: str | Path, *, calibration: str | Path | None = None, count: int = 200) -> dict:
    """Quantize a checkpoint to a static int8 ONNX model calibrated on `count` validation images."""
    require_onnxruntime("--quantize int8")
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from medres.inference import normalise

    checkpoint, out = Path(checkpoint), Path(out)
    model, meta = load_checkpoint(checkpoint)
    files, described = calibration_files(checkpoint, calibration, count)
    pixels, shown = _calibration_pixels(files, meta)
    x = normalise(torch.from_numpy(pixels), meta.mean, meta.std, meta.in_channels).numpy()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([x[i : i + 16] for i in range(0, len(x), 16)])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"image": b}

    settings = {"format": "QDQ", "weights": "int8 per-channel symmetric, 7-bit (reduce_range)", "activations": "uint8 asymmetric", "fp32": "pooling and classifier head",
                "calibration_method": "MinMax", "onnxruntime": ort.__version__}
    record = {"source": described, "count": len(shown), "files": shown, "files_sha256": hashlib.sha256("\n".join(shown).encode()).hexdigest()}
    with tempfile.TemporaryDirectory(prefix="medres-int8-") as tmp:
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        write_onnx(model, meta, fp32)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        head = [n.name for n in graph.node if n.op_type in HEAD_OPS]
        excluded: list[str] = []  # ONNX node names kept in fp32 after a failed parity check
        kept: dict[str, float] = {}  # their layers (torch module paths) and SQNR in dB
        with atomic_path(out) as dst:
            for round_ in range(EXCLUDE_ROUNDS + 1):
                quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                per_channel=True, reduce_range=True, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head + excluded)
                # Parity on the calibration images: int8 vs the torch fp32 model (onnx.max_prob_diff, as export's).
                parity, mean_diff = max_prob_diff(model, meta, dst, x, with_mean=True)
                if parity <= INT8_PARITY_LIMIT:
                    break
                fragile = [f for f in fragile_layers(pre, dst, x[:SCAN_IMAGES], Path(tmp)) if f["layer"] not in kept]
                if round_ == EXCLUDE_ROUNDS or not fragile:
                    shown = ", ".join(f"{f['layer']} {f['sqnr_db']:.1f} dB" for f in fragile[:EXCLUDE_PER_ROUND])
                    also = f" with {len(kept)} layers kept in fp32 ({', '.join(kept)})" if kept else ""
                    raise ExportParityError(f"int8 parity check failed: max |Δprob| = {parity:.3f} > {INT8_PARITY_LIMIT:g} on the {len(x)} calibration images{also}; "
                                            f"the layers that quantize worst (SQNR, lower is worse): {shown}")
                for f in fragile[:EXCLUDE_PER_ROUND]:
                    kept[f["layer"]] = f["sqnr_db"]
                    excluded += f["nodes"]
            if kept:
                settings["fp32"] += f"; {len(kept)} layers that quantized worst (sensitivity scan, SQNR dB): " + ", ".join(f"{k} {v:.1f}" for k, v in kept.items())
            settings["kept_fp32"] = kept
            set_onnx_meta(dst, {**model_props(model, meta), "medres.precision": "int8", "medres.quantization": json.dumps(settings), "medres.calibration": json.dumps(record)})
            session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
            outs = [session.run(["features"], {"image": x[i : i + 32]}) for i in range(0, len(x), 32)]
            gate = _int8_gate(checkpoint, meta, np.concatenate([o[0] for o in outs]))
            if gate:
                set_onnx_meta(dst, {"medres.ood": json.dumps(gate)}, replace=False)
    return {"out": str(out), "precision": "int8", "calibration": {k: v for k, v in record.items() if k != "files"}, "max_abs_prob_diff": parity, "ood": gate,
            "mean_abs_prob_diff": mean_diff, "quantization": settings}


def fragile_layers(float_model: Path, qdq_model: Path, x: np.ndarray, tmp: Path) -> list[dict]:
    """{"layer", "sqnr_db", "nodes"} of every quantized activation, worst first: the signal-to-quantization-
    noise ratio between the tensor and its quantize→dequantize copy inside the int8 model (ONNX Runtime's
    qdq_loss_debug), on the images `x`. A low ratio means the calibrated range represents that layer's
    activations badly (outliers stretching a min/max range); those are the layers to keep in fp32. The
    node is the one producing the tensor in `float_model` (a Conv, or the Relu/Add after it)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_signal_to_quantization_noice_ratio as sqnr, create_activation_matching,
                                                          modify_model_output_intermediate_tensors)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([x])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"image": b}

    augmented = tmp / "scan.onnx"
    modify_model_output_intermediate_tensors(str(qdq_model), str(augmented))
    # (compute_activation_error would also want the float model's activations: 1.32 fails without them)
    # The quantizer folds each Relu into the Conv before it (the uint8 range clamps at 0): the tensor the
    # int8 model computes under a Relu's name is the Conv's output, so it is compared after the Relu.
    pairs = create_activation_matching(collect_activations(str(augmented), Reader()))
    graph = onnx.load(str(float_model)).graph
    nodes = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    scored = []
    for name, m in pairs.items():
        if name not in nodes or not m.get("pre_qdq") or not m.get("post_qdq"):
            continue
        node = nodes[name]
        pre = [np.maximum(a, 0) for a in m["pre_qdq"]] if node.op_type == "Relu" else m["pre_qdq"]
        err = float(sqnr(pre, m["post_qdq"]))
        if np.isfinite(err):
            # Kept in fp32 so that this tensor is never quantized: its producer (and a Relu's Conv with
            # it) and every node that reads it (each would quantize its input to the same range).
            keep = [node.name] + ([nodes[node.input[0]].name] if node.op_type == "Relu" and node.input[0] in nodes else []) + consumers.get(name, [])
            scored.append({"layer": _layer_name(node.name), "sqnr_db": round(err, 1), "nodes": keep})
    return sorted(scored, key=lambda d: d["sqnr_db"])


def _layer_name(node: str) -> str:
    """'/layer1/layer1.0/conv3/Conv' → 'layer1.0.conv3' (the torch module path)."""
    parts = node.strip("/").split("/")
    return ".".join(parts[1:-1]) or parts[0]


def _int8_gate(checkpoint: Path, meta: ModelMeta, features: np.ndarray) -> dict | None:
    """The OOD threshold refitted for the int8 model: the same quantile of the calibration (validation)
    images' scores, now on the int8 features. Quantization noise moves every Mahalanobis distance
    (measured: ~50× for a small model whose features barely vary), so the fp32 threshold would flag
    in-distribution images; the detector's means and precision stay those fitted in fp32."""
    from medres.calibration import load_detector

    detector = load_detector(checkpoint, meta)
    if detector is None:
        return None
    return {"threshold": float(np.quantile(detector.score(features), detector.quantile)), "quantile": detector.quantile, "n": len(features), "fp32_threshold": detector.threshold}


