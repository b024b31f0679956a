"""`medres pacs score`: find studies, retrieve their images, score them on predict's path (the input
gate applies: a lateral or a CT series is reported and not scored), store a Comprehensive SR and the
Grad-CAM Secondary Captures back into the same study, and write the usual output table.

The table (`--out`) has one row per retrieved image (predict's columns, `path` = hashed study/SOP
UIDs) plus `study` and `stored`; a study that fails gets a row with its code. It is rewritten
atomically after every study, so an interrupted run keeps everything already scored.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from medres.errors import MedresError, NoInputs, PacsAssociationRejected, PacsAuthFailed, PacsError, PacsNoImages, PacsUnreachable, UsageError
from medres.io.capture import one_line
from medres.files import atomic_write, csv_text
from medres.pacs.clients import NON_IMAGE_MODALITIES, client_for, read_header, uid_hash
from medres.pacs.servers import Server
from medres.pacs.sr import build_sr, series_description

log = logging.getLogger("medres.pacs")

# Server-level failures: no later study can succeed either, so stop (after saving the table).
FATAL = (PacsUnreachable, PacsAuthFailed, PacsAssociationRejected)
# Studies retrieved and scored together: one pass of the model and of the report over their images
# (per-study calls cost more than scoring a film), while a failure costs at most this many studies' work.
CHUNK_STUDIES = 16


@dataclass
class StudyResult:
    study: str  # uid_hash of the Study Instance UID
    status: str  # scored | skipped | failed
    images: int = 0
    scored: int = 0
    code: str = ""
    message: str = ""
    rows: list[dict] = field(default_factory=list)
    datasets: list = field(default_factory=list)  # SR + SCs to store back


class StudyScorer:
    """Scores one study's spooled images and builds what goes back into the study; shared by
    `pacs score` and `listen`."""

    def __init__(self, checkpoint: str | Path, *, gate: str = "flag", heatmaps: bool = True, device: str = "auto", precision: str = "auto",
                 batch_size: int = 16, workers: int = 0):
        from medres import api
        from medres.model import sha256_of

        self.model = api.load(checkpoint, device=device, precision=precision)
        self.checkpoint = self.model.checkpoint
        self.sha = sha256_of(self.checkpoint)
        self.marker = series_description(self.sha)
        self.gate, self.heatmaps, self.device, self.precision = gate, heatmaps, device, precision
        self.batch_size, self.workers = batch_size, workers

    def columns(self) -> list[str]:
        from medres.predict import columns

        return ["study", "stored", *columns(self.model.meta)]

    def already_scored(self, series) -> bool:
        return any(s.description.strip() == self.marker for s in series)

    def score(self, study_uid: str, files: list[Path], *, nonce: str = "") -> StudyResult:
        """One study; a study with nothing scorable raises its PACS_* error."""
        (result,) = self.score_many([(study_uid, files)], nonce=nonce)
        if isinstance(result, MedresError):
            raise result
        return result

    def score_many(self, studies: list[tuple[str, list[Path]]], *, nonce: str = "") -> list[StudyResult | MedresError]:
        """Several studies' images in one pass of predict's path (and one report for the heatmaps):
        per study a StudyResult with its rows, SR and SCs, or the error that stopped it."""
        from medres.scoring import InputFile

        files = [f for _, fs in studies for f in fs]
        inputs = [InputFile(str(f), f"{f.parent.name}/{f.name}") for f in files]
        rows = iter(self.model.rows(inputs, gate=self.gate, batch_size=self.batch_size, workers=self.workers)) if inputs else iter(())
        out: list[StudyResult | MedresError] = []
        for uid, fs in studies:
            h = uid_hash(uid)
            study_rows = [{"study": h, "stored": "", **next(rows)} for _ in fs]
            out.append(self._result(uid, fs, study_rows, nonce))
        if self.heatmaps:
            scored = [[f for f, r in zip(fs, res.rows) if r["status"] == "ok"] for (_, fs), res in zip(studies, out) if isinstance(res, StudyResult)]
            captures = self._secondary_captures([f for fs in scored for f in fs], nonce)
            for res in out:
                if isinstance(res, StudyResult):
                    res.datasets += captures.get(res.study, [])
        return out

    def _result(self, uid: str, files: list[Path], rows: list[dict], nonce: str) -> StudyResult | MedresError:
        h = uid_hash(uid)
        if not files:
            return PacsNoImages(f"study {h}: no image instance was retrieved")
        ok = [(f, r) for f, r in zip(files, rows) if r["status"] == "ok"]
        if not ok:
            reasons = sorted({r["error_code"] for r in rows if r["error_code"]})
            err = PacsNoImages(f"study {h}: none of its {len(files)} images could be scored ({', '.join(reasons) or 'no reason given'})")
            err.rows = rows  # the images' own codes still reach the table
            return err
        meta = self.model.meta
        try:
            sr = build_sr([(read_header(f), r) for f, r in ok], list(meta.classes), meta.task, checkpoint_sha=self.sha, nonce=nonce)
        except (ValueError, TypeError, AttributeError) as exc:  # highdicom refuses what the source headers lack
            return PacsError(f"study {h}: the SR could not be built from its images' headers ({one_line(str(exc))})")
        return StudyResult(h, "scored", images=len(files), scored=len(ok), rows=rows, datasets=[sr])

    def _secondary_captures(self, files: list[Path], nonce: str) -> dict[str, list]:
        """The report's Grad-CAM overlays as Secondary Capture in each source study ({study hash: SCs}),
        one series per study and checkpoint, UIDs derived so that storing twice stores the same instances."""
        from medres.report import report

        if not files:
            return {}
        out: dict[str, list] = {}
        with tempfile.TemporaryDirectory(prefix="medres-pacs-cam-", dir=files[0].parent.parent) as tmp:
            report(self.checkpoint, [str(f) for f in files], Path(tmp), dicom_sc=True, include_identifiers=True, gate=self.gate,
                   workers=0, device=self.device, precision=self.precision)
            for path in sorted(Path(tmp, "cases").glob("*_cam_*.dcm")):
                sc = pydicom.dcmread(str(path))
                study = str(sc.StudyInstanceUID)
                source = str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
                sc.SeriesInstanceUID = generate_uid(entropy_srcs=["medres-sc-series", study, self.sha, nonce])
                sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["medres-sc", source, self.sha, str(sc.SeriesDescription), nonce])
                sc.SeriesDescription = f"medres Grad-CAM {self.sha[:12]}"[:64]
                out.setdefault(uid_hash(study), []).append(sc)
        return out


class ResultTable:
    """The output table, rewritten atomically after each study (nothing scored is lost)."""

    def __init__(self, path: Path | None, columns: list[str]):
        self.path, self.columns, self.rows = path, columns, []

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        if self.path is not None:
            atomic_write(self.path, csv_text(self.columns, [[r.get(c, "") for c in self.columns] for r in self.rows]))


def failure_row(study: str, err: MedresError) -> dict:
    return {"study": study, "path": study, "status": "error", "error_code": err.code, "message": err.one_line()}


def parse_query(pairs: list[str]) -> dict[str, str]:
    query = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--query {pair!r}: expected KEY=VALUE (a DICOM keyword or tag, e.g. ModalitiesInStudy=CR or StudyDate=20240101-)")
        query[key.strip()] = value.strip()
    return query


def pacs_score(checkpoint: str | Path, server: Server, *, studies: list[str] = (), query: list[str] = (), out: str | Path | None = None,
               rescore: bool = False, heatmaps: bool = True, gate: str = "flag", device: str = "auto", precision: str = "auto",
               batch_size: int = 16, workers: int = 0, work: str | Path | None = None) -> dict:
    """Score each study and store its results back; returns a summary (per-study outcomes by hash)."""
    if not studies and not query:
        raise UsageError("name the studies: --study UID (repeatable) or --query KEY=VALUE")
    client = client_for(server)
    uids = list(dict.fromkeys([*studies, *(client.find_studies(parse_query(list(query))) if query else [])]))
    if not uids:
        raise NoInputs(f"{server.label}: no study matched {' '.join(query)}")
    scorer = StudyScorer(checkpoint, gate=gate, heatmaps=heatmaps, device=device, precision=precision, batch_size=batch_size, workers=workers)
    table = ResultTable(Path(out) if out else None, scorer.columns())
    spool = Path(tempfile.mkdtemp(prefix="medres-pacs-", dir=work)) if work or out is None else Path(tempfile.mkdtemp(prefix=".medres-pacs-", dir=Path(out).parent))
    outcomes: list[StudyResult] = []
    started = time.perf_counter()
    try:
        for i in range(0, len(uids), CHUNK_STUDIES):
            for outcome in _score_chunk(client, scorer, uids[i : i + CHUNK_STUDIES], spool, rescore=rescore):
                outcomes.append(outcome)
                table.add(outcome.rows)
                log.info("study %s: %s (%d images, %d scored)%s", outcome.study, outcome.status, outcome.images, outcome.scored, f" {outcome.code}" if outcome.code else "")
    finally:
        shutil.rmtree(spool, ignore_errors=True)
        getattr(client, "close", lambda: None)()
    return summary_of(outcomes, server, time.perf_counter() - started, table.path)


def _score_chunk(client, scorer: StudyScorer, uids: list[str], spool: Path, *, rescore: bool) -> list[StudyResult]:
    """Retrieve a few studies, score their images in one pass, store each study's results back."""
    ready: list[tuple[str, list[Path]]] = []
    done: dict[str, StudyResult] = {}
    for uid in uids:
        h = uid_hash(uid)
        try:
            series = client.series(uid)
            if not series:
                raise PacsNoImages(f"study {h}: not found on the server")
            if not rescore and scorer.already_scored(series):
                done[uid] = StudyResult(h, "skipped", message=f"already holds '{scorer.marker}' (pass --rescore to score again)")
                continue
            images = [s for s in series if s.modality.upper() not in NON_IMAGE_MODALITIES and not s.description.startswith("medres")]
            ready.append((uid, [f for s in images for f in client.retrieve(uid, s.uid, spool / h)]))
        except FATAL:
            raise
        except MedresError as err:
            done[uid] = failed_result(h, err)
    try:
        results = scorer.score_many(ready, nonce=str(time.time_ns()) if rescore else "")
        for (uid, _), result in zip(ready, results):
            done[uid] = store_back(client, result) if isinstance(result, StudyResult) else failed_result(uid_hash(uid), result)
    finally:
        for uid, _ in ready:
            shutil.rmtree(spool / uid_hash(uid), ignore_errors=True)
    return [done[uid] for uid in uids]


def failed_result(h: str, err: MedresError) -> StudyResult:
    log.warning("%s", err.one_line())
    rows = getattr(err, "rows", None) or [failure_row(h, err)]
    return StudyResult(h, "failed", images=len(getattr(err, "rows", None) or []), code=err.code, message=err.one_line(), rows=rows)


def store_back(client, result: StudyResult) -> StudyResult:
    """Store the SR (+ SCs); a refusal keeps the scores in the table, marked `stored=failed`."""
    try:
        client.store(result.datasets)
        stored = "yes"
    except FATAL:
        raise
    except MedresError as err:
        log.warning("%s", err.one_line())
        result.status, result.code, result.message, stored = "failed", err.code, err.one_line(), "failed"
    for row in result.rows:
        row["stored"] = stored if row["status"] == "ok" else ""
    return result


def summary_of(outcomes: list[StudyResult], server: Server, seconds: float, out: Path | None) -> dict:
    counts = {k: sum(o.status == k for o in outcomes) for k in ("scored", "skipped", "failed")}
    return {"server": server.label, "studies": len(outcomes), **counts, "images": int(np.sum([o.images for o in outcomes])) if outcomes else 0,
            "images_scored": sum(o.scored for o in outcomes), "seconds": round(seconds, 2), "out": str(out) if out else None,
            "outcomes": [{"study": o.study, "status": o.status, "images": o.images, "scored": o.scored, "code": o.code, "message": o.message} for o in outcomes]}
