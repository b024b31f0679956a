"""Findings of a sweep of 399 public DICOMs: codec chatter on stderr, raw pydicom warnings, DECODE_FAILED
without a reason, and bare Explicit VR datasets refused. pydicom's shipped files (skipped when absent)
and synthetic files built here."""

import functools
import inspect
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit

from helpers import ROOT, gradient, make_dicom
from medres.errors import IngestError
from medres.io import PreprocessSpec, decode_file, load_image, sniff
from medres.io.capture import c_stderr_captured, collected_warnings
from medres.io.record import Record

BAD_J2K = "JPEG2000-embedded-sequence-delimiter.dcm"  # gdcm's OpenJPEG prints "Invalid number of tiles"


def _testdata(name: str) -> Path:
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"{name} not shipped with pydicom")
    return Path(p)


def _needs_plugin(uid, plugin: str) -> None:
    if plugin not in get_decoder(uid).available_plugins:
        pytest.skip(f"pydicom's {plugin} plugin is not installed for {uid.name}")


def in_one_thread(test):
    """fd 2 is redirected only while this is the process's one Python thread (by design). Where the test
    process has others (pytest-xdist's I/O thread, a leftover of an earlier test), the test runs again in
    a fresh single-threaded pytest and must pass there: it is never skipped for the crowd it ran in."""

    wants_request = "request" in inspect.signature(test).parameters

    @functools.wraps(test)
    def run(*args, request, **kwargs):
        if threading.active_count() == 1:
            return test(*args, **({**kwargs, "request": request} if wants_request else kwargs))
        others = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
        assert not os.environ.get("MEDRES_TEST_FRESH"), f"other Python threads in a fresh test process: {others}"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", request.node.nodeid],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, MEDRES_TEST_FRESH="1"))
        if done.returncode == 0 and " passed" not in done.stdout:
            pytest.skip(f"skipped in a fresh process: {done.stdout.strip().splitlines()[-1]}")
        assert done.returncode == 0, f"in a fresh process (here: {others}):\n{done.stdout[-3000:]}"

    params = list(inspect.signature(test).parameters.values())
    if not wants_request:
        params.append(inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY))
    run.__signature__ = inspect.Signature(params)
    return run


def _error(path: Path) -> IngestError:
    with pytest.raises(IngestError) as info:
        load_image(path)
    return info.value


def _damaged_jpeg(path: Path) -> Path:
    """A JPEG Baseline DICOM whose stream starts with 0x00 0x00 (IJG libjpeg: 'Not a JPEG file')."""
    p = make_dicom(path, np.zeros((16, 16), np.uint8))
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\x00\x00" * 40])
    ds["PixelData"].VR = "OB"
    ds.save_as(p, enforce_file_format=True)
    return p


def _invalid_is(path: Path) -> Path:
    """A decodable DICOM whose NumberOfFrames is the invalid IS string '1.0' (pydicom warns, reads 1)."""
    p = make_dicom(path, gradient(), NumberOfFrames=1)
    data = p.read_bytes()
    old = b"\x28\x00\x08\x00IS\x02\x001 "
    assert data.count(old) == 1
    p.write_bytes(data.replace(old, b"\x28\x00\x08\x00IS\x04\x001.0 "))
    return p


# 1. C libraries' stderr ----------------------------------------------------------------------------------
@in_one_thread
def test_c_stderr_captured_and_restored(capfd):
    with c_stderr_captured() as lines:
        os.write(2, b"Invalid number of tiles : 1 x 1\nsecond line\n")
        print("python text reaches the console", file=sys.stderr)
    os.write(2, b"after\n")
    assert lines == ["Invalid number of tiles : 1 x 1", "second line"]
    err = capfd.readouterr().err
    assert "python text reaches the console" in err and err.endswith("after\n") and "tiles" not in err


@in_one_thread
def test_c_stderr_captured_when_the_block_raises(capfd):
    with pytest.raises(RuntimeError):
        with c_stderr_captured() as lines:
            os.write(2, b"codec failed\n")
            raise RuntimeError("decode")
    assert lines == ["codec failed"] and capfd.readouterr().err == ""


def test_c_stderr_left_alone_with_other_threads(capfd):
    """fd 2 is process-wide: with a second Python thread alive nothing is redirected."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with c_stderr_captured() as lines:
            os.write(2, b"raw\n")
    finally:
        stop.set()
        t.join()
    assert lines == [] and capfd.readouterr().err == "raw\n"


@in_one_thread
def test_codec_text_folded_into_the_error_not_stderr(capfd):
    p = _testdata(BAD_J2K)
    _needs_plugin(JPEG2000, "gdcm")
    err = _error(p)
    line = err.one_line()
    assert err.code == "DECODE_FAILED" and line.startswith(f"[DECODE_FAILED] {BAD_J2K}: ")
    assert "Invalid number of tiles" in line and "\n" not in line
    assert capfd.readouterr().err == ""


@in_one_thread
def test_libjpeg_text_folded_into_the_error(tmp_path, capfd):
    _needs_plugin(JPEGBaseline8Bit, "gdcm")
    err = _error(_damaged_jpeg(tmp_path / "x.dcm"))
    assert err.code == "DECODE_FAILED" and "Not a JPEG file: starts with 0x00 0x00" in err.one_line()
    assert "pip install" not in err.one_line() and capfd.readouterr().err == ""


def _load_or_error(_state, path: Path) -> str:
    try:
        load_image(path)
        return "ok"
    except IngestError as err:
        return err.one_line()


@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_pool_keeps_codec_text_off_the_console(tmp_path, capfd, workers):
    """In the decoding pool (threads, or in-line beside another thread such as a progress bar's) fd 2
    cannot be redirected per file, so the pool holds a sink; a failed decode is run again alone so
    the codec's reason still lands in that file's error line. Nothing reaches the console, and fd 2
    and sys.stderr are back afterwards."""
    from medres.data.pool import imap

    _needs_plugin(JPEGBaseline8Bit, "gdcm")
    bad = [_damaged_jpeg(tmp_path / f"bad{i}.dcm") for i in range(4)]
    good = make_dicom(tmp_path / "good.dcm", gradient())
    stop = threading.Event()
    beside = threading.Thread(target=stop.wait)  # a second thread, as a progress bar's refresh thread
    beside.start()
    before = sys.stderr
    try:
        out = list(imap(_load_or_error, [bad[0], good, *bad[1:]], setup=lambda: None, workers=workers))
    finally:
        stop.set()
        beside.join()
    assert out[1] == "ok"
    for line in out[:1] + out[2:]:
        assert line.startswith("[DECODE_FAILED]") and "Not a JPEG file: starts with 0x00 0x00" in line, line
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n" and sys.stderr is before


@pytest.mark.parametrize("workers", ["0", "2"])
def test_predict_keeps_codec_text_in_the_row_not_on_the_console(trained_run, tmp_path, workers):
    """The whole command, stderr a pipe (fd 2, as in a terminal): the damaged files' rows carry the
    codec's reason, and the codec's text reaches stderr only inside predict's one tagged line per file."""
    import csv

    _needs_plugin(JPEGBaseline8Bit, "gdcm")
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _damaged_jpeg(folder / f"bad{i}.dcm")
    make_dicom(folder / "good.dcm", gradient())
    out = tmp_path / "p.csv"
    r = subprocess.run([sys.executable, "-m", "medres", "predict", "--checkpoint", str(trained_run), str(folder), "--out", str(out), "--workers", workers],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    codec_lines = [line for line in r.stderr.splitlines() if "Not a JPEG file" in line]
    assert len(codec_lines) == 3 and all(" [DECODE_FAILED] bad" in line for line in codec_lines), r.stderr  # predict's own tagged lines only
    rows = {row["path"]: row for row in csv.DictReader(out.open())}
    assert rows["good.dcm"]["status"] == "ok"
    for i in range(3):
        assert rows[f"bad{i}.dcm"]["error_code"] == "DECODE_FAILED" and "Not a JPEG file: starts with 0x00 0x00" in rows[f"bad{i}.dcm"]["message"]


def test_decoding_pool_logs_c_output_it_cannot_attribute(caplog, capfd):
    """C output from a decoding thread that did not fail goes to a debug line when the pool ends, not
    to the console; Python's own stderr writes inside the pool still reach the console."""
    import logging

    from medres.data.pool import imap

    def chatty(_state, i):
        os.write(2, f"codec says {i}\n".encode())
        print(f"python says {i}", file=sys.stderr)
        return i

    with caplog.at_level(logging.DEBUG, logger="medres.io"):
        got = list(imap(chatty, [0, 1, 2], setup=lambda: None, workers=2))
    assert got == [0, 1, 2]
    assert sorted(capfd.readouterr().err.splitlines()) == ["python says 0", "python says 1", "python says 2"]
    logged = [r.getMessage() for r in caplog.records if "not attributable" in r.getMessage()]
    assert len(logged) == 1 and all(f"codec says {i}" in logged[0] for i in range(3)), logged


def test_inspect_prints_one_tagged_line_for_a_codec_failure(tmp_path):
    p = _testdata(BAD_J2K)
    _needs_plugin(JPEG2000, "gdcm")
    r = subprocess.run([sys.executable, "-m", "medres", "inspect", str(p)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[DECODE_FAILED] {BAD_J2K}: ") and "Invalid number of tiles" in lines[0], r.stderr


# 2. pydicom warnings -----------------------------------------------------------------------------------
def test_invalid_is_value_is_a_record_warning_not_a_raw_warning(tmp_path):
    p = _invalid_is(tmp_path / "is.dcm")
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        first, second = load_image(p), load_image(p)
    assert not [w for w in raw if issubclass(w.category, UserWarning)], [str(w.message) for w in raw]
    for loaded in (first, second):  # every file gets its warning, not only the first one seen
        assert "pydicom: Invalid value for VR IS: '1.0'." in loaded.record.warnings
        assert not any("http" in w for w in loaded.record.warnings)


def test_inspect_shows_the_pydicom_warning_as_a_field(tmp_path):
    p = _invalid_is(tmp_path / "is.dcm")
    r = subprocess.run([sys.executable, "-m", "medres", "inspect", str(p)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "  ! pydicom: Invalid value for VR IS: '1.0'." in r.stdout.splitlines()


def test_warning_collection_is_per_thread_and_restores_the_handler(tmp_path):
    bad, good = _invalid_is(tmp_path / "bad.dcm"), make_dicom(tmp_path / "good.dcm", gradient())
    before = (warnings.showwarning, list(warnings.filters))
    results: list[tuple[str, list[str]]] = []

    def work(path):
        for _ in range(5):
            results.append((path.name, load_image(path).record.warnings))

    threads = [threading.Thread(target=work, args=(p,)) for p in (bad, good, bad, good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    for name, warns in results:
        assert any("VR IS" in w for w in warns) == (name == "bad.dcm"), (name, warns)
    assert (warnings.showwarning, list(warnings.filters)) == before


def test_other_threads_warnings_pass_through(recwarn):
    with collected_warnings() as mine:
        t = threading.Thread(target=lambda: warnings.warn("from elsewhere", UserWarning))
        t.start()
        t.join()
        warnings.warn("mine", UserWarning)
    assert mine == ["UserWarning: mine"]
    assert [str(w.message) for w in recwarn] == ["from elsewhere"]


# 3. DECODE_FAILED says why ------------------------------------------------------------------------------
def test_decode_failed_carries_the_plugins_reasons(tmp_path):
    err = _error(_damaged_jpeg(tmp_path / "x.dcm"))
    line = err.one_line()
    assert err.code == "DECODE_FAILED" and "(RuntimeError)" not in line
    for plugin in get_decoder(JPEGBaseline8Bit).available_plugins:
        assert f"{plugin}: " in line, line


def test_12_bit_jpeg_extended_without_libjpeg_names_the_plugin(monkeypatch):
    p = _testdata("JPEG-lossy.dcm")
    assert pydicom.dcmread(p, stop_before_pixels=True).BitsStored == 12
    decoder = get_decoder(JPEGExtended12Bit)
    monkeypatch.setattr(decoder, "_available", {k: v for k, v in decoder._available.items() if k != "pylibjpeg"})
    monkeypatch.setattr(decoder, "_unavailable", {**decoder._unavailable, "pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    err = _error(p)
    line = err.one_line()
    assert err.code == "DECODER_MISSING", line
    assert "12-bit 'JPEG Extended" in line and "pylibjpeg-libjpeg" in line and "pip install pylibjpeg pylibjpeg-libjpeg" in line


def test_12_bit_jpeg_extended_with_libjpeg_reports_each_plugin():
    """With pylibjpeg-libjpeg installed this file still fails (libjpeg rejects its scan): the message says so."""
    p = _testdata("JPEG-lossy.dcm")
    _needs_plugin(JPEGExtended12Bit, "pylibjpeg")
    err = _error(p)
    assert err.code == "DECODE_FAILED" and "pylibjpeg: libjpeg error" in err.one_line()


# 4. bare datasets (no preamble, no file meta) ---------------------------------------------------------
def _bare(path: Path, *, implicit: bool, little: bool = True, drop_group_8: bool) -> Path:
    src = pydicom.dcmread(make_dicom(path, gradient()))
    bare = pydicom.Dataset()
    for elem in src:
        if not (drop_group_8 and elem.tag.group == 0x0008):
            bare.add(elem)
    pydicom.dcmwrite(path, bare, implicit_vr=implicit, little_endian=little)
    return path


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("drop_group_8", [False, True])
def test_bare_little_endian_dataset_is_read(tmp_path, implicit, drop_group_8):
    p = _bare(tmp_path / "bare.dcm", implicit=implicit, drop_group_8=drop_group_8)
    head = p.read_bytes()[:8]
    assert head[:2] == (b"\x20\x00" if drop_group_8 else b"\x08\x00")  # (0020,000D) or (0008,0016) first
    assert (head[4:6] == b"UI") is not implicit
    assert sniff(p) == "dicom-bare"
    rec = Record(path=p.name)
    x = decode_file(p, PreprocessSpec(), rec)
    assert x.shape == (32, 40) and rec.transfer_syntax == ("Implicit" if implicit else "Explicit") + " VR Little Endian"
    assert any("preamble" in w for w in rec.warnings)
    ref = decode_file(make_dicom(tmp_path / "ref.dcm", gradient()), PreprocessSpec(), Record(path="ref"))
    assert np.array_equal(x, ref)


def test_bare_big_endian_dataset_is_read(tmp_path):
    p = _bare(tmp_path / "be.dcm", implicit=False, little=False, drop_group_8=True)
    rec = Record(path=p.name)
    assert decode_file(p, PreprocessSpec(), rec).shape == (32, 40) and rec.transfer_syntax == "Explicit VR Big Endian"


@pytest.mark.parametrize("data", [b"\x20\x00\x0d\x00XY\x04\x00abcd", b"\x19\x01\x0d\x00UI\x04\x00abcd", b"\x20\x00\x0d\x00\xff\xff\xff\x7fabcd", b"hello, world"])
def test_near_misses_are_not_dicom(tmp_path, data):
    """Not a VR, an odd (private) group either way round, an implicit length past the end of file, text."""
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    assert _error(p).code == "NOT_AN_IMAGE"
