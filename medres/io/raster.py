"""PNG / JPEG / TIFF / BMP → float32 grey in [0, 1], with EXIF orientation and every conversion recorded."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medres.errors import DecodeFailed, DegenerateImage, ImageTooLarge, NotAnImage, PixelDataShort
from medres.io.record import Record

SUPPORTED = {"PNG", "JPEG", "TIFF", "BMP", "MPO"}
# BT.601 luma, the same weights PIL uses for RGB → L.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# medres does its own pixel-count check against data.max_megapixels before decoding.
Image.MAX_IMAGE_PIXELS = None


def load_raster(path: Path, rec: Record, *, max_megapixels: float, target_size: int | None = None) -> np.ndarray:
    """→ (H, W) grey: uint8 for 8-bit sources (value / 255 is the intensity), else float32 in [0, 1]."""
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise NotAnImage(f"not a readable image ({type(exc).__name__})") from None
    with img:
        fmt = (img.format or "").upper()
        rec.format = fmt.lower()
        if fmt not in SUPPORTED:
            raise NotAnImage(f"image format {fmt or 'unknown'} is not supported (PNG, JPEG, TIFF, BMP)")
        w, h = img.size
        if w <= 0 or h <= 0:
            raise DecodeFailed(f"image size {w}x{h} is invalid")
        if w * h / 1e6 > max_megapixels:
            raise ImageTooLarge(f"{h} x {w} = {w * h / 1e6:.1f} MP exceeds the {max_megapixels:g} MP cap (data.max_megapixels)")
        if getattr(img, "n_frames", 1) > 1:
            rec.warn(f"{img.n_frames} frames: using the first")
        mode = img.mode
        rec.bits_stored = 16 if mode.startswith("I;16") else 8
        # JPEG DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 when the target is much smaller.
        # Orientation and geometry are taken from the full size, so the record stays exact.
        full = (h, w)
        draft_scale = 1
        if fmt == "JPEG" and target_size and min(w, h) >= 2 * target_size:
            requested = (max(target_size, w * target_size // min(w, h)), max(target_size, h * target_size // min(w, h)))
            result = img.draft(img.mode if img.mode in ("L", "RGB") else None, requested)
            if result is not None:
                draft_scale = w // img.size[0] if img.size[0] else 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
                exif_orientation = img.getexif().get(0x0112, 1)
                oriented = ImageOps.exif_transpose(img) if exif_orientation not in (None, 1) else img
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            text = str(exc).lower()
            if "truncated" in text or "broken data" in text or "premature" in text:
                raise PixelDataShort(f"{fmt} data is truncated") from None
            raise DecodeFailed(f"{fmt} could not be decoded ({type(exc).__name__})") from None
        if draft_scale > 1:
            rec.step(f"{fmt} decoded at 1/{draft_scale} scale (DCT scaling) from {full[0]}x{full[1]}")
            # EXIF orientations 5-8 transpose the image: the native size swaps with it.
            rec.native_size = [full[1], full[0]] if exif_orientation in (5, 6, 7, 8) else [full[0], full[1]]
        if exif_orientation not in (None, 1):
            rec.step(f"EXIF orientation {exif_orientation} applied")
        x = _to_grey(oriented, rec)
    if x.dtype != np.uint8 and not np.isfinite(x).all():
        raise DecodeFailed("non-finite pixel values")
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        raise DegenerateImage(f"constant image (every pixel is {lo:g})")
    return x


def _to_grey(img: Image.Image, rec: Record) -> np.ndarray:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        rec.step("palette expanded")
        mode = img.mode
    if mode in ("1", "L"):
        # Kept as uint8: the resize runs on 8-bit data (3-4x faster) and divides by 255 after.
        rec.step(f"{mode}: 8-bit grey / 255")
        return np.asarray(img.convert("L") if mode == "1" else img, dtype=np.uint8)
    if mode in ("LA", "RGBA", "PA"):
        arr = np.asarray(img, dtype=np.float32) / 255.0
        alpha = arr[..., -1:]
        colour = arr[..., :-1]
        grey = colour[..., 0] if colour.shape[-1] == 1 else colour @ LUMA
        rec.step(f"{mode}: alpha composited over black, {'RGB to grey (BT.601 luma)' if colour.shape[-1] == 3 else 'grey'}")
        return (grey * alpha[..., 0]).astype(np.float32)
    if mode in ("RGB", "YCbCr", "CMYK", "LAB", "HSV"):
        rec.step(f"{mode}: converted to grey (BT.601 luma), 8-bit / 255")
        return np.asarray(img.convert("RGB").convert("L"), dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float32)
        if arr.ndim == 3:
            arr = arr[..., 0]
        lo, hi = float(arr.min()), float(arr.max())
        if hi == lo:
            raise DegenerateImage(f"constant image (every pixel is {lo:g})")
        # The significant bit depth of 16-bit PNGs is unknown (12-bit data is common): use the content range.
        rec.step(f"{mode}: {'16' if mode.startswith('I;16') else '32'}-bit grey, min–max scaled ({lo:g} to {hi:g})")
        return ((arr - lo) / (hi - lo)).astype(np.float32)
    raise NotAnImage(f"image mode {mode} is not supported")
