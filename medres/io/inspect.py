"""`medres inspect`: decode files, describe what ingestion did, optionally save the model inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from medres.errors import IngestError
from medres.files import atomic_path, atomic_write
from medres.io.load import load_image
from medres.io.record import LoadedImage, PreprocessSpec, Record


def inspect_files(files: list[Path], spec: PreprocessSpec, *, out: Path | None = None) -> Iterator[tuple[Path, LoadedImage | IngestError]]:
    """Each file with its loaded image (or its error); with `out`, writes <stem>.npy (the model input)
    and <stem>.json (the ingestion record) there."""
    for f in map(Path, files):
        try:
            loaded = load_image(f, spec, display_path=f.name)
        except IngestError as err:
            yield f, err
            continue
        if out is not None:
            with atomic_path(Path(out) / f"{f.stem}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, loaded.pixels, allow_pickle=False)
            atomic_write(Path(out) / f"{f.stem}.json", json.dumps(loaded.record.to_dict(), indent=2))
        yield f, loaded


def describe(name: str, r: Record) -> list[str]:
    """The lines `medres inspect` prints for one file."""
    lines = [f"{name}: {r.format} modality={r.modality or '-'} body_part={r.body_part or '-'} view={r.view or '-'} laterality={r.laterality or '-'} photometric={r.photometric or '-'} bits={r.bits_stored}/{r.bits_allocated or '-'} transfer_syntax={r.transfer_syntax or '-'}"]
    lines += [f"  - {s}" for s in r.steps] + [f"  ! {w}" for w in r.warnings]
    g = r.geometry
    if g is not None:
        lines.append(f"  geometry: {g.original_height}x{g.original_width} -> {g.size}x{g.size} {g.mode} scale=({g.scale_y:.4f},{g.scale_x:.4f}) offset=({g.offset_y:g},{g.offset_x:g})")
    return lines


def describe_checkpoint(path: Path) -> list[str]:
    """What a medres checkpoint will do with inputs: classes, preprocessing, calibration, the input
    gate's header expectations and OOD threshold, conformal sets."""
    from medres.model import load_checkpoint

    _, m = load_checkpoint(path)
    lines = [f"{path.name}: medres checkpoint, {m.task} {', '.join(m.classes)}; weights from {m.weights_source}; epoch {m.epoch}, val macro AUROC {m.val_auroc}",
             f"  preprocess: {json.dumps(m.preprocess)}",
             f"  temperature {m.temperature:.3f}; thresholds ({m.threshold_method or 'default 0.5'}) {m.effective_thresholds()}"]
    expect = ", ".join(f"{k}={','.join(v)}" for k, v in (m.expect or {}).items()) or "none (the training images had no DICOM header tags)"
    lines.append(f"  input gate, header: expects {expect}")
    if m.ood:
        lines.append(f"  input gate, OOD: {m.ood['method']} on {m.ood['n_train']} training images, threshold {m.ood['threshold']:.4f} (the {m.ood['quantile']:.0%} quantile of {m.ood['n_val']} validation images)")
    else:
        lines.append("  input gate, OOD: none (run medres calibrate to fit one)")
    if m.conformal:
        lines.append(f"  conformal sets: {m.conformal['method']}, coverage {m.conformal['coverage']}, q {m.conformal['qhat']}")
    return lines
