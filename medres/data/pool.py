"""The one pool that decodes images in parallel: the scoring path (`scoring.decoded_stream`: predict,
report, select, the Python API) and the image store (`ImageStore.ensure`: train, evaluate, calibrate,
pretrain) both call `imap`, so `workers` means the same everywhere — how many decoding workers; 0
decodes in the calling thread; None is `default_workers()`.

Threads by default. Decoding is PIL, pydicom's pixel handlers and codecs, numpy, zlib and hashlib: C
code that releases the GIL for the heavy part, so threads decode in parallel without pickling decoded
pixels between processes, without starting an interpreter per worker, and without copying the
caller's memory (the model) or its OpenMP thread pool — forking a process that has run torch can
deadlock the child. On 2 cores threads matched or beat processes end to end (docs/benchmarks.md
"Decoding pool"). Processes remain (`kind="process"`) for decode-bound folders where Python-level
work holds the GIL; they are always started with 'spawn' (a fresh interpreter: safe whatever torch,
CUDA or OpenMP did in the caller, and the same on Linux and macOS), which needs the usual
`if __name__ == "__main__":` guard in a script that asks for them.

Results come back in input order, with at most `DEPTH` chunks per worker in flight: when the consumer
(the model) is slower than decoding, decoded images wait in a bounded window instead of piling up
(`Pool.imap` queues every item and buffers every result: 20 GB for 100,000 files at 224 px).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterator, Sequence, TypeVar

from medres.errors import UsageError
from medres.io.capture import threads_stderr_sink

KINDS = ("thread", "process")
DEFAULT_KIND = "thread"
START_METHOD = "spawn"  # processes only; see the module docstring
CHUNK = 4  # items per task handed to a worker
DEPTH = 4  # chunks in flight per worker
THREAD_PREFIX = "medres-decode"

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")


def default_workers(kind: str = DEFAULT_KIND) -> int:
    """One worker per core, at least 2, at most 4, whichever the kind: a decoding thread waits on file
    reads and hands the GIL back while PIL/numpy work, so it takes less than a core from inference; on
    2 cores two threads were 1.25× faster than one on 1–4K originals and no slower on small JPEGs
    (docs/benchmarks.md "Decoding pool")."""
    check_kind(kind)
    return max(2, min(4, os.cpu_count() or 2))


def resolve_workers(workers: int | None) -> int:
    """`workers` as given (0: in the calling thread), or the default for None."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"--workers must be an integer >= 0 (0 decodes in the calling thread), got {workers!r}")
    return workers


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UsageError(f"decoding pool must be {' or '.join(KINDS)}, got {kind!r}")


def imap(work: Callable[[S, T], R], items: Sequence[T], *, setup: Callable[..., S], args: tuple = (), workers: int | None,
         kind: str = DEFAULT_KIND, chunk: int = CHUNK) -> Iterator[R]:
    """`work(state, item)` for every item, in input order. `state = setup(*args)` is made once per
    decoding process, or once in this process and shared by its decoding threads (so `work` must be
    safe to run on one state from several threads); a state with a `close()` is closed at the end
    (a process's state when the process exits). `work` and `setup` must be module-level functions
    and `args` picklable when `kind` is "process"."""
    workers = resolve_workers(workers)
    check_kind(kind)
    if workers == 0 or len(items) < 2:
        yield from _in_this_process(work, items, setup, args, workers=0)
        return
    if kind == "thread":
        yield from _in_this_process(work, items, setup, args, workers=workers, chunk=chunk)
        return
    chunks = (items[i : i + chunk] for i in range(0, len(items), chunk))
    with mp.get_context(START_METHOD).Pool(workers, initializer=_start_process, initargs=(setup, args)) as procs:
        yield from _windowed(lambda c: procs.apply_async(_run_in_process, (work, c)).get, chunks, DEPTH * workers)


def _in_this_process(work, items, setup, args, *, workers: int, chunk: int = CHUNK) -> Iterator:
    state = setup(*args)
    try:
        # Codecs' C chatter off the console for the pool's life, whatever other threads run beside it
        # (a progress bar's refresh thread, a notebook's): medres/io/capture.py.
        with threads_stderr_sink():
            if workers == 0:
                yield from (work(state, x) for x in items)
                return
            chunks = (items[i : i + chunk] for i in range(0, len(items), chunk))
            ex = ThreadPoolExecutor(workers, thread_name_prefix=THREAD_PREFIX)
            try:
                yield from _windowed(lambda c: ex.submit(_run_chunk, work, state, c).result, chunks, DEPTH * workers)
            finally:
                ex.shutdown(wait=True, cancel_futures=True)  # a consumer that stops early waits for no queued chunk
    finally:
        close = getattr(state, "close", None)
        if callable(close):
            close()


def _windowed(submit: Callable, chunks: Iterator[Sequence], depth: int) -> Iterator:
    """Results of `submit(chunk)` (a callable that waits for the chunk's results) in order, with at
    most `depth` chunks in flight."""
    window = deque(submit(c) for c in islice(chunks, depth))
    while window:
        done = window.popleft()()
        nxt = next(chunks, None)
        if nxt is not None:
            window.append(submit(nxt))
        yield from done


def _run_chunk(work: Callable, state: Any, chunk: Sequence) -> list:
    return [work(state, x) for x in chunk]


_PROCESS: dict = {}  # the state of this decoding process


def _start_process(setup: Callable, args: tuple) -> None:
    torch = sys.modules.get("torch")  # imported by `setup`'s module, if at all
    if torch is not None:
        torch.set_num_threads(1)  # one thread per decoding process; the caller keeps its own
    _PROCESS["state"] = setup(*args)


def _run_in_process(work: Callable, chunk: Sequence) -> list:
    return _run_chunk(work, _PROCESS["state"], chunk)
