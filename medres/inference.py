"""Device, precision and the one place where model inputs are normalised and outputs turned into
probabilities. Used by train (validation), evaluate, predict and report alike."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from medres.model import ModelMeta, ResNet50


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """Native bf16 (AVX-512 BF16 or AMX). MEDRES_NO_BF16=1 answers no: `auto` then runs fp32 as on a CPU
    without it (to compare with an fp32-only machine; how the test suite is timed for one)."""
    if os.environ.get("MEDRES_NO_BF16", "") not in ("", "0"):
        return False
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """`auto` → bf16 on CPUs with native bf16 and on CUDA GPUs that support it, fp16 on older GPUs;
    None means plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def normalise(x: torch.Tensor, mean: list[float], std: list[float], in_channels: int) -> torch.Tensor:
    """(B, H, W) in [0, 1] → (B, C, H, W) normalised; grey repeated for 3 channels."""
    x = x.unsqueeze(1)
    if in_channels == 3:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def to_probs(logits: torch.Tensor | np.ndarray, task: str, temperature: float = 1.0) -> np.ndarray:
    z = torch.as_tensor(np.asarray(logits, dtype=np.float32) if not isinstance(logits, torch.Tensor) else logits.float()) / temperature
    p = torch.softmax(z, dim=1) if task == "multiclass" else torch.sigmoid(z)
    return p.cpu().numpy()


PROB_DECIMALS = 6  # what predict and report write; their labels and sets are decided on these values


def output_probs(logits: torch.Tensor | np.ndarray, task: str, temperature: float = 1.0) -> np.ndarray:
    """Calibrated probabilities as `predict`/`report` write them: rounded to PROB_DECIMALS decimals
    (float64, each the value a CSV reader parses from the written text), so the predicted labels and
    the conformal sets in an output table are recomputable from its own prob_* columns, exactly."""
    return round_probs(to_probs(logits, task, temperature))


def round_probs(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p)
    return np.array([float(f"{v:.{PROB_DECIMALS}f}") for v in p.ravel()], dtype=np.float64).reshape(p.shape)


@dataclass
class Predictor:
    """Batched scoring with the checkpoint's own normalisation, calibration and precision."""

    model: ResNet50
    meta: ModelMeta
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool = True

    @classmethod
    def create(cls, model: ResNet50, meta: ModelMeta, *, device: str = "auto", precision: str = "auto") -> "Predictor":
        dev = resolve_device(device)
        model = model.to(dev).eval()
        if dev.type != "mps":
            model = model.to(memory_format=torch.channels_last)
        return cls(model, meta, dev, resolve_precision(precision, dev))

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalise(pixels.to(self.device, non_blocking=True).float(), self.meta.mean, self.meta.std, self.meta.in_channels)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> np.ndarray:
        x = self.prepare(pixels)
        with autocast(self.device, self.dtype):
            out = self.model(x)
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def logits_and_features(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the penultimate (pooled 2048-d) features of one forward pass (the OOD gate's input)."""
        x = self.prepare(pixels)
        with autocast(self.device, self.dtype):
            out, pooled = self.model.forward_with_features(x)
        return out.float().cpu().numpy(), pooled.float().cpu().numpy()

    def features_of(self, batches: Iterable[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Batches of pixels → ((N, C) logits, (N, 2048) features)."""
        pairs = [self.logits_and_features(b) for b in batches]
        if not pairs:
            return np.zeros((0, len(self.meta.classes)), np.float32), np.zeros((0, 2048), np.float32)
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])

    def logits_batched(self, pixels: torch.Tensor, batch_size: int) -> np.ndarray:
        """(N, H, W) → (N, C) logits, `batch_size` images per forward pass."""
        return self.logits_of(pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size))

    def logits_of(self, batches: Iterable[torch.Tensor]) -> np.ndarray:
        """Batches of (B, H, W) pixels (e.g. streamed from the image store) → (N, C) logits."""
        out = [self.logits(b) for b in batches]
        return np.concatenate(out) if out else np.zeros((0, len(self.meta.classes)), dtype=np.float32)

    def probs(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        return output_probs(logits, self.meta.task, self.meta.temperature if calibrated else 1.0)
