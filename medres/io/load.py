"""The single entry point: sniff the content (not the extension), dispatch, resize, cache."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_has_tag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from medres.errors import DecodeFailed, FileMissing, IngestError, NotAnImage
from medres.io.cache import ImageCache, file_digest
from medres.io.dicom import load_dicom
from medres.io.raster import load_raster
from medres.io.record import LoadedImage, PreprocessSpec, Record
from medres.io.resize import resize_to_square

_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")
# A bare DICOM dataset (no preamble) most often starts with a group 0x0002 or 0x0008 tag, little or big endian.
_BARE_DICOM_START = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
_VRS = frozenset(v.value.encode() for v in VR if len(v.value) == 2)
_VRS_LONG = frozenset(v.value.encode() for v in EXPLICIT_VR_LENGTH_32)  # 2 reserved zero bytes, then a 4-byte length


def _starts_with_element(head: bytes, size: int) -> bool:
    """Does `head` start with a data element (PS3.5 7.1) of a standard group? Explicit VR: a tag with
    an even group 0x0002–0x7FE0 (little or big endian), then a VR name (and, for OB/OW/SQ/UN/UT...,
    two zero bytes). Implicit VR (little endian only): a tag in the DICOM dictionary, then a length
    that fits in the file. A dataset stripped of group 0x0008 starts at 0x0010, 0x0020 or 0x0028."""
    if len(head) < 8:
        return False
    for order in "<>":
        group, element = struct.unpack(order + "HH", head[:4])
        if group % 2 or not 0x0002 <= group <= 0x7FE0:
            continue
        vr = head[4:6]
        if vr in _VRS and (vr not in _VRS_LONG or head[6:8] == b"\0\0"):
            return True
        if order == "<" and dictionary_has_tag(group << 16 | element):
            length = struct.unpack("<I", head[4:8])[0]
            if length == 0xFFFFFFFF or length <= size - 8:
                return True
    return False


def sniff(path: Path) -> str:
    """'dicom', 'dicom-bare', 'raster' or raise NotAnImage. Decided by content only."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
            size = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        raise FileMissing("file not found") from None
    except IsADirectoryError:
        raise NotAnImage("is a directory") from None
    except OSError as exc:
        raise NotAnImage(f"cannot be read ({type(exc).__name__})") from None
    if not head:
        raise NotAnImage("empty file")
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_RASTER_MAGIC):
        return "raster"
    if (head[:2] in _BARE_DICOM_START and len(head) >= 8) or _starts_with_element(head, size):
        return "dicom-bare"
    raise NotAnImage("content is not DICOM, PNG, JPEG, TIFF or BMP")


def decode_file(path: Path, spec: PreprocessSpec, rec: Record, *, frame: int | None = None, reduce: bool = True) -> np.ndarray:
    """File → float32 in [0, 1] (bright = dense), steps in `rec`. With `reduce`, large JPEGs may be
    decoded at 1/2–1/8 scale when the model input is much smaller (`rec.native_size` keeps the size)."""
    kind = sniff(path)
    try:
        if kind == "raster":
            return load_raster(path, rec, max_megapixels=spec.max_megapixels, target_size=spec.image_size if reduce else None)
        return load_dicom(path, rec, voi=spec.voi, max_megapixels=spec.max_megapixels, preamble=(kind == "dicom"), frame=frame)
    except (IngestError, KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 — parser boundary: pydicom converts elements lazily and
        # raises on first access of a malformed one; PIL plugins raise assorted types on hostile bytes.
        raise DecodeFailed(f"malformed {'image' if kind == 'raster' else 'DICOM'} content ({type(exc).__name__})") from None


def load_image(
    path: str | os.PathLike,
    spec: PreprocessSpec | None = None,
    *,
    display_path: str | None = None,
    cache: ImageCache | None = None,
    keep_original: bool = False,
    frame: int | None = None,
    content_digest: str | None = None,
) -> LoadedImage:
    """Load any supported file → `LoadedImage` (model input + record).

    `display_path` is what messages and records call the file (relative to the input root).
    `content_digest` (the file's sha256, when the caller already has it) saves hashing it again.
    Raises an `IngestError` subclass with a stable code; nothing else escapes for bad content.
    """
    spec = spec or PreprocessSpec()
    path = Path(path)
    shown = display_path if display_path is not None else path.name
    key = None
    try:
        if cache is not None and not keep_original and frame is None:
            key = ImageCache.key(content_digest or file_digest(path), spec.digest())
            hit = cache.get(key)
            if hit is not None:
                arr, d = hit
                d["path"] = shown
                rec = Record.from_dict(d)
                rec.cached = True
                return LoadedImage(arr, rec)
        rec = Record(path=shown)
        x = decode_file(path, spec, rec, frame=frame, reduce=not keep_original)  # reports show full resolution
        native = tuple(rec.native_size) if rec.native_size else x.shape
        pixels, geometry = resize_to_square(x, spec.image_size, spec.resize, original_hw=native)
        rec.geometry = geometry
        rec.step(f"resize: {spec.resize} {native[0]}x{native[1]} → {spec.image_size}x{spec.image_size}")
        if key is not None:
            cache.put(key, pixels, rec)
        if keep_original and x.dtype == np.uint8:
            x = x.astype(np.float32) * np.float32(1 / 255)
        return LoadedImage(pixels, rec, original=x if keep_original else None)
    except FileNotFoundError:
        raise FileMissing("file not found", path=shown) from None
    except IngestError as err:
        raise err.with_path(shown)
    except MemoryError:
        raise NotAnImage("not enough memory to decode", path=shown) from None
