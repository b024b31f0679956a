"""The MedresError hierarchy. Each class has a stable `code` used in CSVs, logs and exit codes.

Messages name the file (relative to the input root) and the offending value, never patient data.
"""

from __future__ import annotations


class MedresError(Exception):
    """Base class. `code` is stable across releases; `path` is the file concerned, if any."""

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
    code = "INGEST_ERROR"


class FileMissing(IngestError):
    code = "FILE_NOT_FOUND"


class NotAnImage(IngestError):
    code = "NOT_AN_IMAGE"


class NoPixelData(IngestError):
    code = "NO_PIXEL_DATA"


class PixelDataShort(IngestError):
    code = "PIXEL_DATA_SHORT"


class InvalidPixelModule(IngestError):
    code = "INVALID_PIXEL_MODULE"


class UnsupportedPhotometric(IngestError):
    code = "UNSUPPORTED_PHOTOMETRIC"


class MultiframeUnsupported(IngestError):
    code = "MULTIFRAME_UNSUPPORTED"


class DecoderMissing(IngestError):
    code = "DECODER_MISSING"


class UnsupportedTransferSyntax(IngestError):
    code = "UNSUPPORTED_TRANSFER_SYNTAX"


class DecodeFailed(IngestError):
    code = "DECODE_FAILED"


class DegenerateImage(IngestError):
    code = "DEGENERATE_IMAGE"


class ImageTooLarge(IngestError):
    code = "IMAGE_TOO_LARGE"


class PathOutsideRoot(IngestError):
    code = "PATH_OUTSIDE_ROOT"


# --- the input gate (status "rejected": the file was readable, the model does not answer) -----------
class Rejected(MedresError):
    """The input gate's refusals (medres/gate.py); rows get status=rejected, not error."""

    code = "REJECTED"


class UnexpectedModality(Rejected):
    code = "UNEXPECTED_MODALITY"


class UnexpectedBodyPart(Rejected):
    code = "UNEXPECTED_BODY_PART"


class UnexpectedView(Rejected):
    code = "UNEXPECTED_VIEW"


class OutOfDistribution(Rejected):
    code = "OUT_OF_DISTRIBUTION"


class Rotated(Rejected):
    """The film looks rotated by 90°, 180° or 270° against the training images (gate.OrientationCheck)."""

    code = "ROTATED"


class Inverted(Rejected):
    """The film looks grey-level inverted against the training images (a MONOCHROME1 mistake in an export)."""

    code = "INVERTED"


# --- user input ------------------------------------------------------------------------
class UsageError(MedresError):
    code = "USAGE_ERROR"
    exit_code = 2


class ConfigInvalid(UsageError):
    code = "CONFIG_INVALID"


class ManifestInvalid(UsageError):
    code = "MANIFEST_INVALID"


class LeakageDetected(UsageError):
    code = "SPLIT_LEAKAGE"


class OutputExists(UsageError):
    code = "OUTPUT_EXISTS"


class OutputFailed(MedresError):
    """An output could not be written: the disk is full, over quota, read-only or not writable."""

    code = "OUTPUT_FAILED"


class NoInputs(UsageError):
    code = "NO_INPUTS"


class ArchiveInvalid(UsageError):
    """`manifest import`: an archive's file is missing, or not in the archive's published format."""

    code = "ARCHIVE_INVALID"


# --- models ----------------------------------------------------------------------------
class WeightsError(MedresError):
    code = "WEIGHTS_INVALID"
    exit_code = 3


class WeightsNotFound(WeightsError):
    code = "WEIGHTS_NOT_FOUND"


class CheckpointInvalid(WeightsError):
    code = "CHECKPOINT_INVALID"


# --- training --------------------------------------------------------------------------
class TrainingError(MedresError):
    code = "TRAINING_FAILED"
    exit_code = 1


class NonFiniteLoss(TrainingError):
    code = "NON_FINITE_LOSS"


class Int8Unsupported(UsageError):
    """`--precision int8` on a CPU whose instructions would make int8 slower than fp32."""

    code = "INT8_UNSUPPORTED"


class ExportParityError(MedresError):
    code = "EXPORT_PARITY"
    exit_code = 1


# --- PACS ------------------------------------------------------------------------------
class PacsError(MedresError):
    """`medres pacs` / `medres listen`: talking to a PACS over DICOMweb or DIMSE."""

    code = "PACS_ERROR"
    exit_code = 4


class PacsUnreachable(PacsError):
    code = "PACS_UNREACHABLE"


class PacsAuthFailed(PacsError):
    code = "PACS_AUTH_FAILED"


class PacsAssociationRejected(PacsError):
    code = "PACS_ASSOCIATION_REJECTED"


class PacsNoImages(PacsError):
    code = "PACS_NO_IMAGES"


class PacsStoreRejected(PacsError):
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
