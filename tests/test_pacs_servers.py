"""SERVER strings, the servers file and credentials: no secret from argv, none in a message."""

from __future__ import annotations

import os

import pytest

from medres.errors import UsageError
from medres.pacs.servers import credentials, parse_server


def test_direct_forms():
    web = parse_server("https://pacs.example/dicom-web/")
    assert (web.kind, web.url) == ("dicomweb", "https://pacs.example/dicom-web")
    dimse = parse_server("ORTHANC@10.0.0.5:4242", calling_aet="AI01")
    assert (dimse.kind, dimse.aet, dimse.host, dimse.port, dimse.calling_aet) == ("dimse", "ORTHANC", "10.0.0.5", 4242, "AI01")
    with pytest.raises(UsageError, match="credentials"):
        parse_server("https://user:pw@pacs.example/dicom-web")
    with pytest.raises(UsageError, match="port must be 1-65535"):
        parse_server("A@h:70000")


def test_servers_file(tmp_path, monkeypatch):
    f = tmp_path / "pacs.yaml"
    f.write_text("main: https://pacs.example/dicom-web\nmodality:\n  aet: STORESCP\n  host: 127.0.0.1\n  port: 104\n  tls: true\n  ca_bundle: /etc/ca.pem\n")
    assert parse_server("main", servers_file=f).url == "https://pacs.example/dicom-web"
    s = parse_server("modality", servers_file=f)
    assert (s.kind, s.label, s.aet, s.port, s.tls, s.ca_bundle) == ("dimse", "modality", "STORESCP", 104, True, "/etc/ca.pem")
    monkeypatch.setenv("MEDRES_PACS_SERVERS", str(f))
    assert parse_server("main").kind == "dicomweb"
    with pytest.raises(UsageError, match=r"not a name in .*pacs.yaml \(names there: main, modality\)"):
        parse_server("other")
    f.write_text("bad:\n  url: https://x\n  password: nope\n")
    with pytest.raises(UsageError, match="unknown keys"):
        parse_server("bad", servers_file=f)


def test_credentials_from_environment_or_owner_only_file(tmp_path, monkeypatch):
    for var in ("MEDRES_PACS_TOKEN", "MEDRES_PACS_USERNAME", "MEDRES_PACS_PASSWORD", "MEDRES_PACS_CREDENTIALS"):
        monkeypatch.delenv(var, raising=False)
    assert credentials().username is None and credentials().token is None
    monkeypatch.setenv("MEDRES_PACS_USERNAME", "u")
    with pytest.raises(UsageError, match="set both"):
        credentials()
    monkeypatch.setenv("MEDRES_PACS_PASSWORD", "hunter2")
    c = credentials()
    assert (c.username, c.password) == ("u", "hunter2") and "hunter2" not in repr(c)
    monkeypatch.delenv("MEDRES_PACS_USERNAME")
    monkeypatch.delenv("MEDRES_PACS_PASSWORD")
    f = tmp_path / "creds.yaml"
    f.write_text("token: abc.def\n")
    os.chmod(f, 0o644)
    monkeypatch.setenv("MEDRES_PACS_CREDENTIALS", str(f))
    with pytest.raises(UsageError, match="readable by others.*chmod 600"):
        credentials()
    os.chmod(f, 0o600)
    assert credentials().token == "abc.def" and "abc" not in repr(credentials())
