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
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from medres.errors import ExportParityError, Int8Unsupported, MedresError, UsageError
from medres.files import atomic_path
from medres.model import ModelMeta, ResNet50, load_checkpoint

INT8_SUFFIX = ".int8.onnx"
# max |Δprob| between int8 and fp32 on the calibration images above which export fails: a broken
# quantization, not a rounding difference (real models measured 0.02–0.04; docs/benchmarks.md).
INT8_PARITY_LIMIT = 0.1
# The head (pooling, flatten, classifier) stays fp32: 0.01% of the compute, and the pooled features
# the OOD gate measures distances on keep their precision (quantized to 8 bits, in-distribution
# Mahalanobis distances of a small model grew ~50×; averaging dequantized maps in fp32 does not).
HEAD_OPS = ("GlobalAveragePool", "Flatten", "Gemm")
FAST_INT8 = ("amx_int8", "avx512_vnni", "avx_vnni", "avx2", "asimddp")  # best first


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo: `flags` on x86, `Features` on ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def int8_isa(flags: set[str] | None = None) -> str | None:
    """The best int8 instruction set this CPU offers ONNX Runtime, or None when int8 would be slow.
    Apple silicon (no /proc/cpuinfo) always has the ARM dot-product instructions."""
    flags = cpu_flags() if flags is None else flags
    if not flags and platform.system() == "Darwin" and platform.machine() == "arm64":
        return "asimddp"
    return next((f for f in FAST_INT8 if f in flags), None)


def require_int8_cpu(flags: set[str] | None = None) -> str:
    isa = int8_isa(flags)
    if isa is None:
        raise Int8Unsupported(
            f"--precision int8 needs a CPU with AVX2, AVX-VNNI, AVX512-VNNI or AMX-INT8 (x86) or the ARM dot-product extension; "
            f"this CPU ({platform.processor() or platform.machine()}) has none, and int8 would run slower than fp32 here: use --precision fp32"
        )
    return isa


def require_onnxruntime(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise UsageError(f"{what} needs ONNX Runtime: pip install 'medres[onnx]'")


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (names, shapes, bytes): the same weights give the same digest
    whatever `medres calibrate` later changes in the checkpoint's metadata."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_int8_path(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".safetensors") + INT8_SUFFIX)


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
class _ExportGraph(torch.nn.Module):
    """ONNX graph with three outputs: logits, the pooled features of the OOD gate, and the layer4
    feature maps (Grad-CAM's activations: `report --precision int8` runs only the head in torch)."""

    def __init__(self, model: ResNet50):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps = self.model.forward_features(x)
        pooled = self.model.pooled(maps)
        return self.model.classify(pooled), pooled, maps


def write_onnx(model: ResNet50, meta: ModelMeta, path: Path, *, opset: int = 17) -> None:
    """fp32 ONNX (input `image`: normalised (B, C, S, S); outputs `logits`, `features`, `maps`) with medres's
    metadata in the model's metadata_props."""
    size = int(meta.preprocess["image_size"])
    torch.onnx.export(
        _ExportGraph(model.float().eval()).eval(), (torch.zeros(2, meta.in_channels, size, size),), str(path), input_names=["image"], output_names=["logits", "features", "maps"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}, "maps": {0: "batch"}}, opset_version=opset, dynamo=False,
    )
    set_onnx_meta(path, _model_props(model, meta))


def _model_props(model: ResNet50, meta: ModelMeta) -> dict[str, str]:
    return {"medres": json.dumps(asdict(meta)), "medres.weights_digest": weights_digest(model),
            "input": "image: (B, C, S, S) = (pixels in [0,1] - mean) / std",
            "output": "logits (apply softmax (multiclass) or sigmoid (multilabel) after dividing by temperature); features: pooled 2048-d; maps: layer4 (B, 2048, S/32, S/32)"}


def set_onnx_meta(path: str | Path, props: dict[str, str], *, replace: bool = True) -> None:
    """Write `props` into the ONNX file's metadata_props (all of them replaced unless `replace` is False)."""
    import onnx

    proto = onnx.load(str(path))
    if replace:
        del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def export_int8(checkpoint: str | Path, out: str | Path, *, calibration: str | Path | None = None, count: int = 200) -> dict:
    """Quantize a checkpoint to a static int8 ONNX model calibrated on `count` validation images."""
    require_onnxruntime("--quantize int8")
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from medres.inference import normalise, to_probs

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
        head = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in HEAD_OPS]
        with atomic_path(out) as dst:
            quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=True, reduce_range=True, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head)
            set_onnx_meta(dst, {**_model_props(model, meta), "medres.precision": "int8", "medres.quantization": json.dumps(settings), "medres.calibration": json.dumps(record)})
            # Parity on the calibration images: int8 vs the torch fp32 model.
            with torch.inference_mode():
                ref = to_probs(model.float().eval()(torch.from_numpy(x)), meta.task, meta.temperature)
            session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
            outs = [session.run(["logits", "features"], {"image": x[i : i + 32]}) for i in range(0, len(x), 32)]
            got = to_probs(np.concatenate([o[0] for o in outs]), meta.task, meta.temperature)
            parity = float(np.abs(ref - got).max())
            if parity > INT8_PARITY_LIMIT:
                raise ExportParityError(f"int8 parity check failed: max |Δprob| = {parity:.3f} > {INT8_PARITY_LIMIT:g} on the {len(x)} calibration images")
            gate = _int8_gate(checkpoint, meta, np.concatenate([o[1] for o in outs]))
            if gate:
                set_onnx_meta(dst, {"medres.ood": json.dumps(gate)}, replace=False)
    return {"out": str(out), "precision": "int8", "calibration": {k: v for k, v in record.items() if k != "files"}, "max_abs_prob_diff": parity, "ood": gate,
            "mean_abs_prob_diff": float(np.abs(ref - got).mean()), "quantization": settings}


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


def read_onnx_meta(path: str | Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def check_onnx_matches(path: str | Path, model: ResNet50, *, want_int8: bool) -> dict[str, str]:
    """Refuse an ONNX file made from other weights (or an fp32 file where int8 was asked for)."""
    props = read_onnx_meta(path)
    digest = props.get("medres.weights_digest")
    if digest is not None and digest != weights_digest(model):
        raise UsageError(f"{path}: made from other weights than the checkpoint; export it again from this checkpoint")
    if want_int8 and props.get("medres.precision") != "int8":
        raise UsageError(f"{path}: not an int8 model (make one with medres export --format onnx --quantize int8)")
    return props
