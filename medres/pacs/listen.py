"""`medres listen`: a DICOM storage SCP that scores studies on arrival.

Each received instance is spooled durably (fsync + rename) under SPOOL/incoming/<study hash>/ before
the C-STORE is answered. A study is scored once no instance has arrived for `quiet_seconds` (so a
study sent over several associations is one job): its folder moves to SPOOL/processing/, is scored on
predict's path, its SR (+ Grad-CAM SCs) are stored to `store_to`, its rows are appended to the
output table, and the folder is removed. A restart first finishes what is in processing/: with the
result UIDs derived from the study and checkpoint, and a study already holding this checkpoint's
results skipped, a crash at any point leaves each study scored and stored exactly once.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from medres.errors import MedresError, UsageError
from medres.files import atomic_write
from medres.pacs.clients import client_for, uid_hash, write_instance
from medres.pacs.score import FATAL, StudyResult, StudyScorer, failed_result, store_back
from medres.pacs.servers import Server

log = logging.getLogger("medres.pacs")


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming, self.processing = self.root / "incoming", self.root / "processing"
        for d in (self.incoming, self.processing):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.resumed = {p.name for p in self.processing.iterdir()}  # left by a run that stopped mid-study

    def receive(self, ds) -> str:
        """Write one instance durably; returns its study's hash."""
        uid = str(ds.StudyInstanceUID)
        h = uid_hash(uid)
        with self.lock:
            folder = self.incoming / h
            folder.mkdir(exist_ok=True)
            if not (folder / "STUDY").exists():
                atomic_write(folder / "STUDY", uid)
            write_instance(ds, folder)
        return h

    def quiet_studies(self, quiet_seconds: float) -> list[Path]:
        """Move each study that has been quiet long enough to processing/ (atomic rename); return
        everything in processing/ (including what a previous run left there)."""
        now = time.time()
        with self.lock:
            for folder in sorted(self.incoming.iterdir()):
                latest = max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)
                if now - latest >= quiet_seconds and not (self.processing / folder.name).exists():
                    os.replace(folder, self.processing / folder.name)
        return sorted(p for p in self.processing.iterdir() if p.is_dir())


class AppendTable:
    """listen's output table: rows appended and fsynced per study (a long-running server never
    rewrites what it already wrote)."""

    def __init__(self, path: Path | None, columns: list[str]):
        self.path, self.columns = path, columns
        if path is not None and not path.exists():
            atomic_write(path, ",".join(columns) + "\n")

    def add(self, rows: list[dict]) -> None:
        if self.path is None or not rows:
            return
        from medres.files import safe_cell

        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([[safe_cell(r.get(c, "")) for c in self.columns] for r in rows])
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())


def listen(checkpoint: str | Path, *, port: int, store_to: Server, spool: str | Path, aet: str = "MEDRES", host: str = "127.0.0.1",
           quiet_seconds: float = 5.0, out: str | Path | None = None, gate: str = "flag", heatmaps: bool = True, device: str = "auto",
           precision: str = "auto", stop: threading.Event | None = None, on_ready=None) -> dict:
    """Serve until `stop` is set (SIGINT/SIGTERM set it); returns counts of what was scored."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    if not 0 < port < 65536:
        raise UsageError(f"--port must be 1-65535, got {port}")
    spool = Spool(Path(spool))
    scorer = StudyScorer(checkpoint, gate=gate, heatmaps=heatmaps, device=device, precision=precision)
    table = AppendTable(Path(out) if out else None, scorer.columns())
    client = client_for(store_to)
    stop = stop or threading.Event()
    counts = {"received": 0, "scored": 0, "skipped": 0, "failed": 0}

    def on_store(event):
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            h = spool.receive(ds)
        except Exception as exc:  # noqa: BLE001 - an SCP answers every C-STORE; the peer retries
            log.error("could not spool an instance (%s): answered 0xA700", type(exc).__name__)
            return 0xA700
        counts["received"] += 1
        log.debug("received an instance of study %s", h)
        return 0x0000

    ae = AE(ae_title=aet)
    ae.require_called_aet = True
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    try:
        server = ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or type(exc).__name__})") from None
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)} if threading.current_thread() is threading.main_thread() else {}
    log.info("listening as %s on %s:%d; results go to %s", aet, host, port, store_to.label)
    if on_ready:
        on_ready()
    try:
        while not stop.is_set():
            for folder in spool.quiet_studies(quiet_seconds):
                if not (folder / "DONE").exists():  # DONE: stored and in the table; only the clean-up was cut short
                    outcome = _process(folder, scorer, client, resumed=folder.name in spool.resumed)
                    if outcome is None:  # the PACS is down or refuses us: keep the study, try again shortly
                        stop.wait(5.0)
                        break
                    counts[outcome.status] += 1
                    table.add(outcome.rows)
                    atomic_write(folder / "DONE", outcome.status)
                shutil.rmtree(folder, ignore_errors=True)
                if stop.is_set():
                    break
            stop.wait(0.2)
    finally:
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped: %s", json.dumps(counts))
    return counts


def _process(folder: Path, scorer: StudyScorer, client, *, resumed: bool = False) -> StudyResult | None:
    """Score one spooled study and store its results. A study resumed after a crash is scored again
    even if its results reached the PACS (same UIDs: stored once), so that its rows reach the table."""
    h = folder.name
    uid = (folder / "STUDY").read_text().strip() if (folder / "STUDY").exists() else ""
    log.info("scoring study %s%s", h, " (resumed after a restart)" if resumed else "")
    try:
        if not uid:
            raise UsageError(f"spool folder {folder} has no STUDY record")
        if not resumed and scorer.already_scored(client.series(uid)):
            log.info("study %s already holds %r: skipped", h, scorer.marker)
            return StudyResult(h, "skipped")
        files = sorted(folder.glob("*.dcm"))
        result = store_back(client, scorer.score(uid, files))
    except FATAL as err:
        log.error("%s (study %s kept in the spool)", err.one_line(), h)
        return None
    except MedresError as err:
        return failed_result(h, err)
    log.info("study %s: %s (%d images, %d scored)", h, result.status, result.images, result.scored)
    return result
