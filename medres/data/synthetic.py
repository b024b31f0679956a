"""Chest-X-ray-like phantoms with lesions at known positions, for tests, the demo and the CAM checks.

A phantom has a body outline, two lung fields (dark), a mediastinum and heart (bright, left of the
image's centre line as seen by the viewer's right — i.e. the patient's left), ribs and noise.
Positive classes add round opacities (bright blobs) inside the lungs; their masks are saved.
Each class has its own lesion pattern so that the task is learnable from pixels alone:
`opacity` (one dense consolidation, 11–17% of the width in radius, clipped to the lung) and `diffuse` (several faint patches), plus `normal`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

DEFAULT_CLASSES = ("normal", "opacity", "diffuse")


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def phantom(rng: np.random.Generator, size: int, label: str, *, height: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One phantom → (image float32 [0, 1], lesion mask bool)."""
    h, w = height or size, size
    img = np.full((h, w), 0.05, dtype=np.float32)
    body = _ellipse(h, w, h * 0.55, w * 0.5, h * 0.5, w * 0.46)
    img[body] = 0.55
    jitter = rng.normal(0, 0.02, 4)
    lungs = []
    for side in (-1, 1):
        lung = _ellipse(h, w, h * (0.5 + jitter[0]), w * (0.5 + side * (0.2 + jitter[1])), h * 0.3, w * 0.14)
        lungs.append(lung)
        img[lung] = 0.18
    centre = _ellipse(h, w, h * 0.48, w * 0.5, h * 0.32, w * 0.06)  # mediastinum
    heart = _ellipse(h, w, h * 0.66, w * 0.56, h * 0.12, w * 0.12)  # patient's left
    img[centre] = 0.7
    img[heart] = 0.72
    yy = np.arange(h)[:, None]
    for k in range(7):  # ribs: faint bright arcs
        y0 = h * (0.25 + 0.07 * k)
        arc = np.abs(yy - (y0 + 0.02 * h * np.cos(np.linspace(-2, 2, w))[None, :])) < max(1, h * 0.008)
        img[arc & (lungs[0] | lungs[1])] += 0.12
    mask = np.zeros((h, w), dtype=bool)
    lung_any = (lungs[0] | lungs[1]) & ~centre & ~heart
    ys, xs = np.nonzero(lung_any)
    if label == "opacity":
        i = rng.integers(len(ys))
        r = size * rng.uniform(0.11, 0.17)
        m = _ellipse(h, w, ys[i], xs[i], r, r) & lung_any
        img[m] += 0.45
        mask |= m
    elif label == "diffuse":
        for _ in range(4):
            i = rng.integers(len(ys))
            r = size * rng.uniform(0.035, 0.055)
            m = _ellipse(h, w, ys[i], xs[i], r, r) & lung_any
            img[m] += 0.22
            mask |= m
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32), mask


def write_dicom(path: Path, img: np.ndarray, *, monochrome1: bool, rng: np.random.Generator, patient: str) -> None:
    """Save a phantom as a 12-bit CR DICOM with rescale and a window (identifiers are synthetic)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    stored = np.round(img * 4000).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = f"Phantom^{patient}", patient
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def make_dataset(
    out: str | Path,
    *,
    n_per_class: int = 20,
    size: int = 96,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    seed: int = 0,
    dicom_fraction: float = 0.25,
    images_per_patient: int = 1,
    aspect: tuple[float, float] = (1.0, 1.2),
) -> Path:
    """Write PNG and DICOM phantoms, `manifest.csv` and `masks/<stem>.png`; return the manifest path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    k = 0
    for label in classes:
        for i in range(n_per_class):
            patient = f"P{k // images_per_patient:05d}"
            k += 1
            img, mask = phantom(rng, size, label, height=int(size * rng.uniform(*aspect)))
            stem = f"{label}_{i:04d}"
            if rng.random() < dicom_fraction:
                name = f"images/{stem}.dcm"
                write_dicom(out / name, img, monochrome1=bool(rng.random() < 0.5), rng=rng, patient=patient)
            else:
                name = f"images/{stem}.png"
                Image.fromarray(np.round(img * 255).astype(np.uint8)).save(out / name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{stem}.png")
            rows.append({"path": name, "label": label, "patient_id": patient, "site": "A" if rng.random() < 0.5 else "B", "mask": f"masks/{stem}.png"})
    manifest = out / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    (out / "phantoms.json").write_text(json.dumps({"classes": list(classes), "size": size, "seed": seed, "n_per_class": n_per_class}))
    return manifest
