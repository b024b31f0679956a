"""Importers for the public chest X-ray archives as they are distributed: one module per archive, each
reading the archive's own files onto medres's manifest schema and the shared label vocabulary
(`vocabulary.py`). Adding an archive = one module with an `Archive` and a fixture test.

    medres manifest import nih /data/nih --out manifests/nih.csv
"""

from __future__ import annotations

from pathlib import Path

from medres.archives import chexpert, covid, nih, padchest, rsna, vindr
from medres.archives.common import Archive, ImportReport, write_import
from medres.errors import ArchiveInvalid, UsageError

ARCHIVES: dict[str, Archive] = {a.name: a for a in (
    nih.ARCHIVE, chexpert.CHEXPERT_ARCHIVE, chexpert.MIMIC_ARCHIVE, padchest.ARCHIVE, rsna.ARCHIVE, vindr.ARCHIVE, covid.ARCHIVE,
)}


def import_archive(name: str, source: str | Path, out: str | Path, *, overwrite: bool = False) -> ImportReport:
    """Read archive `name` from SOURCE (its folder as downloaded) and write the manifest `out`, with
    `<out>.import.json` (counts per label and state, left-out rows) and `<out>.missing.csv`."""
    if name not in ARCHIVES:
        raise UsageError(f"unknown archive format {name!r}; one of: {', '.join(ARCHIVES)}")
    source = Path(source)
    if not source.is_dir():
        raise ArchiveInvalid(f"not a folder: {source}")
    imported = ARCHIVES[name].read(source)
    return write_import(imported, name, Path(out), overwrite=overwrite)
