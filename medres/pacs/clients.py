"""One interface, two protocols. `client_for(server)` gives an object with:

    echo() -> str                                  what answered
    find_studies(query) -> [study UID]             QIDO-RS /studies or C-FIND STUDY
    series(study) -> [Series]                      QIDO-RS /series or C-FIND SERIES
    retrieve(study, series, folder) -> [Path]      WADO-RS or C-GET, each instance written durably
    store(datasets) -> None                        STOW-RS or C-STORE

Failures become PACS_* errors with one line naming the server (never a credential). UIDs reach
files and logs only as `uid_hash` (a salted one-way hash), as everywhere in medres.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from medres.errors import PacsAssociationRejected, PacsAuthFailed, PacsError, PacsStoreRejected, PacsUnreachable
from medres.files import atomic_path
from medres.pacs.servers import Server, credentials

log = logging.getLogger("medres.pacs")

NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "REG", "SEG", "RTSTRUCT", "DOC", "OT-SR"})
TIMEOUT = 30.0


def uid_hash(uid: str) -> str:
    """A short one-way name for a UID: stable across runs, useless for re-identification."""
    return hashlib.sha256(f"medres-uid-v1|{uid}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Series:
    uid: str
    modality: str
    description: str


def client_for(server: Server):
    return DicomWebClient(server) if server.kind == "dicomweb" else DimseClient(server)


def write_instance(ds: Dataset, folder: Path) -> Path:
    """Spool one instance durably (fsync + rename) under its hashed SOP Instance UID."""
    path = folder / f"{uid_hash(str(ds.SOPInstanceUID))}.dcm"
    with atomic_path(path) as tmp:
        ds.save_as(str(tmp), enforce_file_format=True)
    return path


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


# --- DICOMweb -------------------------------------------------------------------------------------
class DicomWebClient:
    def __init__(self, server: Server):
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.server = server
        session = requests.Session()
        creds = credentials()
        if creds.token:
            session.headers["Authorization"] = f"Bearer {creds.token}"
        elif creds.username:
            session.auth = (creds.username, creds.password)
        if server.ca_bundle:
            session.verify = server.ca_bundle
        if server.client_cert:
            session.cert = (server.client_cert, server.client_key) if server.client_key else server.client_cert
        self._client = DICOMwebClient(server.url, session=session, timeout=TIMEOUT)
        # dicomweb-client's default (5 attempts, 1 s exponential back-off) spends 30 s on a closed port;
        # 3 attempts from 0.25 s still ride out a busy server's 429/503.
        self._client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)

    def _call(self, what: str, fn, *args, **kwargs):
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise PacsUnreachable(f"{self.server.label}: TLS handshake failed during {what} ({type(exc).__name__}); check --ca-bundle / client certificate") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
            raise PacsUnreachable(f"{self.server.label}: no answer to {what} (is the server running and the URL right?)") from None
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code in (401, 403):
                raise PacsAuthFailed(f"{self.server.label}: {what} refused with HTTP {code}; check MEDRES_PACS_USERNAME/PASSWORD or MEDRES_PACS_TOKEN") from None
            error = PacsStoreRejected if what == "STOW-RS" else PacsError
            raise error(f"{self.server.label}: {what} failed with HTTP {code}") from None

    def echo(self) -> str:
        found = self._call("QIDO-RS", self._client.search_for_studies, limit=1)
        return f"DICOMweb {self.server.label}: QIDO-RS answered ({'studies visible' if found else 'no study visible yet'})"

    def find_studies(self, query: dict[str, str]) -> list[str]:
        found = self._call("QIDO-RS", self._client.search_for_studies, search_filters=dict(query), fields=["StudyInstanceUID"], get_remaining=True)
        return sorted({_value(item, "0020000D") for item in found} - {""})

    def series(self, study: str) -> list[Series]:
        found = self._call("QIDO-RS", self._client.search_for_series, study_instance_uid=study, fields=["Modality", "SeriesDescription"], get_remaining=True)
        return [Series(_value(i, "0020000E"), _value(i, "00080060"), _value(i, "0008103E")) for i in found]

    def retrieve(self, study: str, series: str, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        datasets = self._call("WADO-RS", lambda: list(self._client.iter_series(study, series)))
        return [write_instance(ds, folder) for ds in datasets]

    def close(self) -> None:
        self._client._session.close() if hasattr(self._client, "_session") else None

    def store(self, datasets: list[Dataset]) -> None:
        if not datasets:
            return
        response = self._call("STOW-RS", self._client.store_instances, datasets)
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if failed:
            reasons = sorted({f"{int(item.get('FailureReason', 0)):#06x}" for item in failed})
            raise PacsStoreRejected(f"{self.server.label}: STOW-RS refused {len(failed)} of {len(datasets)} instances (failure reasons {', '.join(reasons)})")


# --- DIMSE ----------------------------------------------------------------------------------------
_IMAGE_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.1",      # CR
    "1.2.840.10008.5.1.4.1.1.1.1",    # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.2",      # CT (retrieved so that the gate can say why it is not scored)
    "1.2.840.10008.5.1.4.1.1.4",      # MR
)
_STORE_BACK = ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7")  # Comprehensive SR, Secondary Capture


class DimseClient:
    """DIMSE over at most two associations kept open between calls — one for C-FIND/C-GET (with SCP
    roles for the image storage classes it retrieves), one for C-STORE — since opening an association
    costs ~0.1 s, more than scoring a film. `close()` releases them."""

    def __init__(self, server: Server):
        self.server = server
        self._open: dict[str, object] = {}
        self._sink: tuple[Path, list[Path]] | None = None

    def _associate(self, contexts: list[str], *, get_roles: tuple[str, ...] = (), handlers=None):
        from pynetdicom import AE, build_role
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet, Verification

        named = {"echo": Verification, "find": StudyRootQueryRetrieveInformationModelFind, "get": StudyRootQueryRetrieveInformationModelGet}
        ae = AE(ae_title=self.server.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        for c in contexts:
            ae.add_requested_context(named.get(c, c))
        for uid in get_roles:
            ae.add_requested_context(uid)
        try:
            socket.create_connection((self.server.host, self.server.port), timeout=5).close()
        except OSError as exc:
            raise PacsUnreachable(f"{self.server.label}: cannot connect ({exc.strerror or type(exc).__name__})") from None
        ctx = self.server.ssl_context()
        kwargs = {"tls_args": (ctx, self.server.host)} if ctx else {}
        roles = [build_role(uid, scp_role=True) for uid in get_roles]
        assoc = ae.associate(self.server.host, self.server.port, ae_title=self.server.aet, ext_neg=roles or None, evt_handlers=handlers or [], **kwargs)
        if assoc.is_rejected:
            raise PacsAssociationRejected(f"{self.server.label}: association rejected (calling AE {self.server.calling_aet!r}, called AE {self.server.aet!r}); "
                                          "is medres's AE title known to the PACS?")
        if not assoc.is_established:
            raise PacsAssociationRejected(f"{self.server.label}: association aborted before it was established")
        _no_delay(assoc)
        return assoc

    def _session(self, kind: str):
        """The open association for "query" (C-FIND + C-GET) or "store" (C-STORE), reopened if the
        peer closed it."""
        from pynetdicom import evt

        assoc = self._open.get(kind)
        if assoc is not None and assoc.is_established:
            return assoc
        if kind == "query":
            assoc = self._associate(["find", "get"], get_roles=_IMAGE_STORAGE, handlers=[(evt.EVT_C_STORE, self._on_store)])
        else:
            assoc = self._associate(list(_STORE_BACK))
        self._open[kind] = assoc
        return assoc

    def _drop(self, kind: str) -> None:
        assoc = self._open.pop(kind, None)
        if assoc is not None and assoc.is_established:
            assoc.abort()

    def close(self) -> None:
        for kind in list(self._open):
            assoc = self._open.pop(kind)
            if assoc.is_established:
                assoc.release()

    def _on_store(self, event):
        if self._sink is None:
            return 0xA700  # a C-STORE outside a C-GET of ours
        ds = event.dataset
        ds.file_meta = event.file_meta
        folder, written = self._sink
        written.append(write_instance(ds, folder))
        return 0x0000

    def echo(self) -> str:
        assoc = self._associate(["echo"])
        try:
            status = assoc.send_c_echo()
            code = int(getattr(status, "Status", -1)) if status else -1
            acceptor = assoc.acceptor.ae_title.strip() if isinstance(assoc.acceptor.ae_title, str) else assoc.acceptor.ae_title
            impl = assoc.acceptor.implementation_version_name or "unknown implementation"
        finally:
            assoc.release()
        if code != 0:
            raise PacsError(f"{self.server.label}: C-ECHO answered status {code:#06x}" if code >= 0 else f"{self.server.label}: C-ECHO got no answer")
        return f"DIMSE {self.server.label}: C-ECHO success (0x0000) from {acceptor} ({impl})"

    def _find(self, level: str, keys: dict[str, str]) -> list[Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        assoc = self._session("query")
        found = []
        try:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in (0xFF00, 0xFF01) and identifier is not None:
                    found.append(identifier)
                elif code != 0x0000:
                    raise PacsError(f"{self.server.label}: C-FIND {level} failed with status {code:#06x}" if code >= 0 else f"{self.server.label}: C-FIND {level} got no answer")
        except BaseException:
            self._drop("query")
            raise
        return found

    def find_studies(self, query: dict[str, str]) -> list[str]:
        keys = {"StudyInstanceUID": "", **{_keyword(k): v for k, v in query.items()}}
        return sorted({str(ds.get("StudyInstanceUID", "")) for ds in self._find("STUDY", keys)} - {""})

    def series(self, study: str) -> list[Series]:
        found = self._find("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": "", "Modality": "", "SeriesDescription": ""})
        return [Series(str(ds.get("SeriesInstanceUID", "")), str(ds.get("Modality", "")), str(ds.get("SeriesDescription", ""))) for ds in found]

    def retrieve(self, study: str, series: str, folder: Path) -> list[Path]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        folder.mkdir(parents=True, exist_ok=True)
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = series
        assoc = self._session("query")
        self._sink = (folder, [])
        try:
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                code = int(getattr(status, "Status", -1)) if status else -1
                if code not in (0x0000, 0xFF00, 0xFF01, 0xB000):
                    raise PacsError(f"{self.server.label}: C-GET failed with status {code:#06x}" if code >= 0 else f"{self.server.label}: C-GET got no answer")
            return self._sink[1]
        except BaseException:
            self._drop("query")
            raise
        finally:
            self._sink = None

    def store(self, datasets: list[Dataset]) -> None:
        if not datasets:
            return
        assoc = self._session("store")
        refused = []
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(getattr(status, "Status", -1)) if status else -1
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    refused.append(code)
        except BaseException:
            self._drop("store")
            raise
        if refused:
            raise PacsStoreRejected(f"{self.server.label}: C-STORE refused {len(refused)} of {len(datasets)} instances (statuses {', '.join(sorted({f'{c:#06x}' for c in refused}))})")


def _no_delay(assoc) -> None:
    """TCP_NODELAY: a DIMSE exchange is a few small PDUs each way, which Nagle's algorithm holds back
    until the peer's delayed ACK (tens of ms per message)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _keyword(key: str) -> str:
    """`PatientID` or a tag `00100020` → the keyword C-FIND needs."""
    from pydicom.datadict import keyword_for_tag

    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        return keyword_for_tag(int(key, 16)) or key
    return key


def read_header(path: Path) -> Dataset:
    return pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
