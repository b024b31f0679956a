"""Where a PACS is and how to log in: `SERVER` is a DICOMweb URL, `AET@host:port`, or a name in a
servers file. Credentials never come from the command line (they would reach shell history and
process listings): HTTP basic from MEDRES_PACS_USERNAME + MEDRES_PACS_PASSWORD, a bearer token from
MEDRES_PACS_TOKEN, or a YAML/JSON file named by MEDRES_PACS_CREDENTIALS that only its owner can read.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from medres.errors import UsageError

_DIMSE = re.compile(r"^(?P<aet>[^@\s]{1,16})@(?P<host>[^:\s]+):(?P<port>\d{1,5})$")
SERVERS_ENV = "MEDRES_PACS_SERVERS"
DEFAULT_SERVERS = Path("~/.config/medres/pacs.yaml")


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never print a secret, even in a traceback
        kind = "token" if self.token else "basic" if self.username else "none"
        return f"Credentials({kind})"


@dataclass(frozen=True)
class Server:
    """One PACS endpoint. `label` is what logs and messages show (no credentials)."""

    kind: str  # "dicomweb" | "dimse"
    label: str
    url: str = ""
    aet: str = ""
    host: str = ""
    port: int = 0
    calling_aet: str = "MEDRES"
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    tls: bool = False  # DIMSE over TLS (DICOMweb: the URL's https)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context for DIMSE (DICOMweb passes the same files to requests)."""
        if not (self.tls or self.ca_bundle or self.client_cert):
            return None
        ctx = ssl.create_default_context(cafile=self.ca_bundle) if self.ca_bundle else ssl.create_default_context()
        if self.client_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def parse_server(text: str, *, servers_file: str | Path | None = None, calling_aet: str = "MEDRES", ca_bundle: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None) -> Server:
    """`http(s)://…/dicom-web`, `AET@host:port`, or a name in the servers file."""
    text = text.strip()
    tls = {k: v for k, v in (("ca_bundle", ca_bundle), ("client_cert", client_cert), ("client_key", client_key)) if v}
    direct = _direct(text, calling_aet)
    if direct is not None:
        return replace(direct, **tls)
    table = _load_servers(servers_file)
    if text not in table:
        where = _servers_path(servers_file)
        known = ", ".join(sorted(table)) or "none"
        raise UsageError(f"server {text!r} is not a DICOMweb URL, not AET@host:port, and not a name in {where} (names there: {known})")
    entry = table[text]
    if isinstance(entry, str):
        server = _direct(entry, calling_aet)
        if server is None:
            raise UsageError(f"{_servers_path(servers_file)}: server {text!r} = {entry!r} is not a DICOMweb URL or AET@host:port")
    elif isinstance(entry, dict):
        server = _from_mapping(text, entry, calling_aet, _servers_path(servers_file))
    else:
        raise UsageError(f"{_servers_path(servers_file)}: server {text!r} must be a string or a mapping")
    return replace(server, **tls)


def _direct(text: str, calling_aet: str) -> Server | None:
    if text.startswith(("http://", "https://")):
        parts = urlsplit(text)
        if parts.username or parts.password:
            raise UsageError("the server URL carries credentials, which would reach logs and shell history: "
                             "set MEDRES_PACS_USERNAME and MEDRES_PACS_PASSWORD (or MEDRES_PACS_TOKEN) instead")
        return Server("dicomweb", label=text.rstrip("/"), url=text.rstrip("/"), calling_aet=calling_aet)
    m = _DIMSE.match(text)
    if m:
        port = int(m["port"])
        if not 0 < port < 65536:
            raise UsageError(f"server {text!r}: port must be 1-65535")
        return Server("dimse", label=text, aet=m["aet"], host=m["host"], port=port, calling_aet=calling_aet)
    return None


def _from_mapping(name: str, entry: dict, calling_aet: str, where: Path) -> Server:
    allowed = {"url", "aet", "host", "port", "calling_aet", "ca_bundle", "client_cert", "client_key", "tls"}
    unknown = set(entry) - allowed
    if unknown:
        raise UsageError(f"{where}: server {name!r} has unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    if "url" in entry:
        base = _direct(str(entry["url"]), calling_aet)
    elif {"aet", "host", "port"} <= set(entry):
        base = _direct(f"{entry['aet']}@{entry['host']}:{entry['port']}", calling_aet)
    else:
        raise UsageError(f"{where}: server {name!r} needs url, or aet + host + port")
    if base is None:
        raise UsageError(f"{where}: server {name!r} is not a DICOMweb URL or AET@host:port")
    extra = {k: (str(v) if k != "tls" else bool(v)) for k, v in entry.items() if k in ("calling_aet", "ca_bundle", "client_cert", "client_key", "tls")}
    return replace(base, label=name, **extra)


def _servers_path(servers_file: str | Path | None) -> Path:
    return Path(servers_file or os.environ.get(SERVERS_ENV) or DEFAULT_SERVERS).expanduser()


def _load_servers(servers_file: str | Path | None) -> dict:
    path = _servers_path(servers_file)
    if not path.exists():
        if servers_file:
            raise UsageError(f"servers file not found: {path}")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: must map server names to a URL, AET@host:port or a mapping")
    return data.get("servers", data) if isinstance(data.get("servers"), dict) else data


def credentials() -> Credentials:
    """From the environment or an owner-only file; nothing from argv."""
    token = os.environ.get("MEDRES_PACS_TOKEN")
    user, password = os.environ.get("MEDRES_PACS_USERNAME"), os.environ.get("MEDRES_PACS_PASSWORD")
    if token:
        return Credentials(token=token)
    if user or password:
        if not (user and password):
            raise UsageError("set both MEDRES_PACS_USERNAME and MEDRES_PACS_PASSWORD (or MEDRES_PACS_TOKEN)")
        return Credentials(username=user, password=password)
    named = os.environ.get("MEDRES_PACS_CREDENTIALS")
    if not named:
        return Credentials()
    path = Path(named).expanduser()
    if not path.is_file():
        raise UsageError(f"MEDRES_PACS_CREDENTIALS names {path}, which does not exist")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{path}: credentials file is readable by others (mode {stat.S_IMODE(path.stat().st_mode):o}); run chmod 600 {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise UsageError(f"{path}: credentials file is not valid YAML/JSON") from None
    if not isinstance(data, dict) or not (data.get("token") or (data.get("username") and data.get("password"))):
        raise UsageError(f"{path}: credentials file needs `token`, or `username` and `password`")
    if data.get("token"):
        return Credentials(token=str(data["token"]))
    return Credentials(username=str(data["username"]), password=str(data["password"]))
