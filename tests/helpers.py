"""Builders for synthetic DICOM and raster test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent  # the repository: configs/, medres/, README.md


def smoke_config(manifest, *overrides: str):
    """configs/smoke.yaml on `manifest` with `--set`-style overrides: the tests' one config builder."""
    from medres.config import load_config

    return load_config(ROOT / "configs" / "smoke.yaml", [f"data.manifest={manifest}", *overrides])


IDENTIFIERS = {
    "PatientName": "Doe^Jane^Secretname",
    "PatientID": "PID-778899-SECRET",
    "PatientBirthDate": "19491231",
    "AccessionNumber": "ACC-5566-SECRET",
    "InstitutionName": "St Secret Hospital",
}


def gradient(h: int = 32, w: int = 40, hi: int = 4000, dtype=np.uint16) -> np.ndarray:
    """A left-to-right ramp with a bright square: orientation and polarity are checkable."""
    x = np.tile(np.linspace(0, hi, w), (h, 1))
    x[h // 4 : h // 2, w // 4 : w // 2] = hi
    return x.astype(dtype)


def make_dicom(
    path: Path,
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool | None = None,
    big_endian: bool = False,
    preamble: bool = True,
    identifiers: bool = False,
    transfer_syntax=None,
    **elements,
) -> Path:
    arr = np.asarray(arr)
    signed = arr.dtype.kind == "i" if signed is None else signed
    bits_alloc = arr.dtype.itemsize * 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or (ExplicitVRBigEndian if big_endian else ExplicitVRLittleEndian)
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    if identifiers:
        for k, v in IDENTIFIERS.items():
            setattr(ds, k, v)
        ds.StudyDate = "20240229"
    ds.Rows, ds.Columns = arr.shape[-2:]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        ds.Rows, ds.Columns = arr.shape[:2]
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
    if arr.ndim == 3 and arr.shape[-1] != 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored or bits_alloc
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for k, v in elements.items():
        setattr(ds, k, v)
    data = arr.astype(arr.dtype.newbyteorder(">" if big_endian else "<"))
    ds.PixelData = data.tobytes()
    if big_endian:
        pydicom.dcmwrite(str(path), ds, little_endian=False, implicit_vr=False, enforce_file_format=True)
    elif preamble:
        ds.save_as(str(path), enforce_file_format=True)
    else:
        ds.save_as(str(path), enforce_file_format=False, implicit_vr=False, little_endian=not big_endian)
    return path
