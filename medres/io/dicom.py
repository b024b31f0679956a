"""DICOM greyscale pipeline, in the standard's order (PS3.3 C.11, PS3.4 N.2):

stored values → Modality LUT Sequence or Rescale Slope/Intercept → VOI LUT Sequence or
Window Center/Width (LINEAR, LINEAR_EXACT, SIGMOID) → MONOCHROME1 inversion → Presentation LUT
Shape INVERSE or Presentation LUT Sequence (P-values). Each step is recorded. The result is float32 in [0, 1] with bright = dense
(MONOCHROME2 convention), never inverted twice.

Decoding uses pydicom 3's pixel backend (`Dataset.pixel_array`), which masks unused high bits,
sign-extends signed data and handles big-endian; compressed syntaxes go through pylibjpeg,
python-gdcm or pyjpegls plugins. LUT sequences use pydicom's `apply_modality_lut`/`apply_voi`
(pydicom.pixels.processing), windowing is done here so the function and values are recorded.

Nothing reaches the console raw: pydicom's warnings become record warnings, and what a C codec
prints while decoding goes into the error's message, or a debug log line when decoding succeeded
(medres/io/capture.py; not captured in multi-threaded processes, see there).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from medres.errors import (
    DecodeFailed,
    DecoderMissing,
    DegenerateImage,
    ImageTooLarge,
    InvalidPixelModule,
    MultiframeUnsupported,
    NoPixelData,
    NotAnImage,
    PixelDataShort,
    UnsupportedPhotometric,
    UnsupportedTransferSyntax,
)
from medres.io.capture import c_stderr_captured, collected_warnings, one_line, sink_active
from medres.io.record import Record, clean_code_string

log = logging.getLogger(__name__)

# pip packages that provide each decoder family (named in DECODER_MISSING messages).
_PACKAGES = {
    "jpeg_ls": "pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)",
    "jpeg2000": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",
    "htj2k": "pylibjpeg pylibjpeg-openjpeg>=2.0",
    "jpeg": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "rle": "pylibjpeg pylibjpeg-rle (or nothing: pydicom decodes RLE natively)",
}
PERCENTILES = (0.5, 99.5)
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


def package_for(uid: UID) -> str:
    name = uid.name.lower()
    if "high-throughput" in name:
        return _PACKAGES["htj2k"]
    if "jpeg-ls" in name:
        return _PACKAGES["jpeg_ls"]
    if "2000" in name:
        return _PACKAGES["jpeg2000"]
    if "jpeg" in name:
        return _PACKAGES["jpeg"]
    if "rle" in name:
        return _PACKAGES["rle"]
    return "pylibjpeg and python-gdcm"


def read_dataset(path: Path, rec: Record, *, preamble: bool) -> pydicom.Dataset:
    """Parse the file. Without a preamble/file meta the dataset is accepted with a warning."""
    try:
        ds = pydicom.dcmread(str(path), force=True)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # noqa: BLE001 — parser boundary: any failure on hostile bytes is "not DICOM"
        raise NotAnImage(f"not a readable DICOM file ({type(exc).__name__})") from None
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not preamble or ts is None:
        rec.warn("no DICOM preamble/file meta: parsed as a bare dataset")
        if ts is None:
            if ds.original_encoding[0] in (True, None):
                ts = pydicom.uid.ImplicitVRLittleEndian
            elif ds.original_encoding[1] is False:
                ts = pydicom.uid.ExplicitVRBigEndian
            else:
                ts = pydicom.uid.ExplicitVRLittleEndian
            ds.file_meta = ds.file_meta if meta is not None else pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ts
    return ds


def _int(ds: pydicom.Dataset, keyword: str, required: bool = True, default: int | None = None) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        if required:
            raise InvalidPixelModule(f"{keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidPixelModule(f"{keyword} is not an integer: {value!r}") from None


def validate_pixel_module(ds: pydicom.Dataset, rec: Record, *, max_megapixels: float, frame: int | None) -> None:
    """Check the Image Pixel module before decoding anything (so nothing huge is allocated)."""
    sop = ds.get("SOPClassUID")
    if sop is not None:
        rec.sop_class = UID(str(sop)).name
    rec.modality = clean_code_string(ds.get("Modality"))
    rec.body_part = clean_code_string(ds.get("BodyPartExamined"))
    rec.view = clean_code_string(ds.get("ViewPosition"))
    rec.laterality = clean_code_string(ds.get("ImageLaterality") or ds.get("Laterality"))
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise InvalidPixelModule("float pixel data is not supported")
        what = f" ({rec.sop_class})" if rec.sop_class else ""
        raise NoPixelData(f"no pixel data{what}")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits_alloc, bits_stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    spp = _int(ds, "SamplesPerPixel", required=False, default=1)
    pixel_rep = _int(ds, "PixelRepresentation", required=False, default=0)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    rec.photometric = photometric or None
    rec.bits_allocated, rec.bits_stored, rec.signed = bits_alloc, bits_stored, bool(pixel_rep)
    if not photometric:
        raise InvalidPixelModule("PhotometricInterpretation is missing")
    if rows <= 0 or cols <= 0:
        raise InvalidPixelModule(f"Rows x Columns must be positive, got {rows} x {cols}")
    if bits_alloc == 1:
        raise InvalidPixelModule("BitsAllocated 1 (binary/segmentation object, not a radiograph)")
    if bits_alloc not in (8, 16, 32):  # 24 is a multiple of 8 but no greyscale image uses it (PS3.5 8.1.1)
        raise InvalidPixelModule(f"BitsAllocated must be 8, 16 or 32, got {bits_alloc}")
    if not 1 <= bits_stored <= bits_alloc:
        raise InvalidPixelModule(f"BitsStored {bits_stored} must be between 1 and BitsAllocated {bits_alloc}")
    if pixel_rep not in (0, 1):
        raise InvalidPixelModule(f"PixelRepresentation must be 0 or 1, got {pixel_rep}")
    high_bit = _int(ds, "HighBit", required=False, default=bits_stored - 1)
    if high_bit != bits_stored - 1:
        rec.warn(f"HighBit {high_bit} != BitsStored-1 ({bits_stored - 1}); using BitsStored")
    if photometric not in GREYSCALE or spp != 1:
        raise UnsupportedPhotometric(
            f"PhotometricInterpretation {photometric} with SamplesPerPixel {spp}: only greyscale "
            "(MONOCHROME1/MONOCHROME2) radiographs are supported"
        )
    frames = _int(ds, "NumberOfFrames", required=False, default=1) or 1
    rec.frames = frames
    if frames > 1 and frame is None:
        raise MultiframeUnsupported(f"multi-frame image ({frames} frames); request one frame explicitly")
    if frame is not None and not 0 <= frame < frames:
        raise MultiframeUnsupported(f"frame {frame} requested, file has {frames}")
    megapixels = rows * cols / 1e6
    if megapixels > max_megapixels:
        raise ImageTooLarge(f"{rows} x {cols} = {megapixels:.1f} MP exceeds the {max_megapixels:g} MP cap (data.max_megapixels)")

    uid = UID(str(ds.file_meta.TransferSyntaxUID))
    rec.transfer_syntax = uid.name if uid.is_valid else str(uid)
    if not uid.is_transfer_syntax:
        raise UnsupportedTransferSyntax(f"unknown transfer syntax {uid}")
    if uid.is_compressed:
        try:
            pydicom.pixels.get_decoder(uid)
        except NotImplementedError:
            raise UnsupportedTransferSyntax(f"no decoder exists for transfer syntax '{uid.name}' ({uid})") from None
        if not _decoder_available(uid):
            raise DecoderMissing(
                f"no installed decoder for '{uid.name}' ({uid}); install: pip install {package_for(uid)}"
            )
        unsupported = _unsupported_by_installed(uid, bits_stored)
        if unsupported:
            raise DecoderMissing(unsupported)
    else:
        expected = math.ceil(rows * cols * frames * spp * bits_alloc / 8)
        got = len(ds.PixelData) if ds.PixelData is not None else 0
        if got < expected:
            raise PixelDataShort(f"pixel data has {got} bytes, {rows}x{cols}x{frames} at {bits_alloc} bits needs {expected}")
    for group in range(0x6000, 0x6020, 2):
        if (group << 16 | 0x3000) in ds:
            rec.warn("overlay planes present: not rendered")
            break
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        rec.warn("BurnedInAnnotation YES: the pixels may contain text")


def _decoder_available(uid: UID) -> bool:
    try:
        return bool(pydicom.pixels.get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def _unsupported_by_installed(uid: UID, bits_stored: int) -> str | None:
    """Why no installed plugin can decode this file although some plugin for its syntax is installed,
    or None. pydicom 3's gdcm and pillow plugins refuse JPEG Extended with BitsStored other than 8
    (12-bit samples); only its pylibjpeg plugin (pylibjpeg-libjpeg) decodes those."""
    if uid != pydicom.uid.JPEGExtended12Bit or bits_stored == 8:
        return None
    decoder = pydicom.pixels.get_decoder(uid)
    if "pylibjpeg" in decoder.available_plugins:
        return None
    plugin = next((m for m in decoder.missing_dependencies if m.startswith("pylibjpeg ")), "pylibjpeg - requires pylibjpeg and pylibjpeg-libjpeg")
    return (
        f"no installed decoder supports {bits_stored}-bit '{uid.name}' ({uid}): the installed plugins "
        f"({', '.join(decoder.available_plugins)}) decode 8-bit samples only, pydicom's plugin {plugin}; "
        "install: pip install pylibjpeg pylibjpeg-libjpeg"
    )


def _reason(exc: BaseException, uid: UID, codec_output: list[str]) -> str:
    """The decoder's own reason on one line: pydicom's per-plugin messages, what the codec printed,
    and the plugins for this syntax that are not installed (pydicom's registry knows their packages)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Unable to decode as exceptions were raised by all available plugins"):
        lines = lines[1:]  # "  gdcm: ...", "  pylibjpeg: ..." follow
    text = one_line("; ".join(lines), 400) or "no message"
    parts = [f"{type(exc).__name__}: {text}"]
    if codec_output:
        parts.append("decoder printed: " + one_line(" / ".join(codec_output), 400))
    if uid.is_compressed:
        try:
            missing = pydicom.pixels.get_decoder(uid).missing_dependencies
        except NotImplementedError:
            missing = []
        if missing:
            parts.append("plugins not installed: " + ", ".join(missing))
    return "; ".join(parts)


def decode(ds: pydicom.Dataset, rec: Record, frame: int | None) -> np.ndarray:
    uid = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        # Only compressed syntaxes run C codecs (gdcm's libjpeg/OpenJPEG print to stderr).
        with c_stderr_captured(enabled=uid.is_compressed) as codec_output:
            if frame is not None:
                ds.pixel_array_options(index=frame)
            arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 — codec boundary: C/Rust plugins raise many types, pyo3's PanicException derives from BaseException
        # DECODER_MISSING is decided by pydicom's decoder-availability API, never by message text: a
        # damaged stream ("SOI marker missing") must be DECODE_FAILED, not advice to pip install.
        if uid.is_compressed and not _decoder_available(uid):
            raise DecoderMissing(f"no working decoder for '{uid.name}'; install: pip install {package_for(uid)}") from None
        if uid.is_compressed and not codec_output and sink_active():
            codec_output = _codec_text_alone(ds, frame)  # in a thread pool: once more, alone, for the codec's reason
        text = str(exc).lower()
        if "shorter" in text or "truncat" in text or "insufficient" in text or "not enough" in text:
            raise PixelDataShort(f"pixel data is shorter than the image module declares ({_reason(exc, uid, codec_output)})") from None
        raise DecodeFailed(f"pixel data could not be decoded ({_reason(exc, uid, codec_output)})") from None
    if codec_output:
        log.debug("%s: the decoder printed while decoding successfully: %s", rec.path, one_line(" / ".join(codec_output), 400))
    if arr.ndim != 2:
        raise UnsupportedPhotometric(f"decoded pixel array has shape {arr.shape}, expected 2-D greyscale")
    rec.step(f"decoded {rec.transfer_syntax}: {arr.shape[0]}x{arr.shape[1]}, {arr.dtype}, {rec.bits_stored} of {rec.bits_allocated} bits{' signed' if rec.signed else ''}")
    return arr


def _codec_text_alone(ds: pydicom.Dataset, frame: int | None) -> list[str]:
    """What the codec prints when the failed decode is run again with file descriptor 2 to itself."""
    with c_stderr_captured(exclusive=True) as lines:
        try:
            if frame is not None:
                ds.pixel_array_options(index=frame)
            ds.pixel_array  # noqa: B018 — decoded for its side effect (the codec's text)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001 — the same codec boundary as decode()
            pass
    return lines


def _floats(value) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        items = list(value)
    else:
        items = [value]
    out = []
    for v in items:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return out


def modality_transform(arr: np.ndarray, ds: pydicom.Dataset, rec: Record) -> np.ndarray:
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        item = ds.ModalityLUTSequence[0]
        try:
            out = pydicom.pixels.apply_modality_lut(arr, ds).astype(np.float32)
        except Exception as exc:  # malformed LUT descriptor/data; pydicom raises several types
            raise InvalidPixelModule(f"Modality LUT Sequence unusable ({type(exc).__name__})") from None
        desc = list(item.get("LUTDescriptor", [])) or ["?"]
        rec.step(f"Modality LUT Sequence: {desc[0]} entries from {desc[1] if len(desc) > 1 else '?'}")
        return out
    slope_values = _floats(ds.get("RescaleSlope"))
    intercept_values = _floats(ds.get("RescaleIntercept"))
    slope = slope_values[0] if slope_values else 1.0
    intercept = intercept_values[0] if intercept_values else 0.0
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise InvalidPixelModule(f"RescaleSlope/Intercept not numeric: {ds.get('RescaleSlope')!r}/{ds.get('RescaleIntercept')!r}")
    out = arr.astype(np.float32)
    if slope == 0:
        raise DegenerateImage("RescaleSlope is 0: every pixel maps to the same value")
    if slope != 1.0 or intercept != 0.0:
        out = out * np.float32(slope) + np.float32(intercept)
        rec.step(f"rescale: value * {slope:g} + {intercept:g}")
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        rec.step("rescale: identity (slope 1, intercept 0)")
    return out


def window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI windowing to [0, 1] (PS3.3 C.11.2.1.2)."""
    c, w = np.float32(center), np.float32(width)
    if function == "LINEAR_EXACT":
        y = (x - c) / w + np.float32(0.5)
    elif function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -80, 80)))
    elif w > 1:  # LINEAR: ((x - (c - 0.5)) / (w - 1)) + 0.5, computed in place
        y = np.subtract(x, c - np.float32(0.5), dtype=np.float32)
        y *= np.float32(1.0) / (w - np.float32(1.0))
        y += np.float32(0.5)
    else:
        y = (x >= c).astype(np.float32)
    return np.clip(y, 0.0, 1.0, out=y if y.dtype == np.float32 else None).astype(np.float32, copy=False)


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        raise DegenerateImage(f"intensity range is empty ({lo:g} to {hi:g})")
    y = np.subtract(x, np.float32(lo), dtype=np.float32)
    y *= np.float32(1.0 / (hi - lo))
    return np.clip(y, 0.0, 1.0, out=y)


def _percentiles(x: np.ndarray, rec: Record, why: str) -> np.ndarray:
    sample = x[:: max(1, x.shape[0] // 512), :: max(1, x.shape[1] // 512)]
    lo, hi = np.percentile(sample, PERCENTILES)
    if not hi > lo:
        lo, hi = float(x.min()), float(x.max())
    rec.step(f"VOI: percentiles {PERCENTILES[0]}–{PERCENTILES[1]} ({lo:g} to {hi:g}){why}")
    return _scale(x, float(lo), float(hi))


def voi_transform(x: np.ndarray, ds: pydicom.Dataset, rec: Record, policy: str | int) -> np.ndarray:
    if policy == "none":
        lo, hi = _stored_range(ds, x)
        rec.step(f"VOI: none; full output range {lo:g} to {hi:g} scaled to [0, 1]")
        return _scale(x, lo, hi)
    if policy == "minmax":
        lo, hi = float(x.min()), float(x.max())
        rec.step(f"VOI: min–max ({lo:g} to {hi:g})")
        return _scale(x, lo, hi)
    index = 0 if policy == "auto" else int(policy)
    explicit = policy != "auto"
    lut_seq = ds.get("VOILUTSequence")
    if lut_seq is not None and len(lut_seq):
        if index < len(lut_seq):
            return _voi_lut(x, ds, rec, index)
        if explicit:
            raise InvalidPixelModule(f"VOI index {index} requested, the VOI LUT Sequence has {len(lut_seq)} items")
    centers, widths = _floats(ds.get("WindowCenter")), _floats(ds.get("WindowWidth"))
    if centers or widths:
        if len(centers) != len(widths):
            rec.warn(f"WindowCenter has {len(centers)} values, WindowWidth {len(widths)}: pairing the first {min(len(centers), len(widths))}")
        pairs = list(zip(centers, widths))
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            rec.warn(f"unknown VOILUTFunction {function!r}: using LINEAR")
            function = "LINEAR"
        candidates = [pairs[index]] if explicit and index < len(pairs) else pairs[index:] if not explicit else []
        if explicit and not candidates:
            raise InvalidPixelModule(f"window index {index} requested, the file has {len(pairs)}")
        for i, (c, w) in enumerate(candidates):
            min_width = 1.0 if function == "LINEAR" else 0.0
            if math.isfinite(c) and math.isfinite(w) and w > min_width:
                rec.step(f"VOI: window {index + i} center {c:g} width {w:g} ({function})")
                out = window(x, c, w, function)
                if float(out.max() - out.min()) < 1e-6:
                    raise DegenerateImage(f"window center {c:g} width {w:g} maps every pixel to one value")
                return out
            if explicit:
                raise InvalidPixelModule(f"WindowWidth {w:g} is invalid for {function} (window {index})")
            rec.warn(f"ignored invalid window center {c:g} width {w:g}")
        return _percentiles(x, rec, " (no valid window in file)")
    if explicit:
        raise InvalidPixelModule(f"VOI index {index} requested, the file has no window or VOI LUT")
    return _percentiles(x, rec, "")


def _voi_lut(x: np.ndarray, ds: pydicom.Dataset, rec: Record, index: int) -> np.ndarray:
    item = ds.VOILUTSequence[index]
    try:
        desc = [int(v) for v in item.LUTDescriptor]
        # LUT lookups index by integer value; the modality output is integral whenever a LUT is used.
        out = pydicom.pixels.apply_voi(np.rint(x).astype(np.int64), ds, index=index).astype(np.float32)
    except Exception as exc:  # malformed LUT; pydicom raises several types
        raise InvalidPixelModule(f"VOI LUT Sequence item {index} unusable ({type(exc).__name__})") from None
    bits = desc[2] if len(desc) > 2 else 16
    top = float(2**bits - 1)
    if out.max() > top:
        top = float(out.max())
    rec.step(f"VOI: LUT Sequence item {index} ({desc[0] or 65536} entries, {bits}-bit output)")
    return _scale(out, 0.0, top)


def _stored_range(ds: pydicom.Dataset, x: np.ndarray) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if "ModalityLUTSequence" in ds:
        return float(x.min()), float(x.max())
    slope = (_floats(ds.get("RescaleSlope")) or [1.0])[0]
    intercept = (_floats(ds.get("RescaleIntercept")) or [0.0])[0]
    a, b = lo * slope + intercept, hi * slope + intercept
    return min(a, b), max(a, b)


def presentation_transform(x: np.ndarray, ds: pydicom.Dataset, rec: Record) -> np.ndarray:
    """MONOCHROME1 → invert once. A Presentation LUT Shape INVERSE on a MONOCHROME1 image is the
    standard's required companion (PS3.3 C.8.11.6.1.2, DX/CR For Presentation), not a second inversion."""
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    mono1 = rec.photometric == "MONOCHROME1"
    if mono1:
        x = 1.0 - x
        note = " (PresentationLUTShape INVERSE accompanies it: not inverted again)" if shape == "INVERSE" else ""
        rec.step(f"MONOCHROME1: inverted after VOI{note}")
    elif shape == "INVERSE":
        x = 1.0 - x
        rec.step("PresentationLUTShape INVERSE: inverted")
    if "PresentationLUTSequence" in ds:
        x = _presentation_lut(x, ds, rec)
    return x.astype(np.float32, copy=False)


def _presentation_lut(x: np.ndarray, ds: pydicom.Dataset, rec: Record) -> np.ndarray:
    """Presentation LUT Sequence (PS3.3 C.11.6): VOI output → P-values. Its input range is the whole VOI
    output range ([0, 1] here), quantised to the LUT's entries. pydicom parses the LUT (US/OW data,
    unused high bits masked): applying `apply_presentation_lut` to a ramp of the entry indices returns
    the table itself. Calling it on the image would rescale the image's own min..max instead."""
    try:
        item = ds.PresentationLUTSequence[0]
        entries, _, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 65536
        lut = pydicom.pixels.apply_presentation_lut(np.arange(entries, dtype=np.float32), ds).astype(np.float32)
    except Exception as exc:  # malformed LUT; pydicom raises several types
        raise InvalidPixelModule(f"Presentation LUT Sequence unusable ({type(exc).__name__})") from None
    if len(lut) != entries or not 1 <= bits <= 16:
        raise InvalidPixelModule(f"Presentation LUT Sequence: descriptor says {entries} entries of {bits} bits, data has {len(lut)}")
    idx = np.rint(np.clip(x, 0.0, 1.0) * (entries - 1)).astype(np.int64)
    rec.step(f"Presentation LUT Sequence: {entries} entries, {bits}-bit P-values")
    return lut[idx] / np.float32(2**bits - 1)


def load_dicom(path: Path, rec: Record, *, voi: str | int, max_megapixels: float, preamble: bool, frame: int | None = None) -> np.ndarray:
    """DICOM file → float32 (H, W) in [0, 1], bright = dense, every step in `rec`."""
    rec.format = "dicom"
    # pydicom converts elements lazily, so its warnings (an invalid IS value, ...) can come from any
    # step: all of them become record warnings (`medres inspect` shows them under the file).
    with collected_warnings() as pydicom_warnings:
        try:
            ds = read_dataset(path, rec, preamble=preamble)
            validate_pixel_module(ds, rec, max_megapixels=max_megapixels, frame=frame)
            arr = decode(ds, rec, frame)
            if arr.size == 0:
                raise InvalidPixelModule("decoded image is empty")
            x = modality_transform(arr, ds, rec)
            if not np.isfinite(x).all():
                raise InvalidPixelModule("modality transform produced non-finite values")
            if float(x.max()) == float(x.min()):
                raise DegenerateImage(f"constant image (every pixel is {float(x.min()):g})")
            x = voi_transform(x, ds, rec, voi)
            return presentation_transform(x, ds, rec)
        finally:
            for w in pydicom_warnings:
                rec.warn(w)
