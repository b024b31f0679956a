"""Resize to the model's square input with antialiasing, recording the geometry so heatmaps map back."""

from __future__ import annotations

import numpy as np
from PIL import Image

from medres.io.record import Geometry


def _resample(x: np.ndarray, height: int, width: int) -> np.ndarray:
    if x.dtype == np.uint8:  # 8-bit sources: resample in 8 bits, then scale (error ≤ 0.5/255)
        img = Image.fromarray(x, mode="L")
        if x.shape != (height, width):
            img = img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    if x.shape == (height, width):
        return x.astype(np.float32, copy=False)
    # PIL's "F" resize widens the filter support by the scale factor: antialiased downsampling.
    img = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32), mode="F")
    out = img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(out, dtype=np.float32)


def resize_to_square(x: np.ndarray, size: int, mode: str, *, original_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, Geometry]:
    """(H, W) → (size, size). `original_hw` is the file's native size when `x` was decoded reduced."""
    h, w = x.shape
    oh, ow = original_hw or (h, w)
    if mode == "stretch":
        nh, nw = size, size
    elif mode == "crop":
        s = size / min(oh, ow)
        nh, nw = max(size, round(oh * s)), max(size, round(ow * s))
    elif mode == "letterbox":
        s = size / max(oh, ow)
        nh, nw = max(1, round(oh * s)), max(1, round(ow * s))
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    resized = _resample(x, nh, nw)
    out = np.zeros((size, size), dtype=np.float32)
    oy, ox = (size - nh) // 2, (size - nw) // 2  # negative for crop: the crop origin
    sy0, sx0 = max(0, -oy), max(0, -ox)
    dy0, dx0 = max(0, oy), max(0, ox)
    ch, cw = min(nh - sy0, size - dy0), min(nw - sx0, size - dx0)
    out[dy0 : dy0 + ch, dx0 : dx0 + cw] = resized[sy0 : sy0 + ch, sx0 : sx0 + cw]
    geom = Geometry(
        original_height=oh, original_width=ow, size=size, mode=mode,
        scale_y=nh / oh, scale_x=nw / ow, offset_y=float(oy), offset_x=float(ox),
    )
    return out, geom


def fit_within(x: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """(H, W) image → float32 no larger than `max_side` a side (antialiased), and the scale used."""
    h, w = x.shape
    s = min(1.0, max_side / max(h, w))
    if x.dtype == np.uint8:
        x = x.astype(np.float32) * np.float32(1 / 255)
    if s < 1.0:
        img = Image.fromarray(x.astype(np.float32, copy=False), mode="F").resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.float32), s
    return x.astype(np.float32, copy=False), 1.0
