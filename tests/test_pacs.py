"""`medres pacs` against a real Orthanc with its DICOMweb plugin on loopback (tests/orthanc.py):
echo, score over DICOMweb and DIMSE, results stored back into the source study and read back with
highdicom, idempotence, and each failure's code. Skips with a reason where Orthanc is not installed
(.ci/run installs it)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from medres.cli import app
import orthanc as orthanc_mod
from helpers import IDENTIFIERS, make_dicom

pytestmark = pytest.mark.skipif(orthanc_mod.missing() is not None, reason=orthanc_mod.missing() or "")
runner = CliRunner()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    server = orthanc_mod.Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture()
def login(monkeypatch):
    monkeypatch.setenv("MEDRES_PACS_USERNAME", orthanc_mod.USER)
    monkeypatch.setenv("MEDRES_PACS_PASSWORD", orthanc_mod.PASSWORD)
    for var in ("MEDRES_PACS_TOKEN", "MEDRES_PACS_CREDENTIALS"):
        monkeypatch.delenv(var, raising=False)


def _films(phantoms: Path, n: int) -> list[np.ndarray]:
    rows = list(csv.DictReader(open(phantoms)))
    pngs = [phantoms.parent / r["path"] for r in rows if r["path"].endswith(".png")][:n]
    return [(np.asarray(Image.open(p).convert("L"), dtype=np.uint16) * 16) for p in pngs]


def make_study(folder: Path, phantoms: Path, *, films: int = 2, ct: bool = False, description: str = "medres test") -> tuple[str, list[Path]]:
    """A chest DX study (PA films) with identifiers, plus a CT slice if asked: the gate must skip it."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(_films(phantoms, films)):
        paths.append(make_dicom(folder / f"{study[-8:]}-{i}.dcm", arr, identifiers=True, StudyInstanceUID=study, SeriesInstanceUID=series,
                                BodyPartExamined="CHEST", ViewPosition="PA", StudyDescription=description, InstanceNumber=i + 1, SeriesNumber=1))
    if ct:
        paths.append(make_dicom(folder / f"{study[-8:]}-ct.dcm", (np.arange(32 * 32, dtype=np.int16).reshape(32, 32) - 1000), identifiers=True, StudyInstanceUID=study,
                                SeriesInstanceUID=generate_uid(), Modality="CT", BodyPartExamined="CHEST", StudyDescription=description, SeriesNumber=2,
                                RescaleSlope=1, RescaleIntercept=0))
    return study, paths


def _series(pacs, study: str) -> list[dict]:
    from medres.pacs.clients import DicomWebClient
    from medres.pacs.servers import parse_server

    client = DicomWebClient(parse_server(pacs.dicomweb))
    return [{"uid": s.uid, "modality": s.modality, "description": s.description} for s in client.series(study)]


def _retrieve(pacs, study: str, series: str, folder: Path) -> list[pydicom.Dataset]:
    from medres.pacs.clients import DicomWebClient
    from medres.pacs.servers import parse_server

    return [pydicom.dcmread(p) for p in DicomWebClient(parse_server(pacs.dicomweb)).retrieve(study, series, folder)]


def test_echo_over_both_protocols(pacs, login):
    r = runner.invoke(app, ["pacs", "echo", "--server", pacs.dicomweb])
    assert r.exit_code == 0 and "QIDO-RS answered" in r.output, r.output
    r = runner.invoke(app, ["pacs", "echo", "--server", pacs.dimse])
    assert r.exit_code == 0 and "C-ECHO success (0x0000) from ORTHANC" in r.output, r.output


def test_score_over_dicomweb_stores_sr_and_sc_into_the_source_study(pacs, login, trained_run, phantoms, tmp_path):
    study, files = make_study(tmp_path / "in", phantoms, films=2, ct=True)
    for f in files:
        pacs.upload(f)
    out = tmp_path / "scores.csv"
    r = runner.invoke(app, ["pacs", "score", "--checkpoint", str(trained_run), "--server", pacs.dicomweb, "--study", study, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 studies: 1 scored and stored, 0 already scored, 0 failed (2 of 3 images scored" in r.output
    rows = list(csv.DictReader(open(out)))
    assert sorted(r["status"] for r in rows) == ["ok", "ok", "rejected"], rows
    ct = next(r for r in rows if r["status"] != "ok")
    assert ct["error_code"] == "UNEXPECTED_MODALITY" and ct["stored"] == ""
    assert all(r["stored"] == "yes" for r in rows if r["status"] == "ok")
    text = out.read_text() + r.output
    for secret in (*IDENTIFIERS.values(), study):
        assert secret not in text  # hashed UIDs only, no identifiers
    # The SR and the SC are in the *source* study, found by QIDO.
    series = _series(pacs, study)
    sr_series = [s for s in series if s["modality"] == "SR"]
    sc_series = [s for s in series if s["description"].startswith("medres Grad-CAM")]
    assert len(sr_series) == 1 and sr_series[0]["description"].startswith("medres AI results ") and len(sc_series) == 1
    (sr,) = _retrieve(pacs, study, sr_series[0]["uid"], tmp_path / "sr")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.StudyInstanceUID == study and sr.PatientID == IDENTIFIERS["PatientID"]  # filed with the patient's study
    equipment = sr.ContributingEquipmentSequence[0]
    assert equipment.Manufacturer == "medres" and equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    from medres.pacs.sr import read_probabilities

    read = read_probabilities(sr)
    by_sop = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in files}
    from medres.pacs.clients import uid_hash

    for row in (r for r in rows if r["status"] == "ok"):
        sop = next(uid for uid in by_sop if row["path"].endswith(f"{uid_hash(uid)}.dcm"))
        assert read[sop] == pytest.approx({c[5:]: float(v) for c, v in row.items() if c.startswith("prob_")}, abs=1e-6)
    scs = _retrieve(pacs, study, sc_series[0]["uid"], tmp_path / "sc")
    assert len(scs) == 2 and {str(s.SourceImageSequence[0].ReferencedSOPInstanceUID) for s in scs} == set(read)
    # A second run finds this checkpoint's results in the study and skips it.
    r = runner.invoke(app, ["pacs", "score", "--checkpoint", str(trained_run), "--server", pacs.dicomweb, "--study", study])
    assert r.exit_code == 0 and "0 scored and stored, 1 already scored" in r.output, r.output
    assert len(_series(pacs, study)) == len(series)


def test_score_over_dimse_by_query(pacs, login, trained_run, phantoms, tmp_path):
    study, files = make_study(tmp_path / "in", phantoms, films=1, description="medres dimse query")
    for f in files:
        pacs.upload(f)
    out = tmp_path / "scores.csv"
    r = runner.invoke(app, ["pacs", "score", "--checkpoint", str(trained_run), "--server", pacs.dimse, "--query", "StudyDescription=medres dimse query",
                            "--no-heatmaps", "--out", str(out)])
    assert r.exit_code == 0 and "1 studies: 1 scored and stored" in r.output, r.output
    series = _series(pacs, study)
    assert [s["modality"] for s in series if s["modality"] == "SR"] == ["SR"]  # C-STORE put it in the source study
    assert not any(s["description"].startswith("medres Grad-CAM") for s in series)
    assert [row["stored"] for row in csv.DictReader(open(out))] == ["yes"]


def test_failures_have_codes(pacs, login, trained_run, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDRES_PACS_PASSWORD", "wrong")
    r = runner.invoke(app, ["pacs", "echo", "--server", pacs.dicomweb])
    assert r.exit_code == 4 and "[PACS_AUTH_FAILED]" in r.output and "HTTP 401" in r.output and "wrong" not in r.output
    closed = orthanc_mod.free_port()
    r = runner.invoke(app, ["pacs", "echo", "--server", f"ORTHANC@127.0.0.1:{closed}"])
    assert r.exit_code == 4 and "[PACS_UNREACHABLE]" in r.output, r.output
    r = runner.invoke(app, ["pacs", "echo", "--server", f"http://127.0.0.1:{closed}/dicom-web"])
    assert r.exit_code == 4 and "[PACS_UNREACHABLE]" in r.output, r.output
    r = runner.invoke(app, ["pacs", "echo", "--server", f"NOTORTHANC@127.0.0.1:{pacs.dicom_port}"])
    assert r.exit_code == 4 and "[PACS_ASSOCIATION_REJECTED]" in r.output, r.output
    monkeypatch.setenv("MEDRES_PACS_PASSWORD", orthanc_mod.PASSWORD)
    r = runner.invoke(app, ["pacs", "score", "--checkpoint", str(trained_run), "--server", pacs.dicomweb, "--study", generate_uid(), "--out", str(tmp_path / "o.csv")])
    assert r.exit_code == 1 and "[PACS_NO_IMAGES]" in r.output and "not found on the server" in r.output, r.output


def test_a_refused_store_keeps_the_scores(pacs, login, trained_run, phantoms, tmp_path, monkeypatch):
    from medres.errors import PacsStoreRejected
    from medres.pacs import clients

    study, files = make_study(tmp_path / "in", phantoms, films=1)
    for f in files:
        pacs.upload(f)

    def refuse(self, datasets):
        raise PacsStoreRejected(f"{self.server.label}: STOW-RS refused 1 of {len(datasets)} instances (failure reasons 0xa700)")

    monkeypatch.setattr(clients.DicomWebClient, "store", refuse)
    out = tmp_path / "scores.csv"
    r = runner.invoke(app, ["pacs", "score", "--checkpoint", str(trained_run), "--server", pacs.dicomweb, "--study", study, "--no-heatmaps", "--out", str(out)])
    assert r.exit_code == 1 and "[PACS_STORE_REJECTED]" in r.output, r.output
    (row,) = csv.DictReader(open(out))
    assert row["status"] == "ok" and row["stored"] == "failed" and sum(float(v) for c, v in row.items() if c.startswith("prob_")) == pytest.approx(1, abs=1e-5)


def _send(files: list[Path], port: int, called: str = "MEDRES") -> list[int]:
    """One association (pynetdicom as a modality would); the statuses of its C-STOREs."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def _wait(predicate, seconds: float, what: str, log: Path | None = None):
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log.read_text(errors='replace')[-3000:]}" if log and log.exists() else ""))


def test_listen_scores_a_study_sent_over_two_associations_once_across_kill_9(pacs, login, trained_run, phantoms, tmp_path):
    """Two associations → one job; kill -9 while the study is being scored → after a restart it is
    scored and stored exactly once; a wrong called AE is refused; SIGINT stops it cleanly."""
    import signal
    import subprocess
    import sys

    study, files = make_study(tmp_path / "in", phantoms, films=2)
    port, spool, out = orthanc_mod.free_port(), tmp_path / "spool", tmp_path / "listen.csv"
    cmd = [sys.executable, "-m", "medres", "listen", "--checkpoint", str(trained_run), "--port", str(port), "--store-to", pacs.dicomweb,
           "--spool", str(spool), "--quiet-seconds", "1.5", "--out", str(out), "--no-heatmaps"]

    def start(log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _wait(lambda: b"listening as MEDRES" in log.read_bytes() or proc.poll() is not None, 180, "the listener to start", log)
        assert proc.poll() is None, log.read_text()
        return proc

    first = start(tmp_path / "first.log")
    try:
        from pynetdicom import AE

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(pydicom.uid.DigitalXRayImageStorageForPresentation)
        assert ae.associate("127.0.0.1", port, ae_title="SOMEONEELSE").is_rejected  # called-AET check
        assert _send(files[:1], port) == [0]
        assert _send(files[1:], port) == [0]  # a second association, inside the quiet time: the same job
        _wait(lambda: any((spool / "processing").iterdir()), 60, "the study to be taken up", tmp_path / "first.log")
    finally:
        first.kill()  # SIGKILL, mid-study
        first.wait()
    second = start(tmp_path / "second.log")
    try:
        _wait(lambda: any(s["modality"] == "SR" for s in _series(pacs, study)) and out.exists() and len(list(csv.DictReader(open(out)))) >= 2
              and not any((spool / "processing").iterdir()), 180, "the SR after the restart", tmp_path / "second.log")
    finally:
        second.send_signal(signal.SIGINT)  # Ctrl-C
        assert second.wait(timeout=60) == 0, (tmp_path / "second.log").read_text()
    assert "stopped:" in (tmp_path / "second.log").read_text()
    (sr_series,) = [s for s in _series(pacs, study) if s["modality"] == "SR"]
    import requests

    instances = requests.get(f"{pacs.dicomweb}/studies/{study}/series/{sr_series['uid']}/instances", auth=(orthanc_mod.USER, orthanc_mod.PASSWORD), timeout=30).json()
    assert len(instances) == 1  # stored once, though the first run may have stored it before the kill
    rows = list(csv.DictReader(open(out)))
    assert [r["status"] for r in rows] == ["ok", "ok"] and {r["stored"] for r in rows} == {"yes"}  # the table has the study once
    log_text = (tmp_path / "first.log").read_text() + (tmp_path / "second.log").read_text() + out.read_text()
    for secret in (*IDENTIFIERS.values(), study):
        assert secret not in log_text
