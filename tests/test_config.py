from pathlib import Path

import pytest

from medres.config import Config, config_reference, load_config, parse_override
from medres.errors import ConfigInvalid

from helpers import ROOT  # noqa: E402


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)
    assert cfg.data.classes


def test_covid_config_keys():
    cfg = load_config(ROOT / "configs" / "covid_xray.yaml")
    assert cfg.data.classes == ["normal", "pneumonia", "covid"]
    assert str(cfg.data.manifest).endswith("data_manifests/covid_xray.csv")


def test_override_types():
    cfg = load_config(None, ["train.epochs=3", "train.lr=0.01", "data.classes=[a,b]", "train.augment=false", "data.voi=1"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 0.01
    assert cfg.data.classes == ["a", "b"]
    assert cfg.train.augment is False
    assert cfg.data.voi == 1
    assert parse_override("model.weights=none") == ("model.weights", "none")


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigInvalid) as e:
        load_config(p)
    assert "train.epocs" in str(e.value) and str(p) in str(e.value)
    assert e.value.code == "CONFIG_INVALID"


def test_bad_value_names_key_value_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: -0.1\n")
    with pytest.raises(ConfigInvalid) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.lr" in msg and "-0.1" in msg and str(p) in msg


@pytest.mark.parametrize("override,key", [("train.epochs=-1", "train.epochs"), ("train.epochs=abc", "train.epochs"), ("data.task=segmentation", "data.task"), ("train.precision=fp8", "train.precision"), ("bogus=1", "bogus")])
def test_bad_overrides(override, key):
    with pytest.raises(ConfigInvalid) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_fraction_sum_rejected():
    with pytest.raises(ConfigInvalid, match="val_fraction"):
        load_config(None, ["data.val_fraction=0.6", "data.test_fraction=0.5"])


def test_not_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigInvalid, match="mapping"):
        load_config(p)


def test_reference_covers_required_keys():
    keys = {row[0] for row in config_reference()}
    required = "name data.manifest data.root data.classes data.task data.image_size data.resize data.val_fraction data.test_fraction data.group_by data.cache_dir model.weights model.in_channels train.epochs train.batch_size train.lr train.freeze_epochs train.precision train.seed train.device train.num_workers".split()
    assert set(required) <= keys


def test_cache_dir_is_relative_to_cwd_not_config_folder(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "c.yaml").write_text("data:\n  cache_dir: .cache/medres\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_dir / "c.yaml")
    assert cfg.data.cache_dir == Path(".cache/medres")
