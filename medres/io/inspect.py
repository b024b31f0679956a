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
    lines = [f"{name}: {r.format} modality={r.modality or '-'} photometric={r.photometric or '-'} bits={r.bits_stored}/{r.bits_allocated or '-'} transfer_syntax={r.transfer_syntax or '-'}"]
    lines += [f"  - {s}" for s in r.steps] + [f"  ! {w}" for w in r.warnings]
    g = r.geometry
    if g is not None:
        lines.append(f"  geometry: {g.original_height}x{g.original_width} -> {g.size}x{g.size} {g.mode} scale=({g.scale_y:.4f},{g.scale_x:.4f}) offset=({g.offset_y:g},{g.offset_x:g})")
    return lines
