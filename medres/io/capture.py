"""Keeping other libraries' output off the console while a file is read: pydicom's warnings and
what C codecs print on file descriptor 2. Both come back as text that ingestion folds into the
record, the error or a debug log line, each tagged with the file.

Thread safety. `warnings.catch_warnings` swaps process-wide state and is not thread-safe (Python
3.11): decoding threads that enter and leave it interleaved can leave another thread's filters in
place for good. `collected_warnings` installs one dispatcher for the process while any thread
collects, and hands each warning to the thread that raised it.
File descriptor 2 is shared by every thread, and Python's own stderr (log lines, progress bars, the
CLI's error lines) writes to it too. `c_stderr_captured` redirects it around one decode when the
calling thread is the process's only Python thread (`medres inspect`, process-pool workers). The
decoding pool in this process (medres/data/pool.py: its threads, or in-line decoding beside a
progress bar's thread) holds `threads_stderr_sink` instead: for the pool's life, C output goes to a sink that is logged at debug level when the pool ends, so a codec's chatter never
reaches the console untagged; a decode that fails inside the pool is tried once more alone
(`c_stderr_captured(exclusive=True)`, one thread at a time) so the codec's reason still lands in the
file's own error line. Successful decodes are never serialised. Inside every window, Python's own
writers (`sys.stderr` and the logging handlers that write to it, e.g. `--verbose`'s) are pointed at
the real stderr, so only C output is captured.
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


def _writes_to_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False


@contextmanager
def _python_stderr_to(fd: int) -> Iterator[None]:
    """Python's writes to stderr (sys.stderr, and logging handlers holding it) → `fd` inside the block.
    Only when sys.stderr writes to file descriptor 2: a notebook's or a test runner's stderr object
    writes elsewhere, is not affected by the redirection and is left alone."""
    old = sys.stderr
    if old is None or not _writes_to_fd2(old):
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


_sink_lock = threading.Lock()  # guards _sink
_sink: dict = {"users": 0}  # the thread pool's fd 2 sink: users, file, the real stderr's descriptor, its ExitStack
_exclusive = threading.Lock()  # one exclusive capture at a time while the sink holds fd 2


def sink_active() -> bool:
    return _sink["users"] > 0


@contextmanager
def threads_stderr_sink() -> Iterator[None]:
    """For a thread decoding pool's life: C output on file descriptor 2 → a temporary sink, logged at
    debug level (one line) when the last pool using it ends; Python's writers → the real stderr.
    Nested and concurrent pools share one sink. Does nothing where stderr cannot be redirected."""
    from contextlib import ExitStack

    with _sink_lock:
        if _sink["users"] == 0:
            try:
                tmp, saved = tempfile.TemporaryFile(), os.dup(2)
            except OSError:  # no temp space, or no descriptor 2 (a daemon): leave stderr alone
                tmp = None
            if tmp is not None:
                _flush_python_stderr()
                stack = ExitStack()
                os.dup2(tmp.fileno(), 2)
                stack.enter_context(_python_stderr_to(saved))
                _sink.update(file=tmp, saved=saved, stack=stack)
                _sink["users"] = 1
            joined = tmp is not None
        else:
            _sink["users"] += 1
            joined = True
    try:
        yield
    finally:
        if joined:
            _leave_sink()


def _leave_sink() -> None:
    with _sink_lock:
        _sink["users"] -= 1
        if _sink["users"] > 0:
            return
        _flush_c_stdio()
        os.dup2(_sink["saved"], 2)
        _sink["stack"].close()
        os.close(_sink["saved"])
        with _sink.pop("file") as tmp:
            tmp.seek(0)
            text = tmp.read(16384).decode("utf-8", "replace")
    if text.strip():
        logging.getLogger("medres.io").debug("decoders printed while decoding in threads (not attributable to one file): %s", one_line(" / ".join(text.splitlines()), 600))


def _flush_python_stderr() -> None:
    try:
        if sys.stderr is not None:
            sys.stderr.flush()  # Python's pending text goes to the console, not into a capture
    except (OSError, ValueError):
        pass


@contextmanager
def c_stderr_captured(enabled: bool = True, *, exclusive: bool = False) -> Iterator[list[str]]:
    """What C code writes to file descriptor 2 inside the block → the yielded list (one line per
    message), filled when the block ends, also when it raises. Captures when `enabled` and this is the
    process's only Python thread. Inside a thread pool's sink it captures only with `exclusive` (one
    such block at a time; another thread's C output in the window lands here too). Otherwise the list
    stays empty."""
    lines: list[str] = []
    if enabled and sink_active():
        if exclusive:
            with _exclusive, _redirected(lines, restore_python=False):
                yield lines
        else:
            yield lines
        return
    if not enabled or threading.active_count() != 1:
        yield lines
        return
    with _redirected(lines, restore_python=True):
        yield lines


@contextmanager
def _redirected(lines: list[str], *, restore_python: bool) -> Iterator[None]:
    """fd 2 → a temporary file inside the block, its lines appended to `lines` at the end; what fd 2
    pointed at before is restored. With `restore_python`, Python's writers go to the previous fd 2
    meanwhile (the sink already did that when it is active)."""
    try:
        tmp = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # no temp space, or no descriptor 2 (a daemon): leave stderr alone
        yield
        return
    with tmp:
        _flush_python_stderr()
        try:
            os.dup2(tmp.fileno(), 2)
            try:
                if restore_python:
                    with _python_stderr_to(saved):
                        yield
                else:
                    yield
            finally:
                _flush_c_stdio()
                os.dup2(saved, 2)
        finally:
            os.close(saved)
            tmp.seek(0)
            text = tmp.read(16384).decode("utf-8", "replace")
            lines.extend(one_line(t) for t in text.splitlines() if t.strip())
