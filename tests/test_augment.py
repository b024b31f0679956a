"""train.augment: one typed entry per transform; each entry changes what it should and nothing else."""

import math

import pytest
import torch
import torch.nn.functional as F

from medres.config import AugmentConfig, augment_settings, load_config
from medres.data.transforms import AugmentSpec, augment
from medres.errors import ConfigInvalid


def _before_issue_28(x, gen, rotate_deg=7.0, scale=0.08, translate=0.06, brightness=0.08, contrast=0.12, gamma=0.15, hflip=False):
    """transforms.augment as it was before train.augment became a mapping (the reference for `true`)."""
    b = x.shape[0]

    def u(lo, hi):
        return torch.rand(b, generator=gen) * (hi - lo) + lo

    angle = u(-rotate_deg, rotate_deg) * math.pi / 180
    s = u(1 - scale, 1 + scale)
    tx, ty = u(-translate, translate) * 2, u(-translate, translate) * 2
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if hflip else torch.ones(b)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (b, 1, *x.shape[1:]), align_corners=False)
    out = F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(1)
    shape = (b, 1, 1)
    bright = u(-brightness, brightness).view(shape)
    con = u(1 - contrast, 1 + contrast).view(shape)
    g = torch.exp(u(-gamma, gamma)).view(shape)
    mean = out.mean(dim=(1, 2), keepdim=True)
    out = ((out - mean) * con + mean + bright).clamp(0, 1)
    return out.pow(g).clamp(0, 1)


def batch(b=8, size=24):
    """Asymmetric films with intensities inside (0.2, 0.8), so nothing clips."""
    g = torch.Generator().manual_seed(1)
    x = 0.2 + 0.3 * torch.rand(b, size, size, generator=g)
    x[:, 4:10, 2:8] += 0.3  # a bright block off-centre: flips and rotations move it
    return x


def run(settings: AugmentConfig, x, seed=0):
    return augment(x, torch.Generator().manual_seed(seed), AugmentSpec.from_config(settings))


def only(**entries) -> AugmentConfig:
    return AugmentConfig.off().model_copy(update=entries)


def test_true_equals_the_recipe_before_the_mapping():
    x = batch()
    for seed in (0, 3):
        want = _before_issue_28(x, torch.Generator().manual_seed(seed))
        assert torch.equal(run(augment_settings(True), x, seed), want)
    want = _before_issue_28(x, torch.Generator().manual_seed(0), hflip=True)
    assert torch.equal(run(augment_settings({"hflip": True}), x), want)


def test_false_is_the_identity_and_all_off():
    off = augment_settings(False)
    assert off == AugmentConfig.off() and not off.enabled and augment_settings(True).enabled
    x = batch()
    assert torch.equal(run(off, x), x)
    assert torch.equal(run(only(rotation=0.0), x), x)  # rotation 0, everything else off: same geometry, same pixels


def test_mapping_overrides_single_entries():
    s = augment_settings({"rotation": 3, "noise": 0.01})
    assert s.rotation == 3 and s.noise == 0.01
    assert s.model_dump(exclude={"rotation", "noise"}) == AugmentConfig().model_dump(exclude={"rotation", "noise"})
    cfg = load_config(None, ["train.augment.rotation=2"])  # --set into `augment: true`
    assert cfg.train.augmentation.rotation == 2 and cfg.train.augmentation.gamma == AugmentConfig().gamma
    cfg = load_config(None, ["train.augment=false", "train.augment.noise=0.02"])  # into `augment: false`
    assert cfg.train.augmentation == only(noise=0.02)


@pytest.mark.parametrize("entry", ["brightness", "contrast", "gamma", "noise"])
def test_intensity_entries_keep_the_geometry(entry):
    x = batch()
    y = run(only(**{entry: 0.2}), x)
    assert not torch.equal(y, x)
    if entry == "brightness":  # a constant shift per film
        d = y - x
        assert torch.allclose(d, d.mean(dim=(1, 2), keepdim=True), atol=1e-5)
    elif entry == "contrast":  # a scale about each film's mean
        m = x.mean(dim=(1, 2), keepdim=True)
        c = ((y - m) * (x - m)).sum(dim=(1, 2), keepdim=True) / ((x - m) ** 2).sum(dim=(1, 2), keepdim=True)
        assert torch.allclose(y - m, c * (x - m), atol=1e-5)
    elif entry == "gamma":  # y = x ** g per film
        g = (y.log() / x.log()).mean(dim=(1, 2), keepdim=True)
        assert torch.allclose(y, x ** g, atol=1e-5)
    else:  # noise: zero-mean, no structure moved
        assert (y - x).mean().abs() < 0.02 and 0.1 < (y - x).std() < 0.3


@pytest.mark.parametrize("entry,value", [("rotation", 20.0), ("scale", (0.7, 0.8)), ("translate", 0.2)])
def test_geometric_entries_keep_the_intensities(entry, value):
    flat = torch.full((4, 24, 24), 0.5)
    y = run(only(**{entry: value}), flat)
    c = y[:, 8:16, 8:16]  # the centre stays inside the film: a geometric change keeps its values
    assert torch.allclose(c, torch.full_like(c, 0.5), atol=1e-5)
    x = batch(4)
    assert not torch.allclose(run(only(**{entry: value}), x), x, atol=1e-3)


@pytest.mark.parametrize("entry,dim", [("hflip", -1), ("vflip", -2)])
def test_flips_mirror_some_films_and_only_along_their_axis(entry, dim):
    x = batch(16)
    y = run(only(**{entry: True}), x)
    flipped = [bool(torch.allclose(b, a.flip(dim), atol=1e-5)) for a, b in zip(x, y)]
    kept = [bool(torch.allclose(b, a, atol=1e-5)) for a, b in zip(x, y)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_flips_are_off_by_default_and_say_why():
    assert not AugmentConfig().hflip and not AugmentConfig().vflip
    assert "heart" in AugmentConfig.model_fields["hflip"].description


@pytest.mark.parametrize("override,needle", [
    ("train.augment.rotaton=3", "train.augment.rotaton is not an augmentation entry"),
    ("train.augment.rotation=-1", "train.augment.rotation"),
    ("train.augment.scale=[1.2,0.9]", "train.augment.scale must be [low, high]"),
    ("train.augment.contrast=1.5", "train.augment.contrast"),
    ("train.augment=sometimes", "train.augment must be true, false or a mapping"),
])
def test_bad_entry_is_a_one_line_config_error(override, needle):
    with pytest.raises(ConfigInvalid) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and msg.count(";") == 0, msg


def test_older_configs_still_load(tmp_path):
    for text, want in (("train:\n  augment: true\n  hflip: false\n", AugmentConfig()),
                       ("train:\n  augment: true\n  hflip: true\n", AugmentConfig(hflip=True)),
                       ("train:\n  augment: false\n  hflip: true\n", AugmentConfig.off())):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        assert load_config(p).train.augmentation == want
    cfg = load_config(None, ["train.augment={rotation: 4}"])
    from medres.config import config_from_dict, dump_config
    import yaml

    again = config_from_dict(yaml.safe_load(dump_config(cfg)))  # a run's config.yaml reloads (resume)
    assert again.train.augmentation == cfg.train.augmentation


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_training_writes_augment_png_and_the_card_records_the_settings(tmp_path):
    from medres.data.synthetic import make_dataset
    from medres.train import fit

    from helpers import smoke_config

    manifest = make_dataset(tmp_path / "data", n_per_class=8, size=32, classes=("normal", "opacity"), seed=0, dicom_fraction=0.0)
    cfg = smoke_config(manifest, "data.classes=[normal,opacity]", "data.image_size=32", "train.epochs=1", "train.max_steps_per_epoch=1",
                       "train.batch_size=8", "train.precision=fp32", "train.calibrate=false", "train.augment.rotation=3", "train.augment.noise=0.01")
    fit(cfg, tmp_path / "run", show_progress=False)
    png = tmp_path / "run" / "augment.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (tmp_path / "run" / "model_card.md").read_text()
    assert "Augmentation during training (train.augment): rotation ±3°" in card and "noise std 0.01" in card and "hflip off" in card
