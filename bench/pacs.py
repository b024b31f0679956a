"""Scoring through a PACS against scoring the same files from a folder, in one run: a real Orthanc
with its DICOMweb plugin on loopback (tests/orthanc.py), studies of real chest films from
../shared/data/cxr written as DX DICOMs (2 films a study).

(a) `medres predict` on the folder of those DICOMs (baseline);
(b) `medres pacs score` over DICOMweb and (c) over DIMSE, --no-heatmaps (the same work as predict:
    find, retrieve, score, SR, store back), studies per minute and the ratio to (a);
(d) `pacs score` over DICOMweb with the Grad-CAM SCs against `report --dicom-sc` on the folder;
(e) `medres listen`: time from the last instance's C-STORE response to the SR being queryable in
    Orthanc (QIDO), median and worst; the quiet time (--quiet-seconds) is part of it and printed.

    .venv/bin/python bench/pacs.py --checkpoint runs/bench-shift/model.safetensors [--studies 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import ROOT, SHARED, machine, need, save, table

sys.path.insert(0, str(ROOT / "tests"))


def write_studies(folder: Path, n_studies: int, per_study: int) -> dict[str, list[Path]]:
    import pandas as pd
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rows = pd.read_csv(need(SHARED / "cxr" / "manifest.csv"))
    paths = [SHARED / "cxr" / p for p in rows["path"][: n_studies * per_study]]
    studies: dict[str, list[Path]] = {}
    for s in range(n_studies):
        study, series = generate_uid(), generate_uid()
        for i, src in enumerate(paths[s * per_study : (s + 1) * per_study]):
            arr = np.asarray(Image.open(src).convert("L"), dtype=np.uint8)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(str(folder / f"s{s:03d}-{i}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "DX"
            ds.PatientID, ds.PatientName, ds.StudyDescription = f"BENCH{s:03d}", "Bench^Patient", "medres bench"
            ds.BodyPartExamined, ds.ViewPosition, ds.InstanceNumber = "CHEST", "PA", i + 1
            ds.Rows, ds.Columns = arr.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit, ds.PixelRepresentation = 7, 0
            ds.PixelData = arr.tobytes()
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(ds.filename, enforce_file_format=True)
            studies.setdefault(study, []).append(Path(ds.filename))
    return studies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "bench-shift" / "model.safetensors")
    ap.add_argument("--studies", type=int, default=30)
    ap.add_argument("--per-study", type=int, default=2)
    ap.add_argument("--listen-studies", type=int, default=5)
    ap.add_argument("--quiet-seconds", type=float, default=1.0)
    args = ap.parse_args()
    import orthanc as orthanc_mod

    from medres.pacs.score import pacs_score
    from medres.pacs.servers import parse_server
    from medres.predict import predict
    from medres.report import report

    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="medres-bench-pacs-"))
    os.environ.update(MEDRES_PACS_USERNAME=orthanc_mod.USER, MEDRES_PACS_PASSWORD=orthanc_mod.PASSWORD)
    server = orthanc_mod.Orthanc(work / "orthanc").start()
    try:
        studies = write_studies(work / "dicom", args.studies, args.per_study)
        for files in studies.values():
            for f in files:
                server.upload(f)
        n_images = sum(len(v) for v in studies.values())
        # warm-up: model load, first-call costs, on one study (not timed)
        first = next(iter(studies))
        pacs_score(args.checkpoint, parse_server(server.dicomweb), studies=[first], out=work / "warm.csv", heatmaps=False)
        server.delete_study(first)
        for f in studies[first]:
            server.upload(f)

        results = []
        t0 = time.perf_counter()
        predict(args.checkpoint, [str(work / "dicom")], work / "folder.csv", overwrite=True)
        folder_s = time.perf_counter() - t0
        results.append(("predict on the folder (baseline)", folder_s))
        for label, target in (("pacs score, DICOMweb", server.dicomweb), ("pacs score, DIMSE", server.dimse)):
            t0 = time.perf_counter()
            summary = pacs_score(args.checkpoint, parse_server(target), studies=list(studies), out=work / "pacs.csv", heatmaps=False, rescore=True)
            assert summary["scored"] == len(studies), summary
            results.append((label, time.perf_counter() - t0))
        t0 = time.perf_counter()
        report(args.checkpoint, [str(work / "dicom")], work / "report", dicom_sc=True)
        report_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pacs_score(args.checkpoint, parse_server(server.dicomweb), studies=list(studies), out=work / "pacs-sc.csv", heatmaps=True, rescore=True)
        sc_s = time.perf_counter() - t0

        rows = [(label, f"{s:.1f}", f"{60 * len(studies) / s:.1f}", f"{n_images / s:.2f}", f"{folder_s / s:.2f}×") for label, s in results]
        rows += [("report --dicom-sc on the folder (baseline)", f"{report_s:.1f}", f"{60 * len(studies) / report_s:.1f}", f"{n_images / report_s:.2f}", "1.00×"),
                 ("pacs score, DICOMweb, with Grad-CAM SCs", f"{sc_s:.1f}", f"{60 * len(studies) / sc_s:.1f}", f"{n_images / sc_s:.2f}", f"{report_s / sc_s:.2f}× of report")]
        print(f"\n{len(studies)} studies, {n_images} real chest films (../shared/data/cxr) as DX DICOMs; checkpoint {args.checkpoint}")
        print(table(rows, ("path", "seconds", "studies/min", "images/s", "vs folder")))

        latencies = listen_latency(args, server, work)
        print(f"\nlisten: last C-STORE response → SR queryable in Orthanc, {len(latencies)} studies, --quiet-seconds {args.quiet_seconds}: "
              f"median {statistics.median(latencies):.2f} s, worst {max(latencies):.2f} s")
        save("pacs", {"machine": machine(), "results": results, "report_s": report_s, "pacs_sc_s": sc_s, "studies": len(studies), "images": n_images,
                      "listen_latency_s": latencies, "quiet_seconds": args.quiet_seconds})
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def listen_latency(args, server, work: Path) -> list[float]:
    import pydicom
    from pynetdicom import AE

    from medres.pacs.clients import DicomWebClient
    from medres.pacs.listen import listen
    from medres.pacs.servers import parse_server

    import orthanc as orthanc_mod

    fresh = write_studies(work / "listen-in", args.listen_studies, args.per_study)
    port, stop = orthanc_mod.free_port(), threading.Event()
    ready = threading.Event()
    thread = threading.Thread(target=listen, args=(args.checkpoint,), kwargs=dict(port=port, store_to=parse_server(server.dicomweb), spool=work / "spool",
                              quiet_seconds=args.quiet_seconds, heatmaps=False, stop=stop, on_ready=ready.set), daemon=True)
    thread.start()
    ready.wait(120)
    client = DicomWebClient(parse_server(server.dicomweb))
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(pydicom.uid.DigitalXRayImageStorageForPresentation)
    out = []
    for study, files in fresh.items():
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDRES")
        for f in files:
            assoc.send_c_store(pydicom.dcmread(f))
        t0 = time.perf_counter()
        assoc.release()
        while not any(s.modality == "SR" for s in client.series(study)):
            time.sleep(0.05)
        out.append(time.perf_counter() - t0)
    stop.set()
    thread.join(60)
    return out


if __name__ == "__main__":
    main()
