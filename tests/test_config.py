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


def test_load_config_is_pure(tmp_path):
    """14.2: load_config(path, overrides, base) returns a new config; base is unchanged
    (the demo recorded the noisy run's settings as its own through this)."""
    base = load_config(None, ["train.epochs=3"])
    before = base.to_dict()
    other = load_config(None, ["data.noise=0.4", "run=noisy"], base=base)
    assert base.to_dict() == before and other.data.noise == 0.4 and other.train.epochs == 3
    assert base.updated({"train.lr": 0.5}).train.lr == 0.5 and base.train.lr == 0.1
    with pytest.raises(Exception, match="frozen"):
        base.train.lr = 0.5  # configs are values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("analyze.split=foo", r"analyze\.split='foo': input should be 'train' or 'test'"),
        ("data.train_subset=-5", r"data\.train_subset=-5: input should be greater than 0"),
        ("data.train_subset=0", r"data\.train_subset=0: input should be greater than 0"),
        ("train.lr=0", r"train\.lr=0: input should be greater than 0"),
        ("train.lr=nan", r"train\.lr='nan': input should be a finite number"),
        ("train.label_smoothing=5", r"train\.label_smoothing=5: input should be less than 1"),
        ("device=foo", r"device='foo': string should match pattern"),
        ("probe.mode=foo", r"probe\.mode='foo': input should be 'auto', 'stream' or 'cache'"),
        ("train.warmup_epochs=300", r"warmup_epochs=300 leaves no epoch"),
    ],
)
def test_unchecked_values_are_refused_when_loaded(override, message, capsys):
    """17.7: each of these once ended in a wrong result or a traceback; now one line,
    exit 2, naming the key, the value and the valid range, before any work."""
    from nclayers.cli import main

    with pytest.raises(ValueError, match=message):
        load_config(None, [override])
    assert main(["analyze", override, "data.name=digits", "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nclayers analyze: error:")
    assert f"(from the override '{override}')" in err


def test_the_error_names_the_override_that_holds():
    """A key given twice (a shell variable of defaults, then the user's value): the error
    named the first override, whose value was fine, instead of the last one."""
    with pytest.raises(ValueError, match=r"from the override 'data\.train_subset=-5'"):
        load_config(None, ["data.train_subset=200", "device=cpu", "data.train_subset=-5"])


def test_malformed_yaml_and_unknown_keys_name_the_file_and_line(tmp_path, capsys):
    """17.9: a YAML error or an unknown key read from a file names the file and the line
    (a config file, and a run folder's config.yaml)."""
    from nclayers.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  name: digits\ntrain: [1\n")
    assert main(["analyze", str(bad), "-q"]) == 2
    assert f"{bad}: line 4: not valid YAML" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  name: digits\ntrain:\n  epochs: 3\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match=rf"unknown config key 'train\.lrr' \(in {typo}, line 5\)"):
        load_config(typo)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: resnet18\n")
    assert main(["analyze", str(run), "-q"]) == 2
    assert f"{run / 'config.yaml'}: line 2: not valid YAML" in capsys.readouterr().err


def test_recipe_files_compose(tmp_path):
    """`base:` lists: files merged in order, then the file's own keys; dotted keys too."""
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 7\n  lr: 0.2\n")
    (tmp_path / "b.yaml").write_text("train.lr: 0.3\nmodel: {width: 8}\n")
    (tmp_path / "c.yaml").write_text("base: [a.yaml, b.yaml]\nmodel.width: 16\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.width) == (7, 0.3, 16)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="include each other"):
        load_config(tmp_path / "loop.yaml")
