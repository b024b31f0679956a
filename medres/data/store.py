"""A decoded-image store on disk: one `.npy` array per (manifest file list × preprocessing spec × dtype).

Training, evaluation and calibration read batches from it with `pread`, so memory does not grow with
the number of images (a memory map would: every page it touches counts in the process's RSS).

Layout of a store folder (`<store_dir>/<key>/`):

    meta.json      what the store holds (written once, atomically, before any pixels)
    pixels.npy     (N, S, S) uint8 | uint16 | float32, a plain NumPy file, preallocated (sparse)
    journal.jsonl  one line per finished row: status, error code, content sha256, the file's size and
                   mtime, crc32 of the stored row; `{"sync": n}` lines mark that every row above them
                   is on disk (pixels fsync'd before the marker is written)
    lock           flock'd by the one process that builds; the others wait, then read

A row is usable only when the journal says so, so a half-built store is never read as complete:
`ensure(rows)` decodes what is missing (in the shared decoding pool, whose workers `pwrite` their
rows), and a build killed with `kill -9` continues from the journal. Rows journaled after the last sync marker are
checked against their crc32 when the store is opened (a machine crash can lose their pixels), and a
file whose size or mtime changed since it was decoded is decoded again.

Why not a library: WebDataset/MosaicML-streaming/LitData write compressed shards meant for object
storage and sequential reads; medres needs random row access for seeded per-epoch shuffles, exact
resume of a killed build, and row-level reuse across train/evaluate/calibrate. A fixed-size row
array does all three in ~250 lines with no extra dependency (see the README's "Scaling up").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from medres.data import pool as decoding
from medres.errors import IngestError, MedresError, UsageError
from medres.files import atomic_write
from medres.io import ImageCache, PreprocessSpec, load_image

log = logging.getLogger(__name__)

STORE_VERSION = 1
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float32": np.float32}
SYNC_SECONDS = 2.0  # pixels + journal fsync'd at least this often while building


def default_store_dir() -> Path:
    """$MEDRES_STORE_DIR, else $XDG_CACHE_HOME/medres/store, else ~/.cache/medres/store."""
    if os.environ.get("MEDRES_STORE_DIR"):
        return Path(os.environ["MEDRES_STORE_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "medres" / "store"


def quantise(x: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] float32 → the stored dtype (round to nearest; 8-bit sources round-trip exactly)."""
    if dtype == "float32":
        return x.astype(np.float32, copy=False)
    top = float(np.iinfo(DTYPES[dtype]).max)
    return np.rint(np.clip(x, 0.0, 1.0) * top).astype(DTYPES[dtype])


def dequantise(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float32:
        return x
    return x.astype(np.float32) * np.float32(1.0 / np.iinfo(x.dtype).max)


@dataclass(slots=True)
class _Row:
    ok: bool
    code: str
    message: str
    digest: str
    size: int
    mtime: int
    crc: int
    header: dict | None = None  # the gated DICOM tags (modality, body_part, view) when the file had them


@dataclass
class BuildStats:
    decoded: int = 0  # rows decoded by this call
    reused: int = 0  # rows already in the store
    seconds: float = 0.0
    waited: float = 0.0  # seconds spent waiting for another process's build


@dataclass
class ImageStore:
    """One store folder. Create with `ImageStore.open(...)`; see the module docstring."""

    folder: Path
    paths: list[str]  # absolute file paths, row order
    shown: list[str]  # what messages call each file
    spec: PreprocessSpec
    dtype: str = "uint8"
    cache_dir: str | None = None  # optional per-file cache consulted while decoding
    rows: dict[int, _Row] = field(default_factory=dict, repr=False)
    _fd: int | None = field(default=None, repr=False)
    _offset: int = field(default=0, repr=False)

    # --- opening ----------------------------------------------------------------------------------
    @staticmethod
    def key(paths: list[str], spec: PreprocessSpec, dtype: str) -> str:
        h = hashlib.sha256(f"medres-store-v{STORE_VERSION}|{spec.digest()}|{dtype}|{len(paths)}\n".encode())
        for p in paths:
            h.update(p.encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()[:24]

    @classmethod
    def open(cls, items: list[tuple[str, str]], spec: PreprocessSpec, *, root: str | Path | None = None, dtype: str = "uint8", cache_dir: str | Path | None = None) -> "ImageStore":
        """items: (absolute path, display path) in row order. Creates the folder if needed."""
        if dtype not in DTYPES:
            raise UsageError(f"data.store_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        paths = [str(p) for p, _ in items]
        root = Path(root) if root is not None else default_store_dir()
        folder = root / cls.key(paths, spec, dtype)
        store = cls(folder, paths, [s for _, s in items], spec, dtype, str(cache_dir) if cache_dir else None)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the image store at {folder} ({exc.strerror}); set data.store_dir or $MEDRES_STORE_DIR") from None
        with store._locked():  # creation races: one process writes meta.json and the array
            store._create_or_validate()
        store._load_journal()
        return store

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def size(self) -> int:
        return self.spec.image_size

    @property
    def row_bytes(self) -> int:
        return self.size * self.size * np.dtype(DTYPES[self.dtype]).itemsize

    def _meta(self) -> dict:
        return {"version": STORE_VERSION, "n": self.n, "image_size": self.size, "dtype": self.dtype, "spec": self.spec.digest(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _create_or_validate(self) -> None:
        meta_path, pixels = self.folder / "meta.json", self.folder / "pixels.npy"
        expected = self._meta()
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            same = all(meta.get(k) == expected[k] for k in ("version", "n", "image_size", "dtype", "spec"))
            self._offset = int(meta["offset"])
            if same and pixels.stat().st_size == self._offset + self.n * self.row_bytes:
                return
            log.warning("image store %s does not match its metadata; rebuilding it", self.folder)
        except (OSError, ValueError, KeyError, TypeError):
            if meta_path.exists() or pixels.exists():
                log.warning("image store %s is incomplete or damaged; rebuilding it", self.folder)
        for name in ("meta.json", "journal.jsonl", "pixels.npy"):
            (self.folder / name).unlink(missing_ok=True)
        # A plain .npy (readable with np.load(mmap_mode="r")); the data region is left sparse.
        arr = np.lib.format.open_memmap(pixels, mode="w+", dtype=DTYPES[self.dtype], shape=(self.n, self.size, self.size))
        self._offset = int(arr.offset)
        del arr
        expected["offset"] = self._offset
        atomic_write(meta_path, json.dumps(expected, indent=1))

    @contextlib.contextmanager
    def _locked(self, *, on_wait: Callable[[], None] | None = None) -> Iterator[float]:
        """Exclusive flock on `lock`; yields the seconds spent waiting. Released by the kernel if the
        holder dies, so a killed build never blocks the next one."""
        with open(self.folder / "lock", "a+b") as fh:
            t0 = time.perf_counter()
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if on_wait:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield time.perf_counter() - t0
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # --- the journal ------------------------------------------------------------------------------
    def _load_journal(self) -> None:
        """Rows listed in the journal; rows after the last sync marker must match their crc32."""
        self.rows = {}
        unsynced: list[int] = []
        try:
            fh = open(self.folder / "journal.jsonl", "rb")
        except FileNotFoundError:
            return
        with fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # torn last line of a killed build
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a damaged line: that row is simply decoded again
                if "sync" in e:
                    unsynced.clear()
                    continue
                if "forget" in e:  # verify() found the row damaged
                    self.rows.pop(int(e["forget"]), None)
                    continue
                try:
                    i = int(e["row"])
                    row = _Row(bool(e["ok"]), e.get("code", ""), e.get("msg", ""), e.get("digest", ""), int(e["size"]), int(e["mtime"]), int(e.get("crc", 0)), e.get("hdr"))
                except (KeyError, TypeError, ValueError):
                    continue
                if 0 <= i < self.n:
                    self.rows[i] = row
                    unsynced.append(i)
        bad = [i for i in set(unsynced) if self.rows[i].ok and self._crc(i) != self.rows[i].crc]
        for i in bad:
            del self.rows[i]
        if bad:
            log.warning("image store %s: %d rows written just before a crash were lost; they will be decoded again", self.folder, len(bad))

    def verify(self) -> list[int]:
        """Check every stored row against its crc32; forget (and return) the rows that differ, so the
        next `ensure` decodes them again."""
        bad = sorted(i for i, r in self.rows.items() if r.ok and self._crc(i) != r.crc)
        if bad:
            with self._locked(), open(self.folder / "journal.jsonl", "ab") as fh:
                fh.write(b"".join(json.dumps({"forget": i}).encode() + b"\n" for i in bad))
                os.fsync(fh.fileno())
            for i in bad:
                del self.rows[i]
        return bad

    def _crc(self, i: int) -> int:
        return zlib.crc32(self.read_raw(np.array([i]))[0].tobytes())

    def missing(self, rows: np.ndarray | None = None, *, check_files: bool = True) -> np.ndarray:
        """Rows that still need decoding: never decoded, lost, or whose file changed since."""
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.int64)
        out = []
        for i in rows.tolist():
            r = self.rows.get(i)
            if r is None:
                out.append(i)
            elif check_files:
                size, mtime = _stat(self.paths[i])
                if (size, mtime) != (r.size, r.mtime):
                    out.append(i)
        return np.asarray(out, dtype=np.int64)

    # --- building ---------------------------------------------------------------------------------
    def ensure(self, rows: np.ndarray | None = None, *, workers: int | None = None, progress: Callable[..., None] | None = None,
               pool: str = decoding.DEFAULT_KIND) -> BuildStats:
        """Decode every row of `rows` (default: all) that is not in the store yet, with `workers`
        workers of the shared decoding pool (`medres.data.pool`; 0: in this thread, None: its default).
        Bad files become error rows (see `errors`), never exceptions. Safe to call from several
        processes at once."""
        t0 = time.perf_counter()
        want = np.arange(self.n) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        todo = self.missing(want)
        stats = BuildStats(reused=len(want) - len(todo))
        if len(todo) == 0:
            stats.seconds = time.perf_counter() - t0
            return stats

        def waiting() -> None:
            log.info("another process is building the image store %s; waiting", self.folder)

        with self._locked(on_wait=waiting) as waited:
            stats.waited = waited
            self._load_journal()  # it may have built our rows while we waited
            todo = self.missing(want)
            stats.reused = len(want) - len(todo)
            if len(todo):
                if progress:
                    progress(advance=0, total=len(todo))
                stats.decoded = self._build(todo, workers, progress, pool)
        stats.seconds = time.perf_counter() - t0
        return stats

    def _build(self, todo: np.ndarray, workers: int | None, progress, pool: str) -> int:
        jobs = [(int(i), self.paths[i], self.shown[i]) for i in todo]
        rows = (str(self.folder / "pixels.npy"), self._offset, self.row_bytes, self.spec, self.dtype, self.cache_dir)
        journal = open(self.folder / "journal.jsonl", "ab")
        t0 = last_sync = time.perf_counter()
        done = 0
        try:
            for entry in decoding.imap(_decode_row, jobs, setup=_open_rows, args=rows, workers=workers, kind=pool):
                i = entry.pop("row")
                journal.write(json.dumps({"row": i, **entry}).encode() + b"\n")
                journal.flush()  # in the page cache now: survives kill -9 of this process
                self.rows[i] = _Row(entry["ok"], entry["code"], entry["msg"], entry["digest"], entry["size"], entry["mtime"], entry["crc"], entry.get("hdr"))
                if not entry["ok"]:
                    log.warning(entry["msg"])
                done += 1
                if time.perf_counter() - last_sync > SYNC_SECONDS:
                    self._sync(journal, done)
                    last_sync = time.perf_counter()
                if progress:
                    progress(advance=1, files_per_s=done / max(time.perf_counter() - t0, 1e-9))
            self._sync(journal, done)
        finally:
            journal.close()
        return done

    def _sync(self, journal, done: int) -> None:
        fd = os.open(self.folder / "pixels.npy", os.O_RDONLY)
        try:
            os.fsync(fd)  # the workers' pwrites, then the marker that vouches for them
        finally:
            os.close(fd)
        os.fsync(journal.fileno())
        journal.write(json.dumps({"sync": done}).encode() + b"\n")
        journal.flush()
        os.fsync(journal.fileno())

    # --- reading ----------------------------------------------------------------------------------
    def read_raw(self, rows: np.ndarray) -> np.ndarray:
        """(B,) row indices → (B, S, S) in the stored dtype. One pread per row, no memory map."""
        if self._fd is None:
            self._fd = os.open(self.folder / "pixels.npy", os.O_RDONLY)
        dt = DTYPES[self.dtype]
        out = np.empty((len(rows), self.size, self.size), dtype=dt)
        view, rb = memoryview(out.reshape(-1).view(np.uint8)), self.row_bytes
        for k, i in enumerate(np.asarray(rows).tolist()):
            got = os.preadv(self._fd, [view[k * rb : (k + 1) * rb]], self._offset + i * rb)
            if got != self.row_bytes:
                raise MedresError(f"image store {self.folder}: pixels.npy is shorter than row {i}; delete the folder to rebuild")
        return out

    def read(self, rows: np.ndarray) -> np.ndarray:
        """(B,) rows → (B, S, S) float32 in [0, 1]."""
        return dequantise(self.read_raw(rows))

    def __getstate__(self) -> dict:  # DataLoader workers open their own descriptor
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- what the journal says --------------------------------------------------------------------
    def ok_mask(self, rows: np.ndarray | None = None) -> np.ndarray:
        rows = np.arange(self.n) if rows is None else np.asarray(rows)
        return np.array([bool(self.rows.get(i) and self.rows[i].ok) for i in rows.tolist()], dtype=bool)

    def errors(self, rows: np.ndarray | None = None) -> list[tuple[int, str, str]]:
        """(row, code, one-line message) for the rows whose file could not be used."""
        rows = np.arange(self.n) if rows is None else np.asarray(rows)
        return [(i, self.rows[i].code, self.rows[i].message) for i in rows.tolist() if i in self.rows and not self.rows[i].ok]

    def headers(self, rows: np.ndarray) -> list[dict]:
        """The gated DICOM header values of these rows (empty dicts for PNG/JPEG or stores built
        before headers were journaled)."""
        return [(self.rows[i].header or {}) if i in self.rows else {} for i in np.asarray(rows).tolist()]

    def digests(self) -> list[str]:
        return [self.rows[i].digest if i in self.rows else "" for i in range(self.n)]

    def disk_bytes(self) -> int:
        """Bytes actually allocated on disk (the array is sparse until rows are written)."""
        return sum(os.stat(p).st_blocks * 512 for p in self.folder.iterdir() if p.is_file())

def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


# --- decoding (the shared pool: medres.data.pool) --------------------------------------------------
@dataclass
class _RowWriter:
    """What decoding a row needs: one per decoding process, or shared by the decoding threads (each
    row is its own `pwrite` at its own offset, so threads never write over each other)."""

    fd: int
    offset: int
    row_bytes: int
    spec: PreprocessSpec
    dtype: str
    cache: ImageCache | None

    def close(self) -> None:
        os.close(self.fd)


def _open_rows(pixels: str, offset: int, row_bytes: int, spec: PreprocessSpec, dtype: str, cache_dir: str | None) -> _RowWriter:
    return _RowWriter(os.open(pixels, os.O_WRONLY), offset, row_bytes, spec, dtype, ImageCache(cache_dir) if cache_dir else None)


def _decode_row(w: _RowWriter, job: tuple[int, str, str]) -> dict:
    """Decode one file and pwrite its row; returns the journal entry (the caller writes it)."""
    i, full, shown = job
    size, mtime = _stat(full)
    entry = {"row": i, "ok": False, "code": "", "msg": "", "digest": "", "size": size, "mtime": mtime, "crc": 0}
    try:
        from medres.io.cache import file_digest

        entry["digest"] = file_digest(Path(full))
    except OSError:
        pass
    try:
        loaded = load_image(full, w.spec, display_path=shown, cache=w.cache, content_digest=entry["digest"] or None)
    except IngestError as err:
        entry.update(code=err.code, msg=err.one_line())
        return entry
    data = np.ascontiguousarray(quantise(loaded.pixels, w.dtype)).tobytes()
    os.pwrite(w.fd, data, w.offset + i * w.row_bytes)
    entry.update(ok=True, crc=zlib.crc32(data))
    hdr = {k: v for k, v in loaded.record.header().items() if v and k in ("modality", "body_part", "view")}
    if hdr:
        entry["hdr"] = hdr
    return entry
