"""Everything ONNX in one room: writing the fp32 graph (and the metadata every medres ONNX file
carries), reading that metadata back, refusing a file made from other weights, the CPU instruction
sets int8 needs, and `OnnxPredictor` — the `Predictor` interface over an ONNX Runtime session.
`export.py` (fp32 files), `quantize.py` (int8 files) and `scoring.py` (scoring with them) call it;
it calls none of them, so there is no import circle."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from medres.errors import Int8Unsupported, MedresError, UsageError
from medres.inference import normalise, output_probs
from medres.model import ModelMeta, ResNet50

INT8_SUFFIX = ".int8.onnx"
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


def require_openvino(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("onnx") is None:
        raise UsageError(f"{what} needs OpenVINO: pip install 'medres[openvino]'")


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


# --- writing and reading ------------------------------------------------------------------------------
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
    set_onnx_meta(path, model_props(model, meta))


def openvino_graph(model, meta) -> Path | None:
    """The fp32 ONNX graph OpenVINO compiles for a checkpoint, made once per set of weights and kept
    beside the image stores (`<store dir>/openvino-graphs/`, keyed by the weights' digest, the input
    size and torch's version): exporting it takes ≈ 2 s, most of a 600-file run's start-up on the
    OpenVINO backend. None where that folder cannot be written (the caller makes a temporary graph)."""
    from medres.data.store import default_store_dir
    from medres.files import atomic_path

    key = f"{weights_digest(model)[:32]}-{meta.in_channels}x{meta.preprocess['image_size']}-torch{torch.__version__.split('+')[0]}"
    graph = default_store_dir() / "openvino-graphs" / f"{key}.onnx"
    if graph.is_file():
        return graph
    try:
        with atomic_path(graph, durable=False) as tmp:
            write_onnx(model, meta, tmp)
    except (OSError, MedresError):
        return None
    return graph


def model_props(model: ResNet50, meta: ModelMeta) -> dict[str, str]:
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


def max_prob_diff(model: ResNet50, meta: ModelMeta, onnx_path: str | Path, x: np.ndarray, *, with_mean: bool = False):
    """The one parity check of an ONNX file (fp32 export, int8 quantization): max |Δprob| between ONNX
    Runtime and the torch fp32 model on the normalised batch `x` (B, C, S, S); with `with_mean`,
    (max, mean)."""
    import onnxruntime as ort

    from medres.inference import to_probs

    with torch.inference_mode():
        ref = to_probs(model.float().eval()(torch.from_numpy(x)), meta.task, meta.temperature)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = to_probs(np.concatenate([session.run(["logits"], {"image": x[i : i + 32]})[0] for i in range(0, len(x), 32)]), meta.task, meta.temperature)
    diff = np.abs(ref - got)
    return (float(diff.max()), float(diff.mean())) if with_mean else float(diff.max())


# --- scoring ----------------------------------------------------------------------------------------
class _GraphPredictor:
    """What the ONNX Runtime and OpenVINO predictors share: medres's normalisation before the graph,
    calibrated probabilities after it, and the three outputs (logits, features, maps) by name."""

    meta: ModelMeta
    outputs: list[str]

    def _run(self, pixels: torch.Tensor, names: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def _input(self, pixels: torch.Tensor) -> np.ndarray:
        return normalise(pixels.float(), self.meta.mean, self.meta.std, self.meta.in_channels).contiguous().numpy()

    def logits(self, pixels: torch.Tensor) -> np.ndarray:
        return self._run(pixels, self.outputs[:1])[0]

    def logits_and_features(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        if "features" not in self.outputs:
            return self.logits(pixels), None
        logits, features = self._run(pixels, [self.outputs[0], "features"])
        return logits, features

    def maps(self, pixels: torch.Tensor) -> np.ndarray:
        """layer4 feature maps (B, 2048, h, w) for Grad-CAM (`cam.cam_from_features`)."""
        if "maps" not in self.outputs:
            raise UsageError("this ONNX file has no layer4 maps output (exported by an older medres): export it again for report --precision int8")
        return self._run(pixels, ["maps"])[0]

    def probs(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        return output_probs(logits, self.meta.task, self.meta.temperature if calibrated else 1.0)


def _ood_threshold(props: dict[str, str]) -> float | None:
    # int8 files carry an OOD threshold refitted on their own features (quantize._int8_gate).
    return json.loads(props["medres.ood"])["threshold"] if "medres.ood" in props else None


class OnnxPredictor(_GraphPredictor):
    """The `Predictor` interface over an ONNX Runtime session: `medres export` files (fp32, or int8 from
    `--quantize int8`), with the checkpoint's own normalisation and calibration. Files exported before
    the `features` output existed score without the OOD gate (features None)."""

    def __init__(self, path, meta: ModelMeta, *, precision: str = "fp32"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads torch would use for the model
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.meta = meta
        self.device = torch.device("cpu")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.input = self.session.get_inputs()[0].name
        self.dtype = precision  # what speed reports print
        self.ood_threshold = _ood_threshold(self.session.get_modelmeta().custom_metadata_map)

    def _run(self, pixels: torch.Tensor, names: list[str]) -> list[np.ndarray]:
        return self.session.run(names, {self.input: self._input(pixels)})


class OpenVinoPredictor(_GraphPredictor):
    """The same interface over OpenVINO's CPU plugin (`--backend openvino`), which compiles the graph for
    the instruction sets it finds (AVX2, AVX-512, VNNI, AMX) itself. `inference` is the precision of the
    compute: "bf16" or "f32" (OpenVINO's INFERENCE_PRECISION_HINT; an int8 QDQ file runs its quantised
    layers in int8 either way). Its CPU plugin would choose bf16 on bf16 CPUs by itself, so the hint is
    always set: `--precision fp32` must mean fp32. `props`: the file's medres metadata, as
    `check_onnx_matches` returned it (empty for the graph made from the checkpoint itself): passing it
    in spares importing `onnx` (≈ 0.6 s) to read it again."""

    def __init__(self, path, meta: ModelMeta, *, inference: str = "f32", props: dict[str, str] | None = None):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": inference, "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.meta = meta
        self.device = torch.device("cpu")
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]
        props = read_onnx_meta(path) if props is None else props
        self.dtype = "int8" if props.get("medres.precision") == "int8" else ("bf16" if inference == "bf16" else "fp32")
        self.ood_threshold = _ood_threshold(props)

    def _run(self, pixels: torch.Tensor, names: list[str]) -> list[np.ndarray]:
        result = self.request.infer({0: self._input(pixels)}, share_inputs=True)
        return [np.array(result[self.compiled.output(name)], copy=True) for name in names]
