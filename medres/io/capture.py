"""Keeping other libraries' output off the console while a file is read: pydicom's warnings and
what C codecs print on file descriptor 2. Both come back as text that ingestion folds into the
record, the error or a debug log line, each tagged with the file.

Thread safety. `warnings.catch_warnings` swaps process-wide state and is not thread-safe (Python
3.11): decoding threads that enter and leave it interleaved can leave another thread's filters in
place for good. `collected_warnings` installs one dispatcher for the process while any thread
collects, and hands each warning to the thread that raised it.
File descriptor 2 is shared by every thread, and Python's own stderr (log lines, progress bars, the
CLI's error lines) writes to it too. `c_stderr_captured` therefore redirects it only while the
calling thread is the process's only Python thread (`medres inspect`, process-pool and DataLoader
workers); in the thread decoding pool of medres/scoring.py it captures nothing and a codec's text
still reaches stderr. Inside the window, Python's own writers (`sys.stderr` and the logging handlers
that write to it, e.g. `--verbose`'s) are pointed at the real stderr, so only C output is captured.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

MAX_CHARS = 300  # per message: enough for a codec's reason, never a wall of text
_URL = re.compile(r"\s*(?:Please see\s*)?<?https?://\S+(?:\s+for [^.<]*\.)?")  # "Please see <url> for ...."


def one_line(text: str, limit: int = MAX_CHARS) -> str:
    """`text` on one line: links to the standard dropped, whitespace collapsed, at most `limit` chars."""
    text = " ".join(_URL.sub(" ", str(text)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- warnings ----------------------------------------------------------------------------------------
_lock = threading.Lock()
_local = threading.local()
_users = 0
_installed: tuple | None = None  # (previous showwarning, our dispatcher, our filter entry)


def _dispatcher(previous):
    def dispatch(message, category, filename, lineno, file=None, line=None):
        sink = getattr(_local, "sink", None)
        # Only UserWarnings (pydicom's invalid values, plugin notes) are the file's business; numpy's
        # RuntimeWarnings and deprecations go where they went before.
        if sink is None or not issubclass(category, UserWarning):
            return previous(message, category, filename, lineno, file, line)
        origin = "pydicom" if "pydicom" in str(filename) else category.__name__
        text = f"{origin}: {one_line(message)}"
        if text not in sink:
            sink.append(text)

    return dispatch


@contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """UserWarnings raised in this thread inside the block → the yielded list (one line each,
    de-duplicated) instead of stderr. Other threads' warnings are untouched."""
    global _users, _installed
    sink: list[str] = []
    with _lock:
        if _users == 0:
            previous = warnings.showwarning
            dispatch = _dispatcher(previous)
            warnings.showwarning = dispatch
            # pydicom warns from fixed lines: the default action shows a text once per process, so a
            # second file with the same invalid value would get no warning in its record.
            warnings.filterwarnings("always", category=UserWarning, module="pydicom")
            _installed = (previous, dispatch, warnings.filters[0])
        _users += 1
    outer = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = outer
        with _lock:
            _users -= 1
            if _users == 0 and _installed is not None:
                previous, dispatch, entry = _installed
                if warnings.showwarning is dispatch:
                    warnings.showwarning = previous
                if entry in warnings.filters:
                    warnings.filters.remove(entry)
                    getattr(warnings, "_filters_mutated", lambda: None)()
                _installed = None


# --- C-level stderr ----------------------------------------------------------------------------------
def _flush_c_stdio() -> None:
    """fflush(NULL): text a codec left in a buffered C stream lands in the capture, not after it."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library handle: stderr is unbuffered anyway
        pass


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextmanager
def _python_stderr_to(fd: int) -> Iterator[None]:
    """Python's writes to stderr (sys.stderr, and logging handlers holding it) → `fd` inside the block."""
    old = sys.stderr
    if old is None:
        yield
        return
    real = open(os.dup(fd), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8", errors="backslashreplace")
    handlers = [h for h in _stream_handlers() if h.stream is old]
    sys.stderr = real
    for h in handlers:
        h.setStream(real)
    try:
        yield
    finally:
        for h in handlers:
            if h.stream is real:
                h.setStream(old)
        if sys.stderr is real:
            sys.stderr = old
        real.close()


@contextmanager
def c_stderr_captured(enabled: bool = True) -> Iterator[list[str]]:
    """What C code writes to file descriptor 2 inside the block → the yielded list (one line per
    message), filled when the block ends, also when it raises. Captures only when `enabled` and this
    is the process's only Python thread (see the module docstring); otherwise the list stays empty."""
    lines: list[str] = []
    if not enabled or threading.active_count() != 1:
        yield lines
        return
    try:
        tmp = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # no temp space, or no descriptor 2 (a daemon): leave stderr alone
        yield lines
        return
    with tmp:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()  # Python's pending text goes to the console, not into the capture
        except (OSError, ValueError):
            pass
        try:
            os.dup2(tmp.fileno(), 2)
            try:
                with _python_stderr_to(saved):
                    yield lines
            finally:
                _flush_c_stdio()
                os.dup2(saved, 2)
        finally:
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(16384).decode("utf-8", "replace")
            lines.extend(one_line(t) for t in text.splitlines() if t.strip())
