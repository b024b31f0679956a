"""Reliability cases 27–28: properties of the intensity pipeline and CAM, and a bytes fuzzer
against the file loader (only MedresError subclasses may escape).

`make test` runs a short fuzz (≈2,000 inputs); `make fuzz` sets MEDRES_FUZZ_EXAMPLES higher."""

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from helpers import make_dicom
from medres.cam import compute_cam
from medres.errors import MedresError
from medres.io import PreprocessSpec, load_image
from medres.io.dicom import window
from medres.io.resize import resize_to_square

FUZZ_EXAMPLES = int(os.environ.get("MEDRES_FUZZ_EXAMPLES", "2000"))
DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16])
shapes = st.tuples(st.integers(1, 4096), st.integers(1, 4096)).filter(lambda s: s[0] * s[1] <= 200_000)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(dtype=DTYPES, shape=shapes, data=st.data(), photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2"]), voi=st.sampled_from(["auto", "minmax", "none"]), size=st.sampled_from([16, 33]), mode=st.sampled_from(["letterbox", "crop", "stretch"]))
def test_intensity_pipeline_properties(tmp_path_factory, dtype, shape, data, photometric, voi, size, mode):
    """Arbitrary uint8/uint16/int16 arrays, 1–4096 px a side → finite, in [0, 1], right shape
    (or a DEGENERATE_IMAGE error for constant input)."""
    info = np.iinfo(dtype)
    # A random ramp plus random values keeps the generation fast for large shapes.
    lo = data.draw(st.integers(int(info.min), int(info.max)))
    hi = data.draw(st.integers(lo, int(info.max)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    arr = rng.integers(lo, hi + 1, size=shape, dtype=np.int64).astype(dtype)
    path = make_dicom(tmp_path_factory.mktemp("prop") / "x.dcm", arr, photometric=photometric)
    try:
        out = load_image(path, PreprocessSpec(size, mode, voi))
    except MedresError as err:
        assert err.code == "DEGENERATE_IMAGE" and (arr.min() == arr.max() or voi == "auto")
        return
    assert out.pixels.shape == (size, size) and out.pixels.dtype == np.float32
    assert np.isfinite(out.pixels).all() and out.pixels.min() >= 0 and out.pixels.max() <= 1


@settings(max_examples=100, deadline=None)
@given(arr=arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=st.floats(-1e4, 1e4, width=32)), c=st.floats(-1e4, 1e4), w=st.floats(1.01, 1e4), fn=st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID"]))
def test_window_matches_the_standard_formulas(arr, c, w, fn):
    """window() equals PS3.3 C.11.2.1.2/3 (computed here in float64) and is monotone in x."""
    y = window(arr, c, w, fn)
    x, cc, ww = arr.astype(np.float64), np.float64(np.float32(c)), np.float64(np.float32(w))
    if fn == "LINEAR":
        ref = np.clip((x - (cc - 0.5)) / (ww - 1) + 0.5, 0, 1)
    elif fn == "LINEAR_EXACT":
        ref = np.clip((x - cc) / ww + 0.5, 0, 1)
    else:
        ref = 1 / (1 + np.exp(np.clip(-4 * (x - cc) / ww, -80, 80)))
    assert np.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    np.testing.assert_allclose(y, ref, atol=1e-4)  # float32 arithmetic on values up to 1e4
    order = np.argsort(arr.ravel(), kind="stable")
    assert (np.diff(y.ravel()[order]) >= -1e-6).all()


@settings(max_examples=30, deadline=None)
@given(h=st.integers(8, 300), w=st.integers(8, 300), size=st.integers(8, 64), mode=st.sampled_from(["letterbox", "crop", "stretch"]))
def test_resize_geometry_round_trip(h, w, size, mode):
    """A linear ramp survives resize → to_original (resampling filters preserve linear functions):
    away from the borders the mapped-back values equal the original; outside what the model saw
    (crop cut-offs) they are NaN."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x = 0.2 + 0.5 * yy / h + 0.25 * xx / w
    out, g = resize_to_square(x, size, mode)
    assert out.shape == (size, size) and (g.original_height, g.original_width) == (h, w)
    back = g.to_original(out)
    assert back.shape == (h, w)
    my, mx = 3 / g.scale_y + 2, 3 / g.scale_x + 2  # the filter's reach at the canvas edge, in original px
    oy0, ox0 = (-g.offset_y) / g.scale_y, (-g.offset_x) / g.scale_x  # canvas origin in original px
    seen_y = (yy >= max(0, oy0) + my) & (yy <= min(h, oy0 + size / g.scale_y) - my)
    seen_x = (xx >= max(0, ox0) + mx) & (xx <= min(w, ox0 + size / g.scale_x) - mx)
    interior = seen_y & seen_x
    if interior.any():
        assert np.abs(back[interior] - x[interior]).max() < 0.02
    if mode == "crop":
        cut = (yy < oy0 - 1) | (yy > oy0 + size / g.scale_y + 1) | (xx < ox0 - 1) | (xx > ox0 + size / g.scale_x + 1)
        assert np.isnan(back[cut]).all()
    else:
        assert np.isfinite(back).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), b=st.integers(1, 3))
def test_cam_maps_finite_and_non_negative(seed, b):
    from torch import nn

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    x = torch.randn(b, 1, 8, 8) * 10
    for method in ("gradcam", "gradcam++"):
        r = compute_cam(m, x, torch.randint(0, 2, (b, 1)), layer="1", method=method)
        assert torch.isfinite(r.maps).all() and (r.maps >= 0).all()


def _seeds() -> list[bytes]:
    folder = Path(pydicom.data.__file__).parent / "test_files"
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm", "rtplan.dcm", "ExplVR_BigEndNoMeta.dcm"]
    out = [(folder / n).read_bytes() for n in names if (folder / n).exists()]
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buf, format="PNG")
    out.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buf, format="JPEG")
    out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i : i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            data = data[:i]
    return bytes(data)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(blob=st.one_of(mutated(), st.binary(max_size=512)))
def test_loader_fuzz_only_medres_errors(tmp_path_factory, blob):
    path = tmp_path_factory.getbasetemp() / "fuzz.bin"
    path.write_bytes(blob)
    try:
        out = load_image(path, PreprocessSpec(16, max_megapixels=4))
    except MedresError:
        return
    assert np.isfinite(out.pixels).all()
