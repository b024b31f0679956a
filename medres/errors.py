"""The MedresError hierarchy. Each class has a stable `code` used in CSVs, logs and exit codes.

Messages name the file (relative to the input root) and the offending value, never patient data.
"""

from __future__ import annotations


class MedresError(Exception):
    """Base class.

    Base class. `code` is stable across releases; `path` is the file concerned, if any.
    """

    code = "MEDRES_ERROR"
    exit_code = 1

    def __init__(self, message: str, *, path: str | None = None):
        self.message = message
        self.path = path
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        text = f"{where}{self.message}".replace("\r", " ").replace("\n", " ")
        return f"[{self.code}] {text}"

    def with_path(self, path: str) -> "MedresError":
        """Return the same error, naming `path` (used when a low-level reader did not know it)."""
        if self.path is None:
            self.path = path
            self.args = (self.one_line(),)
        return self


# --- ingestion -------------------------------------------------------------------------
class IngestError(MedresError):
    """Base class of the file errors below."""

    code = "INGEST_ERROR"


class FileMissing(IngestError):
    """The input file does not exist."""

    code = "FILE_NOT_FOUND"


class NotAnImage(IngestError):
    """Empty file, unrecognised content, unreadable DICOM."""

    code = "NOT_AN_IMAGE"


class NoPixelData(IngestError):
    """DICOM without pixel data (SR, RT plan, waveform, ...)."""

    code = "NO_PIXEL_DATA"


class PixelDataShort(IngestError):
    """Pixel data shorter than Rows × Columns × bits declare; truncated file."""

    code = "PIXEL_DATA_SHORT"


class InvalidPixelModule(IngestError):
    """Missing/contradictory Rows, Columns, Bits*, PhotometricInterpretation; malformed LUT; 1-bit objects."""

    code = "INVALID_PIXEL_MODULE"


class UnsupportedPhotometric(IngestError):
    """Colour DICOM (RGB, YBR, PALETTE COLOR)."""

    code = "UNSUPPORTED_PHOTOMETRIC"


class MultiframeUnsupported(IngestError):
    """Multi-frame DICOM without a requested frame."""

    code = "MULTIFRAME_UNSUPPORTED"


class DecoderMissing(IngestError):
    """No installed decoder for the transfer syntax (names the pip package)."""

    code = "DECODER_MISSING"


class UnsupportedTransferSyntax(IngestError):
    """A transfer syntax no decoder exists for (e.g. MPEG video)."""

    code = "UNSUPPORTED_TRANSFER_SYNTAX"


class DecodeFailed(IngestError):
    """The codec failed on the data; malformed content."""

    code = "DECODE_FAILED"


class DegenerateImage(IngestError):
    """Constant image, RescaleSlope 0, window mapping everything to one value."""

    code = "DEGENERATE_IMAGE"


class ImageTooLarge(IngestError):
    """More than data.max_megapixels (checked before decoding)."""

    code = "IMAGE_TOO_LARGE"


class PathOutsideRoot(IngestError):
    """Manifest path escaping its root (.., absolute, symlink out, symlink loop)."""

    code = "PATH_OUTSIDE_ROOT"


# --- the input gate (status "rejected": the file was readable, the model does not answer) -----------
class Rejected(MedresError):
    """Base class of the input gate's refusals (status rejected: readable, but the model does not answer).

    The input gate's refusals (medres/gate.py); rows get status=rejected, not error.
    """

    code = "REJECTED"


class UnexpectedModality(Rejected):
    """DICOM Modality not among the expected ones (learnt from the training headers, or --expect modality=...)."""

    code = "UNEXPECTED_MODALITY"


class UnexpectedBodyPart(Rejected):
    """DICOM BodyPartExamined not among the expected ones (--expect body_part=...)."""

    code = "UNEXPECTED_BODY_PART"


class UnexpectedView(Rejected):
    """DICOM ViewPosition not among the expected ones (--expect view=...)."""

    code = "UNEXPECTED_VIEW"


class OutOfDistribution(Rejected):
    """OOD score above the checkpoint's threshold with --gate reject (with --gate flag the row is scored and marked)."""

    code = "OUT_OF_DISTRIBUTION"


class Rotated(Rejected):
    """The film looks rotated by 90°, 180° or 270° against the training images (gate.OrientationCheck)."""

    code = "ROTATED"


class Inverted(Rejected):
    """The film looks grey-level inverted against the training images (a MONOCHROME1 mistake in an export)."""

    code = "INVERTED"


# --- user input ------------------------------------------------------------------------
class UsageError(MedresError):
    """Bad command-line usage."""

    code = "USAGE_ERROR"
    exit_code = 2


class ConfigInvalid(UsageError):
    """Unknown key, wrong type or value in a config / --set."""

    code = "CONFIG_INVALID"


class ManifestInvalid(UsageError):
    """Missing column, unknown/empty/NaN label, empty manifest."""

    code = "MANIFEST_INVALID"


class LeakageDetected(UsageError):
    """A patient or identical file in two splits."""

    code = "SPLIT_LEAKAGE"


class OutputExists(UsageError):
    """Output exists and --overwrite/--resume was not given."""

    code = "OUTPUT_EXISTS"


class OutputFailed(MedresError):
    """An output could not be written (disk full, over quota, read-only); the old file is kept.

    An output could not be written: the disk is full, over quota, read-only or not writable.
    """

    code = "OUTPUT_FAILED"


class NoInputs(UsageError):
    """No input files found."""

    code = "NO_INPUTS"


class ArchiveInvalid(UsageError):
    """Manifest import: an archive file missing, a column missing, a malformed row (file:line).

    `manifest import`: an archive's file is missing, or not in the archive's published format.
    """

    code = "ARCHIVE_INVALID"


# --- models ----------------------------------------------------------------------------
class WeightsError(MedresError):
    """Weights are not a torchvision-layout ResNet50 (lists missing/unexpected keys)."""

    code = "WEIGHTS_INVALID"
    exit_code = 3


class WeightsNotFound(WeightsError):
    """Pretrained file missing (names the file and folder)."""

    code = "WEIGHTS_NOT_FOUND"


class CheckpointInvalid(WeightsError):
    """Truncated/corrupt checkpoint, pickle with code, not a medres checkpoint."""

    code = "CHECKPOINT_INVALID"


# --- training --------------------------------------------------------------------------
class TrainingError(MedresError):
    """Training could not continue."""

    code = "TRAINING_FAILED"
    exit_code = 1


class NonFiniteLoss(TrainingError):
    """Non-finite loss at epoch E step S (the last good checkpoint is kept)."""

    code = "NON_FINITE_LOSS"


class Int8Unsupported(UsageError):
    """--precision int8 on a CPU without AVX2/VNNI/AMX or ARM dot-product, or on CUDA.

    `--precision int8` on a CPU whose instructions would make int8 slower than fp32.
    """

    code = "INT8_UNSUPPORTED"


class ExportParityError(MedresError):
    """ONNX export differs from torch beyond its tolerance (fp32 1e-4; int8 max |Δprob| 0.1)."""

    code = "EXPORT_PARITY"
    exit_code = 1


# --- PACS ------------------------------------------------------------------------------
class PacsError(MedresError):
    """A PACS request failed (DICOMweb or DIMSE).

    `medres pacs` / `medres listen`: talking to a PACS over DICOMweb or DIMSE.
    """

    code = "PACS_ERROR"
    exit_code = 4


class PacsUnreachable(PacsError):
    """The PACS did not answer (closed port, wrong host, TLS failure)."""

    code = "PACS_UNREACHABLE"


class PacsAuthFailed(PacsError):
    """The PACS refused the credentials (HTTP 401/403)."""

    code = "PACS_AUTH_FAILED"


class PacsAssociationRejected(PacsError):
    """The DICOM association was rejected or aborted (AE titles, presentation contexts)."""

    code = "PACS_ASSOCIATION_REJECTED"


class PacsNoImages(PacsError):
    """A study had no image medres could score (none retrieved, or every one refused by the gate)."""

    code = "PACS_NO_IMAGES"


class PacsStoreRejected(PacsError):
    """The PACS refused to store the results (STOW-RS or C-STORE failure); the output table keeps the scores."""

    code = "PACS_STORE_REJECTED"


def all_codes() -> dict[str, type[MedresError]]:
    """Every stable code, for the README's error table and its test."""
    out: dict[str, type[MedresError]] = {}
    stack: list[type[MedresError]] = [MedresError]
    while stack:
        cls = stack.pop()
        out[cls.code] = cls
        stack.extend(cls.__subclasses__())
    return dict(sorted(out.items()))
