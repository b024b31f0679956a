"""Decode a manifest once (in worker processes, through the cache) into one in-memory tensor.

At 224 px a chest X-ray is 200 KB as float32, so even 10,000 images fit in 2 GB; decoding once per
run (and once ever with the cache) makes every epoch after the first compute-bound.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medres.errors import IngestError, MedresError
from medres.io import ImageCache, PreprocessSpec, load_image
from medres.io.cache import file_digest

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    pixels: np.ndarray  # (N, S, S) float32, rows whose file failed are zeros
    ok: np.ndarray  # (N,) bool
    errors: list[tuple[int, str, str]]  # (row, code, one-line message)
    digests: list[str]


def _decode_one(args: tuple[str, str, PreprocessSpec, str | None]) -> tuple[np.ndarray | None, str, str | None, str]:
    full, shown, spec, cache_dir = args
    try:
        digest = file_digest(Path(full))
    except OSError:
        digest = ""
    try:
        loaded = load_image(full, spec, display_path=shown, cache=ImageCache(cache_dir) if cache_dir else None, content_digest=digest or None)
        return loaded.pixels, digest, None, ""
    except IngestError as err:
        return None, digest, err.code, err.one_line()


def decode_all(
    items: list[tuple[str, str]],
    spec: PreprocessSpec,
    *,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress=None,
) -> Decoded:
    """items: (absolute path, display path). Bad files are reported, not raised."""
    n = len(items)
    pixels = np.zeros((n, spec.image_size, spec.image_size), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    errors: list[tuple[int, str, str]] = []
    digests = [""] * n
    jobs = [(str(full), shown, spec, str(cache_dir) if cache_dir else None) for full, shown in items]
    if num_workers > 0 and n > 8:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            results = pool.map(_decode_one, jobs, chunksize=max(1, n // (num_workers * 8)))
            _collect(results, pixels, ok, errors, digests, progress)
    else:
        _collect(map(_decode_one, jobs), pixels, ok, errors, digests, progress)
    return Decoded(pixels, ok, errors, digests)


def _collect(results, pixels, ok, errors, digests, progress) -> None:
    for i, (arr, digest, code, message) in enumerate(results):
        digests[i] = digest
        if arr is None:
            errors.append((i, code or MedresError.code, message))
            log.warning(message)
        else:
            pixels[i] = arr
            ok[i] = True
        if progress is not None:
            progress()
