"""Typed configs: YAML files, key=value overrides, and clear refusals."""

from __future__ import annotations

import pytest

from nclayers.config import Config, load_config, parse_override


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: cifar10\n  dir: /data\ntrain:\n  epochs: 3\n  lr: 1\n")
    cfg = load_config(path, ["train.epochs=7", "train.milestones=[2, 5]", "model.blocks=layer4.*"])
    assert isinstance(cfg, Config)
    assert cfg.data.name == "cifar10" and cfg.data.dir == "/data"
    assert cfg.train.epochs == 7 and cfg.train.milestones == [2, 5]
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.blocks == "layer4.*"
    assert cfg.train.momentum == 0.9  # untouched default


def test_noise_accepts_rate_or_name():
    assert load_config(None, ["data.noise=0.4"]).data.noise == 0.4
    assert load_config(None, ["data.name=cifar10", "data.noise=worse"]).data.noise == "worse"
    with pytest.raises(ValueError, match=r"human label sets exist for cifar10.*not digits"):
        load_config(None, ["data.noise=worse"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.epoch=3", "unknown config key 'train.epoch'.*train.epochs"),
        ("train.epochs=three", r"train.epochs='three': input should be a valid integer"),
        ("train.lr=[1]", "train.lr"),
        ("train=3", "train=3: input should be a valid dictionary"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_overrides_are_explained(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_parse_override_uses_yaml_types():
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=true") == ("a", True)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_exponent_floats_in_yaml_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  min_lr: 1e-5\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr == 1e-5


def test_option_dicts_merge_key_by_key():
    cfg = load_config(None, ["model.options.embed_dim=48", "model.options.patch_size=4"])
    assert cfg.model.options == {"embed_dim": 48, "patch_size": 4}
