"""From a manifest to batches: the manifest's images live in an on-disk store (`store.py`), and training,
evaluation and calibration read batches from it, so memory does not grow with the number of images.

- `open_store`: the store for a manifest under a preprocessing spec (built or resumed on demand).
- `epoch_loader`: a torch `DataLoader` over one epoch's batches (workers, prefetch, pinned memory on
  CUDA); each item is a whole batch, so one worker call reads 32 rows with 32 `pread`s.
- `stream`: batches of given rows in order, for validation and scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medres.data.manifest import Manifest
from medres.data.store import ImageStore
from medres.io import PreprocessSpec


def manifest_items(manifest: Manifest) -> list[tuple[str, str]]:
    """(absolute path, path as written in the manifest) for every row."""
    paths = manifest.frame["path"].tolist()
    return [(str(manifest.absolute(i)), paths[i]) for i in range(len(manifest))]


def open_store(manifest: Manifest, spec: PreprocessSpec, *, store_dir: str | Path | None = None, dtype: str = "uint8", cache_dir: str | Path | None = None) -> ImageStore:
    return ImageStore.open(manifest_items(manifest), spec, root=store_dir, dtype=dtype, cache_dir=cache_dir)


class _Batches(Dataset):
    """Item k = (pixels (B, S, S) float32 in [0, 1], targets (B, C)) of the k-th batch."""

    def __init__(self, store: ImageStore, batches: list[np.ndarray], targets: np.ndarray):
        self.store, self.batches, self.targets = store, batches, targets

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.batches[k]
        return torch.from_numpy(self.store.read(rows)), torch.from_numpy(self.targets[rows])


def epoch_loader(store: ImageStore, batches: list[np.ndarray], targets: np.ndarray, *, workers: int = 0, pin_memory: bool = False, seed: int = 0) -> DataLoader:
    """`batches`: store rows of each step, in order. `targets`: (N_store, C) indexed by store row.
    The loader's own generator seeds its workers, so it never draws from torch's global RNG (dropout
    masks stay what they would be without workers)."""
    return DataLoader(
        _Batches(store, batches, targets), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=pin_memory, prefetch_factor=4 if workers else None, persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


def stream(store: ImageStore, rows: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """(B, S, S) float32 batches of `rows`, in order (rows must already be in the store)."""
    rows = np.asarray(rows, dtype=np.int64)
    for i in range(0, len(rows), batch_size):
        yield torch.from_numpy(store.read(rows[i : i + batch_size]))
