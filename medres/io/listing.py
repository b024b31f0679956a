"""Which files under a folder are candidate images: the one rule that `predict`/`report` (walking an
input folder) and `manifest build` (walking class folders) share. Hidden files and folders and
common sidecar files are skipped; everything else is a candidate whatever its name — PACS exports
name DICOMs by UID with no extension — and is then sniffed by content (`load.sniff`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

# Sidecar files commonly found next to images; skipped when walking folders (files named on the
# command line are always scored, so a text file named .dcm still becomes an error row).
SIDECAR_SUFFIXES = {".csv", ".json", ".txt", ".md", ".html", ".htm", ".yaml", ".yml", ".xml", ".log", ".npy", ".npz", ".pdf", ".py"}
SIDECAR_NAMES = {"DICOMDIR", "Thumbs.db"}


def candidate_files(folder: Path) -> Iterator[tuple[Path, str]]:
    """(file, path relative to `folder`) in a stable order."""
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts) and f.suffix.lower() not in SIDECAR_SUFFIXES and f.name not in SIDECAR_NAMES:
            yield f, rel.as_posix()


CHECKPOINT_SUFFIX = ".safetensors"  # a medres checkpoint; `medres inspect` describes it instead of decoding it


def split_checkpoints(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(checkpoints, images) of the paths given, each in the given order."""
    checkpoints = [p for p in paths if Path(p).suffix == CHECKPOINT_SUFFIX]
    return checkpoints, [p for p in paths if Path(p).suffix != CHECKPOINT_SUFFIX]
