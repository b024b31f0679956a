"""The DICOM greyscale pipeline, on synthetic files and pydicom's shipped test files."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from helpers import gradient, make_dicom
from medres.errors import (
    DegenerateImage, ImageTooLarge, InvalidPixelModule, MultiframeUnsupported, NoPixelData,
    NotAnImage, PixelDataShort, UnsupportedPhotometric,
)
from medres.io import PreprocessSpec, decode_file, load_image
from medres.io.record import Record


def native(path, **spec):
    rec = Record(path=path.name)
    return decode_file(path, PreprocessSpec(**spec), rec), rec


def test_monochrome1_twin_gives_same_model_input(tmp_path):
    a = gradient()
    m2 = make_dicom(tmp_path / "m2.dcm", a, photometric="MONOCHROME2", bits_stored=12, WindowCenter=2000, WindowWidth=4000)
    m1 = make_dicom(tmp_path / "m1.dcm", (4095 - a).astype(np.uint16), photometric="MONOCHROME1", bits_stored=12, WindowCenter=2095, WindowWidth=4000)
    x2, _ = native(m2)
    x1, r1 = native(m1)
    assert np.allclose(x1, x2, atol=1e-3)
    assert any("MONOCHROME1" in s for s in r1.steps)
    assert np.allclose(load_image(m1).pixels, load_image(m2).pixels, atol=1e-3)


def test_orientation_not_transposed(tmp_path):
    a = gradient(20, 50)
    x, _ = native(make_dicom(tmp_path / "a.dcm", a))
    assert x.shape == (20, 50)
    assert x[:, -1].mean() > x[:, 0].mean()  # ramp increases to the right


def test_rescale_applied_and_recorded(tmp_path):
    a = gradient(hi=1000)
    p = make_dicom(tmp_path / "r.dcm", a, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=2000)
    x, rec = native(p)
    # value 512 → 2*512-1024 = 0 = window centre → ~0.5
    i = np.argmin(np.abs(a[0].astype(float) - 512))
    assert abs(x[0, i] - 0.5) < 0.02
    assert any("rescale" in s and "2" in s for s in rec.steps)


def test_negative_slope_inverts_values(tmp_path):
    a = gradient(hi=1000)
    x, _ = native(make_dicom(tmp_path / "n.dcm", a, RescaleSlope=-1, RescaleIntercept=1000))
    assert x[:, 0].mean() > x[:, -1].mean()


def test_slope_zero_is_degenerate(tmp_path):
    with pytest.raises(DegenerateImage):
        native(make_dicom(tmp_path / "z.dcm", gradient(), RescaleSlope=0))


def test_multi_valued_window_uses_first(tmp_path):
    a = gradient(hi=4000)
    p = make_dicom(tmp_path / "w.dcm", a, WindowCenter=[1000, 3000], WindowWidth=[500, 2000])
    x, rec = native(p)
    assert any("center 1000 width 500" in s for s in rec.steps)
    x1, rec1 = native(p, voi=1)
    assert any("center 3000 width 2000" in s for s in rec1.steps)
    assert not np.allclose(x, x1)


def test_window_width_zero_falls_back_with_warning(tmp_path):
    x, rec = native(make_dicom(tmp_path / "w0.dcm", gradient(), WindowCenter=100, WindowWidth=0))
    assert any("invalid window" in w for w in rec.warnings)
    assert any("percentiles" in s for s in rec.steps)
    with pytest.raises(InvalidPixelModule, match="WindowWidth"):
        native(tmp_path / "w0.dcm", voi=0)


def test_mismatched_window_counts_and_unknown_function(tmp_path):
    p = make_dicom(tmp_path / "mm.dcm", gradient(), WindowCenter=[1000, 2000], WindowWidth=[800], VOILUTFunction="WEIRD")
    x, rec = native(p)
    assert any("WindowCenter has 2 values" in w for w in rec.warnings)
    assert any("unknown VOILUTFunction" in w for w in rec.warnings)
    assert np.isfinite(x).all()


def test_sigmoid_and_linear_exact(tmp_path):
    """Values against PS3.3 C.11.2.1.3: LINEAR_EXACT y = (x - c)/w + 0.5 clipped to [0, 1];
    SIGMOID y = 1 / (1 + exp(-4 (x - c)/w)). Stored values map 1:1 (no rescale)."""
    a = gradient(32, 40, hi=4000)
    c, w = 2000.0, 2000.0
    v = a.astype(np.float64)
    formulas = {"LINEAR_EXACT": np.clip((v - c) / w + 0.5, 0, 1), "SIGMOID": 1 / (1 + np.exp(-4 * (v - c) / w))}
    for fn, expected in formulas.items():
        x, rec = native(make_dicom(tmp_path / f"{fn}.dcm", a, WindowCenter=c, WindowWidth=w, VOILUTFunction=fn))
        assert f"VOI: window 0 center 2000 width 2000 ({fn})" in rec.steps
        np.testing.assert_allclose(x, expected, atol=2e-6)
    # The two differ from LINEAR where the standard says they do: LINEAR_EXACT reaches 1 at c + w/2,
    # LINEAR at c - 0.5 + (w - 1)/2; at x = c both LINEAR forms give 0.5 (+ half a step for LINEAR).
    lin, _ = native(make_dicom(tmp_path / "lin.dcm", a, WindowCenter=c, WindowWidth=w))
    np.testing.assert_allclose(lin, np.clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1), atol=2e-6)


def test_presentation_lut_inverse_on_monochrome2(tmp_path):
    a = gradient()
    x_plain, _ = native(make_dicom(tmp_path / "p.dcm", a, WindowCenter=2000, WindowWidth=4000))
    x_inv, rec = native(make_dicom(tmp_path / "i.dcm", a, WindowCenter=2000, WindowWidth=4000, PresentationLUTShape="INVERSE"))
    assert np.allclose(x_inv, 1 - x_plain, atol=1e-5)
    assert any("INVERSE" in s for s in rec.steps)


def test_monochrome1_with_inverse_inverted_once(tmp_path):
    a = gradient()
    x_m1, _ = native(make_dicom(tmp_path / "a.dcm", a, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=4000))
    x_both, rec = native(make_dicom(tmp_path / "b.dcm", a, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=4000, PresentationLUTShape="INVERSE"))
    assert np.allclose(x_m1, x_both)
    assert sum("invert" in s for s in rec.steps) == 1


def test_signed_pixels(tmp_path):
    a = (gradient(hi=2000).astype(np.int32) - 1000).astype(np.int16)
    x, rec = native(make_dicom(tmp_path / "s.dcm", a, bits_stored=12, voi="minmax"), voi="minmax")
    assert rec.signed
    assert x[:, 0].mean() < 0.05 and x[:, -1].mean() > 0.95


def test_bits_stored_less_than_allocated_masks_high_bits(tmp_path):
    a = gradient(hi=1000)
    dirty = a | np.uint16(0xF000)  # garbage in the unused high bits must be ignored
    x_clean, _ = native(make_dicom(tmp_path / "c.dcm", a, bits_stored=12), voi="minmax")
    x_dirty, _ = native(make_dicom(tmp_path / "d.dcm", dirty, bits_stored=12), voi="minmax")
    assert np.allclose(x_clean, x_dirty)


def test_big_endian(tmp_path):
    a = gradient()
    x_le, _ = native(make_dicom(tmp_path / "le.dcm", a), voi="minmax")
    x_be, rec = native(make_dicom(tmp_path / "be.dcm", a, big_endian=True), voi="minmax")
    assert "Big Endian" in rec.transfer_syntax
    assert np.allclose(x_le, x_be)


def _testdata(name):
    from pathlib import Path

    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"{name} not shipped with pydicom")
    return Path(p)


def _lut_item(descriptor, data, **extra):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.add_new(0x00283002, "US", descriptor)  # LUTDescriptor
    item.add_new(0x00283006, "US", data)  # LUTData
    for k, v in extra.items():
        setattr(item, k, v)
    return item


def test_modality_lut_sequence_synthetic(tmp_path):
    a = (np.tile(np.arange(64), (8, 1)) * 4).astype(np.uint16)  # 0..252
    lut = [1000 - 3 * i for i in range(256)]  # decreasing: bright becomes dark
    p = make_dicom(tmp_path / "mlut.dcm", a, bits_stored=8, ModalityLUTSequence=[_lut_item([256, 0, 16], lut, ModalityLUTType="US")])
    x, rec = native(p, voi="minmax")
    assert any("Modality LUT Sequence: 256 entries" in s for s in rec.steps)
    assert x[:, 0].mean() > x[:, -1].mean()


def test_voi_lut_sequence_synthetic(tmp_path):
    a = (np.tile(np.arange(64), (8, 1)) * 4).astype(np.uint16)
    lut = [min(255, 2 * i) for i in range(256)]  # saturates at input 128
    p = make_dicom(tmp_path / "vlut.dcm", a, bits_stored=8, VOILUTSequence=[_lut_item([256, 0, 8], lut)], WindowCenter=10, WindowWidth=5)
    x, rec = native(p)
    assert any("VOI: LUT Sequence item 0" in s for s in rec.steps)  # the LUT wins over the window
    assert abs(x[0, 16] - 128 / 255) < 0.01 and x[0, -1] == 1.0


@pytest.mark.parametrize("name,step", [("mlut_18.dcm", "Modality LUT Sequence"), ("vlut_04.dcm", "VOI: LUT Sequence")])
def test_shared_lut_objects(name, step):
    from conftest import shared

    x, rec = native(shared("dicom") / name)
    assert any(step in s for s in rec.steps)
    assert 0 <= x.min() and x.max() <= 1 and x.max() > x.min()


def test_truncated_pixel_data(tmp_path):
    p = make_dicom(tmp_path / "t.dcm", gradient())
    ds = pydicom.dcmread(p)
    ds.PixelData = ds.PixelData[:-2]
    ds.save_as(p)
    with pytest.raises(PixelDataShort):
        native(p)


def test_truncated_file_header_only(tmp_path):
    p = make_dicom(tmp_path / "t.dcm", gradient(64, 64))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 64 * 64 * 2 - 20])
    with pytest.raises((NoPixelData, PixelDataShort, NotAnImage)):
        native(p)


@pytest.mark.parametrize("tag, err, match", [("PixelData", NoPixelData, ""), ("PhotometricInterpretation", InvalidPixelModule, "PhotometricInterpretation")])
def test_missing_element(tmp_path, tag, err, match):
    p = make_dicom(tmp_path / "missing.dcm", gradient())
    ds = pydicom.dcmread(p)
    delattr(ds, tag)
    ds.save_as(p)
    with pytest.raises(err, match=match):
        native(p)


def test_multiframe_needs_a_frame(tmp_path):
    a = np.stack([gradient(), gradient()[:, ::-1].copy()])
    p = make_dicom(tmp_path / "mf.dcm", a)
    with pytest.raises(MultiframeUnsupported):
        native(p)
    rec = Record(path="mf")
    x = decode_file(p, PreprocessSpec(voi="minmax"), rec, frame=1)
    assert x[:, 0].mean() > x[:, -1].mean()


def test_rgb_rejected(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    with pytest.raises(UnsupportedPhotometric, match="RGB"):
        native(make_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))


def test_constant_image(tmp_path):
    with pytest.raises(DegenerateImage):
        native(make_dicom(tmp_path / "c.dcm", np.full((8, 8), 7, dtype=np.uint16)))


def test_oversized_header_refused_before_allocation(tmp_path):
    p = make_dicom(tmp_path / "big.dcm", gradient(4, 4))
    ds = pydicom.dcmread(p)
    ds.Rows = ds.Columns = 50000
    ds.save_as(p)
    with pytest.raises(ImageTooLarge, match="50000"):
        native(p)


def test_bare_dataset_without_preamble_accepted_with_warning(tmp_path):
    p = make_dicom(tmp_path / "bare.dcm", gradient(), preamble=False)
    assert p.read_bytes()[128:132] != b"DICM"
    x, rec = native(p)
    assert any("preamble" in w for w in rec.warnings)


@pytest.mark.parametrize("kw,err", [({"BitsStored": 20}, InvalidPixelModule), ({"BitsAllocated": 12}, InvalidPixelModule), ({"Rows": 0}, InvalidPixelModule)])
def test_invalid_pixel_module(tmp_path, kw, err):
    p = make_dicom(tmp_path / "bad.dcm", gradient())
    ds = pydicom.dcmread(p)
    for k, v in kw.items():
        setattr(ds, k, v)
    ds.save_as(p)
    with pytest.raises(err):
        native(p)




LOSSLESS = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"]


def test_lossless_encodings_decode_identically():
    from pathlib import Path

    arrays = {}
    for name in LOSSLESS:
        p = get_testdata_file(name, download=False)
        if p is None:
            continue
        x, rec = native(Path(p), voi="minmax")
        arrays[name] = x
    assert len(arrays) == len(LOSSLESS), arrays.keys()
    ref = arrays["MR_small.dcm"]
    for name, x in arrays.items():
        assert np.allclose(x, ref, atol=1e-6), name


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "693_J2KI.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "image_dfl.dcm", "rtdose_rle_1frame.dcm", "SC_rgb_jpeg_gdcm.dcm"])
def test_compressed_syntaxes_decode(name):
    from pathlib import Path

    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"{name} not shipped")
    ds = pydicom.dcmread(p)
    if ds.PhotometricInterpretation not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        # medres refuses colour/multi-frame images before decoding; prove the codec for this syntax
        # works anyway (pydicom through the same plugins) and that the refusal has its code.
        assert ds.pixel_array.size > 0 and np.ptp(ds.pixel_array) > 0
        with pytest.raises((UnsupportedPhotometric, MultiframeUnsupported)):
            native(Path(p), voi="minmax")
        return
    x, rec = native(Path(p), voi="minmax")
    assert np.isfinite(x).all() and x.max() > x.min()
    assert any(s.startswith("decoded ") for s in rec.steps)


@pytest.mark.parametrize("name", ["RG1_J2KI.dcm", "nih_dx_chest_mono2.dcm"])
def test_shared_chest_radiographs_have_dark_lungs(name):
    """Polarity on real PA chests: the mediastinum/spine strip is brighter than both lung fields."""
    from conftest import shared

    x = load_image(shared("dicom") / name, PreprocessSpec(224, "stretch")).pixels
    mid = x[70:150, 100:124].mean()
    left, right = x[70:150, 40:80].mean(), x[70:150, 144:184].mean()
    assert mid > left + 0.05 and mid > right + 0.05, (mid, left, right)


def test_shared_lossless_and_lossy_j2k_twins_agree():
    from conftest import shared

    a = load_image(shared("dicom") / "RG3_J2KR.dcm", PreprocessSpec(224)).pixels
    b = load_image(shared("dicom") / "RG3_J2KI.dcm", PreprocessSpec(224)).pixels
    assert np.abs(a - b).mean() < 0.02


def test_every_shared_dicom_decodes():
    from conftest import shared

    for p in sorted(shared("dicom").glob("*.dcm")):
        loaded = load_image(p, PreprocessSpec(64))
        assert np.isfinite(loaded.pixels).all() and loaded.pixels.max() > loaded.pixels.min(), p.name


def _with_presentation_lut(path, lut: np.ndarray, bits: int):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [len(lut), 0, bits]
    item.LUTData = lut.astype(np.uint16).tolist()
    item["LUTData"].VR = "US"
    ds.PresentationLUTSequence = Sequence([item])
    ds.save_as(path)
    return path


def test_presentation_lut_sequence_maps_voi_output_to_p_values(tmp_path):
    """PS3.3 C.11.6: the LUT's input range is the whole VOI output range (not the image's min..max),
    quantised to its entries; output = LUT value / (2^bits - 1). Hand computation on a ramp."""
    a = gradient(32, 40, hi=4000)
    lut = (np.linspace(0, 1, 256) ** 2 * 4095).round()  # a gamma-2 curve, 12-bit
    p = _with_presentation_lut(make_dicom(tmp_path / "p.dcm", a, WindowCenter=2000, WindowWidth=8000), lut, 12)
    x, rec = native(p)
    voi, _ = native(make_dicom(tmp_path / "v.dcm", a, WindowCenter=2000, WindowWidth=8000))  # covers 25–75% of the window
    expected = lut[np.rint(voi * 255).astype(int)] / 4095
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert x.max() < 0.6  # not stretched to the image's own min..max
    assert any(s.startswith("Presentation LUT Sequence: 256 entries, 12-bit") for s in rec.steps) and not rec.warnings


@pytest.mark.parametrize("name", ["jpeg_lossless_with_presentation_lut", "jpeg_lossless_with_inverse_presentation_lut_shape"])
def test_presentation_lut_matches_reference_rendering(name):
    """An outside toolkit's rendering of the same files (../shared/data/dicom-ref): within 3 grey levels
    on average (the reference is a JPEG). Without the LUT the first file is 22 grey levels off."""
    from PIL import Image

    from conftest import shared

    folder = shared("dicom-ref")
    x, rec = native(folder / f"{name}.dcm")
    ref = np.asarray(Image.open(folder / f"{name}.reference.jpg").convert("L"), dtype=np.float32)
    assert x.shape == ref.shape
    assert np.abs(x * 255 - ref).mean() < 3.0
