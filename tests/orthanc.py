"""A real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) on loopback for the PACS tests: a
temporary storage folder, free ports, HTTP authentication on, remote access off, medres's AE
registered for C-GET/C-FIND; started and stopped by process id."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = next((p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so") if os.path.exists(p)), None)
USER, PASSWORD = "medres", "s3cret-test"


def missing() -> str | None:
    """Why the PACS tests cannot run here, or None."""
    if not os.path.exists(ORTHANC):
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb dcmtk; .ci/run does)"
    if DICOMWEB_PLUGIN is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, folder: Path, *, medres_port: int = 0):
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.medres_port = medres_port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"ORTHANC@127.0.0.1:{self.dicom_port}"

    def start(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medres-test", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StowMaxInstances": 0},
            "DicomModalities": {"medres": ["MEDRES", "127.0.0.1", self.medres_port]},
            "DicomCheckCalledAet": True, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
            "StableAge": 1, "HttpThreadsCount": 8, "SaveJobs": False,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text(errors='replace')[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", auth=(USER, PASSWORD), timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def upload(self, path: Path) -> None:
        r = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), auth=(USER, PASSWORD), timeout=30)
        r.raise_for_status()

    def get(self, route: str):
        r = requests.get(f"{self.url}{route}", auth=(USER, PASSWORD), timeout=30)
        r.raise_for_status()
        return r.json()

    def delete_study(self, study_uid: str) -> None:
        for oid in requests.post(f"{self.url}/tools/lookup", data=study_uid, auth=(USER, PASSWORD), timeout=30).json():
            requests.delete(f"{self.url}/studies/{oid['ID']}", auth=(USER, PASSWORD), timeout=30)
