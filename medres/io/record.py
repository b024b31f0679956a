"""What ingestion did to a file: the spec it followed, the steps, the geometry. No identifiers."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np


def clean_code_string(value) -> str | None:
    """A DICOM Code String (CS) value, normalised: upper case, only A–Z 0–9 space and underscore, at
    most 16 characters (PS3.5 6.2). Anything else in the tag is dropped, so a malformed header can
    never carry free text (names, dates) into outputs."""
    if value is None:
        return None
    if not isinstance(value, str):  # a multi-valued tag: its first value
        value = value[0] if len(value) else ""
    text = re.sub(r"[^A-Z0-9 _]", "", str(value).upper()).strip()[:16].strip()
    return text or None


ResizeMode = Literal["letterbox", "crop", "stretch"]


# The technical header columns of predict and report, in order (`Record.header()`).
HEADER_COLUMNS = ("source_format", "modality", "body_part", "view", "laterality")

@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that decides the model input for a file; stored in checkpoints, hashed for the cache."""

    image_size: int = 224
    resize: ResizeMode = "letterbox"
    voi: str | int = "auto"
    max_megapixels: float = 100.0

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True) + "|pipeline-v1"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        return cls(**{k: d[k] for k in ("image_size", "resize", "voi", "max_megapixels") if k in d})


@dataclass
class Geometry:
    """Maps model-input pixels back to the original image: model = original * scale + offset.

    `offset_*` is where the original's top-left lands in model space (negative when cropped).
    """

    original_height: int
    original_width: int
    size: int
    mode: str
    scale_y: float
    scale_x: float
    offset_y: float
    offset_x: float

    def model_to_original(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre convention: model (y, x) → original (y, x)."""
        return (y + 0.5 - self.offset_y) / self.scale_y - 0.5, (x + 0.5 - self.offset_x) / self.scale_x - 0.5

    def to_original(self, heat: np.ndarray) -> np.ndarray:
        """Resample a (size, size) model-space map onto the original (H, W) grid; NaN where not seen.

        Bilinear, with edge values held for coordinates past the border (scipy's map_coordinates with
        order=1, mode="nearest"), done separably: the model→original mapping is a per-axis affine map,
        so each output row/column reads the same two input rows/columns (5–10× faster than the general
        per-pixel map_coordinates, which took ~8% of a report's time)."""
        h, w = self.original_height, self.original_width
        gy = (np.arange(h, dtype=np.float64) + 0.5) * self.scale_y + self.offset_y - 0.5
        gx = (np.arange(w, dtype=np.float64) + 0.5) * self.scale_x + self.offset_x - 0.5
        heat = heat.astype(np.float32)
        (y0, y1, fy), (x0, x1, fx) = _linear_taps(gy, heat.shape[0]), _linear_taps(gx, heat.shape[1])
        cols = heat[:, x0] * (1 - fx) + heat[:, x1] * fx  # (size, W)
        out = cols[y0] * (1 - fy)[:, None] + cols[y1] * fy[:, None]  # (H, W)
        # Beyond half a pixel past the canvas the original was never seen by the model (letterbox
        # padding excluded, crop cut-offs): NaN.
        seen = ((gy >= -0.5) & (gy <= heat.shape[0] - 0.5))[:, None] & ((gx >= -0.5) & (gx <= heat.shape[1] - 0.5))[None, :]
        return np.where(seen, out, np.nan).astype(np.float32)


def _linear_taps(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the two neighbours and the weight of the second, coordinates clamped to [0, n-1]."""
    c = np.clip(coords, 0, n - 1)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (c - i0).astype(np.float32)


@dataclass
class Record:
    """The ingestion record of one file. Values only, never patient data."""

    path: str
    format: str = ""
    modality: str | None = None
    body_part: str | None = None  # BodyPartExamined (a Code String: technical, never identifying)
    view: str | None = None  # ViewPosition (PA, AP, LL, ...)
    laterality: str | None = None  # ImageLaterality, else Laterality
    photometric: str | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    signed: bool | None = None
    transfer_syntax: str | None = None
    sop_class: str | None = None
    frames: int = 1
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    geometry: Geometry | None = None
    native_size: list[int] | None = None  # (H, W) of the file when the decoder returned it downscaled
    cached: bool = False

    def step(self, text: str) -> None:
        self.steps.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def header(self) -> dict[str, str]:
        """The technical header columns of predict/report and the input gate (`HEADER_COLUMNS`; empty
        strings for PNG/JPEG)."""
        values = (self.format, self.modality, self.body_part, self.view, self.laterality)
        return {k: v or "" for k, v in zip(HEADER_COLUMNS, values)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        d = dict(d)
        g = d.pop("geometry", None)
        rec = cls(**d)
        rec.geometry = Geometry(**g) if g else None
        return rec


@dataclass
class LoadedImage:
    """Model input (size×size float32 in [0, 1], bright = dense) plus its record.

    `original` (native resolution, same intensity pipeline) is kept only on request (reports).
    """

    pixels: np.ndarray
    record: Record
    original: np.ndarray | None = None
