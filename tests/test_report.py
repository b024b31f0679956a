"""`medres report`: pages, links, overlays at native geometry, Secondary Capture, privacy."""

import logging
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from helpers import IDENTIFIERS, gradient, make_dicom
from medres.errors import UsageError
from medres.report import report


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v:
                self.links.append(v)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, phantoms):
    d = tmp_path_factory.mktemp("report_in")
    imgs = sorted((phantoms.parent / "images").glob("*.png"))[:3]
    for p in imgs:
        shutil.copy(p, d / p.name)
    wide = np.asarray(Image.open(imgs[0]))
    Image.fromarray(np.concatenate([wide, wide], axis=1)).save(d / "wide.png")  # 2:1 aspect ratio
    make_dicom(d / "patient.dcm", gradient(96, 80), identifiers=True, WindowCenter=2000, WindowWidth=4000, PatientSex="F")
    (d / "broken.dcm").write_bytes(b"\0" * 10)
    return d


@pytest.fixture(scope="module")
def built(trained_run, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out")
    summary = report(trained_run / "model.safetensors", [inputs], out, dicom_sc=True, faithfulness=True)
    return out, summary


def test_pages_parse_and_links_resolve(built):
    out, summary = built
    assert summary["cases"] == 6 and summary["failed"] == 1
    assert summary["map_cells"] == [2, 2]  # layer4 at 64 px: the report says how coarse its maps are
    pages = [out / "index.html"] + sorted((out / "cases").glob("*.html"))
    assert len(pages) == 6
    for page in pages:
        parser = Links()
        parser.feed(page.read_text())
        for link in parser.links:
            assert not link.startswith(("http:", "https:", "//")), link  # offline
            assert (page.parent / link).exists(), (page, link)
    index = (out / "index.html").read_text()
    assert "NOT_AN_IMAGE" in index and "Research use only" in index and "deletion AUC" in index
    case = sorted((out / "cases").glob("case-*.html"))[0].read_text()
    assert "checkpoint sha256" in case and "Ingestion record" in case and "Research use only" in case


def test_overlay_keeps_native_aspect_ratio(built, inputs):
    out, _ = built
    names = sorted(p.name for p in inputs.iterdir())
    k = names.index("wide.png")
    overlay = next((out / "cases").glob(f"case-{k:05d}_cam_*.png"))
    w, h = Image.open(overlay).size
    src = Image.open(inputs / "wide.png").size
    assert (w, h) == src


def test_secondary_capture_reads_back_without_identifiers(built):
    out, _ = built
    scs = list((out / "cases").glob("*.dcm"))
    assert len(scs) == 1
    ds = pydicom.dcmread(scs[0])
    assert ds.Modality == "OT" and ds.PhotometricInterpretation == "RGB"
    assert ds.pixel_array.ndim == 3
    assert ds.PatientIdentityRemoved == "YES" and "SourceImageSequence" in ds


def test_no_identifiers_anywhere(built):
    out, _ = built
    secrets = [v.encode() for v in IDENTIFIERS.values()] + [b"19491231", b"20240229", b"Secretname", b"SECRET"]
    for f in out.rglob("*"):
        assert not any(s.decode() in f.name for s in secrets)
        if f.is_file():
            data = f.read_bytes()
            for s in secrets:
                assert s not in data, (f, s)


def test_faithfulness_and_scale(built):
    out, summary = built
    assert 0 <= summary["mean_deletion_auc"] <= 1 and 0 <= summary["mean_insertion_auc"] <= 1
    assert summary["normalize"] == "shared" and min(summary["scales"].values()) > 0


def test_bad_layer_and_class(trained_run, inputs, tmp_path):
    with pytest.raises(UsageError, match="layer4"):
        report(trained_run / "model.safetensors", [inputs], tmp_path, layer="nolayer")
    with pytest.raises(UsageError, match="normal"):
        report(trained_run / "model.safetensors", [inputs], tmp_path, target_class="zebra")


def test_identifiers_only_on_request(trained_run, inputs, tmp_path):
    report(trained_run / "model.safetensors", [inputs / "patient.dcm"], tmp_path, dicom_sc=True, include_identifiers=True)
    ds = pydicom.dcmread(next((tmp_path / "cases").glob("*.dcm")))
    assert str(ds.PatientID) == IDENTIFIERS["PatientID"]


def test_coarse_maps_are_flagged(trained_run, inputs, tmp_path, caplog):
    """A 64 px model's layer4 maps are 2×2: the log says so and suggests a shallower layer; layer3
    (4×4) is accepted and reported as such."""
    with caplog.at_level(logging.WARNING, logger="medres"):
        report(trained_run / "model.safetensors", [inputs / "wide.png"], tmp_path / "l4")
    assert any("2×2 heatmaps at 64 px" in r.getMessage() and "--layer layer3" in r.getMessage() for r in caplog.records)
    summary = report(trained_run / "model.safetensors", [inputs / "wide.png"], tmp_path / "l3", layer="layer3")
    assert summary["map_cells"] == [4, 4] and "layer3 (4×4 cells)" in (tmp_path / "l3" / "index.html").read_text()
