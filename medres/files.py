"""Output safety: atomic writes, CSV-injection neutralising, input paths confined to a root."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from medres.errors import OutputExists, OutputFailed, PathOutsideRoot

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it (`durable`) and rename it into place, on
    failure remove it. The one way medres writes a file: readers see the old file or the new one,
    never half of either. `durable=False` for re-creatable files (cache entries, report images)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _output_failed(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise _output_failed(path, exc) from None
        raise
    except RuntimeError as exc:  # torch.save reports a full disk as "PytorchStreamWriter failed writing file"
        if "writ" in str(exc) and _free_bytes(path.parent) < _LOW_DISK:
            raise _output_failed(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_LOW_DISK = 64 * 1024 * 1024


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _output_failed(path: Path, exc: OSError) -> OutputFailed:
    """One line naming the file, the reason and the room left; the previous file (if any) is untouched."""
    free = _free_bytes(path.parent if path.parent.exists() else Path("."))
    reason = exc.strerror or str(exc)
    return OutputFailed(f"cannot write: {reason} ({free / 2**20:.0f} MB free in {path.parent})", path=str(path))


def atomic_write(path: str | Path, data: str | bytes, *, durable: bool = True) -> None:
    with atomic_path(path, durable=durable) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def safe_cell(value: object) -> object:
    """Neutralise spreadsheet formulas (CSV injection): prefix a quote to cells starting = + - @."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        try:
            float(value)
            return value  # a negative number is data, not a formula
        except ValueError:
            return "'" + value
    return value


def csv_text(header: list[str], rows: list[list[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([safe_cell(v) for v in row])
    return buf.getvalue()


def resolve_under_root(root: Path, relative: str) -> Path:
    """Resolve `relative` inside `root`, following symlinks; refuse anything that escapes it."""
    root_real = Path(os.path.realpath(root))
    candidate = Path(relative)
    full = candidate if candidate.is_absolute() else root_real / candidate
    try:
        real = Path(os.path.realpath(full, strict=False))
    except (OSError, RuntimeError):  # symlink loop
        raise PathOutsideRoot(f"path cannot be resolved (symlink loop?): {relative}", path=relative) from None
    if os.path.islink(full) and not os.path.exists(full):
        # dangling link or loop
        try:
            os.stat(full)
        except OSError as exc:
            if "loop" in str(exc).lower() or getattr(exc, "errno", None) == 40:
                raise PathOutsideRoot("symlink loop", path=relative) from None
    if real != root_real and root_real not in real.parents:
        raise PathOutsideRoot(f"resolves outside the data root {root}", path=relative)
    return real
