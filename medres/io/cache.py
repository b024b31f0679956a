"""A persistent disk cache of decoded+resized images, keyed by file content and the preprocessing spec.

Safe with several reader/writer processes: each entry is written to a unique temp file and renamed
into place (`os.replace` is atomic on POSIX and Windows); the record is written before the pixels,
so a present `.npy` always has its `.json`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from medres.files import atomic_path, atomic_write
from medres.io.record import Record


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ImageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    @staticmethod
    def key(content_digest: str, spec_digest: str) -> str:
        # record-v2: records gained the header columns (body part, view, laterality)
        return hashlib.sha256(f"{content_digest}|{spec_digest}|record-v2".encode()).hexdigest()

    def get(self, key: str) -> tuple[np.ndarray, dict] | None:
        npy, meta = self._paths(key)
        try:
            arr = np.load(npy, allow_pickle=False)
            record = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError, json.JSONDecodeError):
            return None
        return arr, record

    def put(self, key: str, arr: np.ndarray, record: Record) -> None:
        npy, meta = self._paths(key)
        d = record.to_dict()
        d["path"] = ""  # the same content may live under several names
        atomic_write(meta, json.dumps(d), durable=False)  # a cache: re-creatable, no fsync
        with atomic_path(npy, durable=False) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr.astype(np.float32, copy=False), allow_pickle=False)
