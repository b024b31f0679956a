"""PNG/JPEG ingestion, resizing geometry and the cache."""

import numpy as np
import pytest
from PIL import Image

from medres.errors import DegenerateImage, ImageTooLarge, NotAnImage
from medres.io import ImageCache, PreprocessSpec, load_image, sniff
from medres.io.resize import resize_to_square


def ramp(h=30, w=50):
    return np.tile(np.linspace(0, 1, w), (h, 1)).astype(np.float32)


def test_png_8_and_16_bit(tmp_path):
    a = (ramp() * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "a8.png")
    b = (ramp() * 4095).astype(np.uint16)  # 12-bit content in a 16-bit PNG
    Image.fromarray(b).save(tmp_path / "a16.png")
    x8 = load_image(tmp_path / "a8.png", PreprocessSpec(64, "stretch")).pixels
    l16 = load_image(tmp_path / "a16.png", PreprocessSpec(64, "stretch"))
    assert np.allclose(x8, l16.pixels, atol=0.01)
    assert any("16-bit" in s for s in l16.record.steps)


def test_rgba_and_palette_and_la(tmp_path):
    grey = (ramp() * 255).astype(np.uint8)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    Image.fromarray(grey).convert("LA").save(tmp_path / "la.png")
    ref = load_image(tmp_path / "rgba.png", PreprocessSpec(32, "stretch"))
    assert any("RGBA" in s for s in ref.record.steps)
    for name in ("p.png", "la.png"):
        x = load_image(tmp_path / name, PreprocessSpec(32, "stretch")).pixels
        assert np.allclose(x, ref.pixels, atol=0.02), name


def test_exif_rotated_jpeg(tmp_path):
    a = (ramp(40, 80) * 255).astype(np.uint8)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "r.jpg", PreprocessSpec(64, "stretch"))
    g = loaded.record.geometry
    assert (g.original_height, g.original_width) == (80, 40)
    assert any("EXIF orientation 6" in s for s in loaded.record.steps)
    x = loaded.pixels
    assert x[-1, :].mean() > x[0, :].mean()  # the ramp now increases downwards


def test_jpeg_draft_decoding_keeps_geometry(tmp_path):
    a = (ramp(1200, 1000) * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=90)
    loaded = load_image(tmp_path / "big.jpg", PreprocessSpec(128))
    g = loaded.record.geometry
    assert (g.original_height, g.original_width) == (1200, 1000)
    assert any("DCT scaling" in s for s in loaded.record.steps)
    full = load_image(tmp_path / "big.jpg", PreprocessSpec(600))
    assert full.pixels.shape == (600, 600)


def test_text_named_png(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("hello, not an image")
    with pytest.raises(NotAnImage) as e:
        load_image(p)
    assert "x.png" in str(e.value)


def test_png_bytes_named_dcm_are_loaded_by_content(tmp_path):
    Image.fromarray((ramp() * 255).astype(np.uint8)).save(tmp_path / "img.png")
    (tmp_path / "img.dcm").write_bytes((tmp_path / "img.png").read_bytes())
    assert sniff(tmp_path / "img.dcm") == "raster"
    assert load_image(tmp_path / "img.dcm").record.format == "png"


def test_constant_png(tmp_path):
    Image.fromarray(np.full((10, 10), 80, np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(DegenerateImage):
        load_image(tmp_path / "c.png")


def test_megapixel_cap(tmp_path):
    Image.fromarray((ramp(100, 100) * 255).astype(np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ImageTooLarge):
        load_image(tmp_path / "m.png", PreprocessSpec(max_megapixels=0.005))


@pytest.mark.parametrize("mode", ["letterbox", "crop", "stretch"])
def test_geometry_maps_back(mode):
    h, w = 60, 100
    img = np.zeros((h, w), np.float32)
    img[20:30, 70:80] = 1.0  # a bright square
    out, g = resize_to_square(img, 50, mode)
    assert out.shape == (50, 50)
    back = g.to_original(out)
    assert back.shape == (h, w)
    seen = ~np.isnan(back)
    if mode != "crop":
        assert seen.all()
    yy, xx = np.unravel_index(np.nanargmax(np.where(seen, back, -1)), back.shape)
    assert 18 <= yy <= 31 and 68 <= xx <= 81


def test_letterbox_pads_and_records():
    out, g = resize_to_square(np.ones((20, 40), np.float32), 40, "letterbox")
    assert g.offset_y == 10 and g.offset_x == 0 and g.scale_x == 1.0
    assert out[:10].max() == 0 and out[10:30].min() > 0.99


def test_cache_hit_equals_cold(tmp_path):
    Image.fromarray((ramp() * 255).astype(np.uint8)).save(tmp_path / "a.png")
    cache = ImageCache(tmp_path / "cache")
    cold = load_image(tmp_path / "a.png", PreprocessSpec(32), cache=cache)
    warm = load_image(tmp_path / "a.png", PreprocessSpec(32), cache=cache)
    assert not cold.record.cached and warm.record.cached
    assert np.array_equal(cold.pixels, warm.pixels)
    assert warm.record.steps == cold.record.steps
    other = load_image(tmp_path / "a.png", PreprocessSpec(48), cache=cache)  # spec is part of the key
    assert other.pixels.shape == (48, 48) and not other.record.cached
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_cache_concurrent_writers(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    Image.fromarray((ramp() * 255).astype(np.uint8)).save(tmp_path / "a.png")
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(_load_cached, [str(tmp_path)] * 8))
    assert all(np.array_equal(results[0], r) for r in results)


def _load_cached(folder):
    from pathlib import Path

    return load_image(Path(folder) / "a.png", PreprocessSpec(32), cache=ImageCache(Path(folder) / "cache")).pixels
