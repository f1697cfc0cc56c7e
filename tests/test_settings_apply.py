"""Settings apply or refuse: `data.classes` keeps the first N classes on every data source
(digits, CIFAR, CIFAR-N, CIFAR-10-C, Hugging Face text and images), or is refused in one
line where it cannot apply; next-token classes refuse a model that is not causal; every
key of the data, analyze, model, train, probe and prune sections, given on a verb that
reads a run (analyze, probe, memorization, prune, train --resume), changes what it
measures, leaves the numbers as they are, or is refused in one line (the README's
"Configuration" states the rule)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nclayers.config import (
    NOT_WEIGHTS,
    AnalyzeConfig,
    DataConfig,
    ModelConfig,
    ProbeSettings,
    PruneConfig,
    TrainConfig,
    load_config,
)
from nclayers.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def kept_by_hand(full, n: int) -> dict[str, list[int]]:
    """The labels views of the samples whose every label is below n, from the full split."""
    keep = np.ones(len(full), dtype=bool)
    for y in full.labels.values():
        keep &= y.numpy() < n
    return {v: y.numpy()[keep].tolist() for v, y in full.labels.items()}


def check_first_classes(settings: dict, n: int, splits=("train", "test")) -> None:
    for split in splits:
        full = load_dataset(DataConfig(**settings), split)
        ds = load_dataset(DataConfig(**settings, classes=n), split)
        assert ds.num_classes == n and ds.classes == full.classes[:n]
        assert {v: y.tolist() for v, y in ds.labels.items()} == kept_by_hand(full, n)
        assert 0 < len(ds) < len(full)


def test_data_classes_keeps_the_first_classes_of_digits():
    check_first_classes({"name": "digits"}, 3)
    ds = load_dataset(DataConfig(name="digits", classes=3), "test")
    full = load_dataset(DataConfig(name="digits"), "test")
    picked = full.labels["clean"] < 3
    assert torch.equal(ds.images, full.images[picked])  # the same images, in order


def test_data_classes_with_shuffled_noise_and_subsets_stays_among_the_classes():
    ds = load_dataset(DataConfig(name="digits", classes=4, noise=0.5, train_subset=200), "train")
    assert len(ds) == 200 and ds.num_classes == 4
    assert set(ds.labels["noisy"].tolist()) == {0, 1, 2, 3}
    assert torch.bincount(ds.labels["clean"]).tolist() == [50, 50, 50, 50]


def test_data_classes_keeps_the_first_classes_of_cifar(shared_data):
    check_first_classes({"name": "cifar10", "dir": str(shared_data)}, 4, ("test",))


def test_data_classes_with_human_label_noise_keeps_both_labels_in_range(shared_data):
    if not (shared_data / "cifar-10n").is_dir():
        pytest.skip("no CIFAR-10N labels in the shared data")
    check_first_classes({"name": "cifar10", "dir": str(shared_data), "noise": "worse"}, 4,
                        ("train",))  # fmt: skip


def test_data_classes_keeps_the_first_classes_of_cifar10c(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "gaussian_noise.npy", rng.integers(0, 256, (5 * 40, 32, 32, 3), np.uint8))
    np.save(folder / "labels.npy", np.tile(np.arange(40, dtype=np.uint8) % 10, 5))
    settings = {"name": "cifar10c", "dir": str(tmp_path), "corruption": "gaussian_noise",
                "severity": 1}  # fmt: skip
    check_first_classes(settings, 3, ("test",))


def test_data_classes_keeps_the_first_classes_of_hugging_face_text(tmp_path):
    pytest.importorskip("datasets")
    from hf_tiny import word_tokenizer

    tok = word_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    words = "the cat sat on the mat . a dog ran".split()
    for split, n in (("train", 40), ("test", 20)):
        rows = [{"text": " ".join(words[i % 5 : i % 5 + 3]), "label": f"c{i % 4}"}
                for i in range(n)]  # fmt: skip
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_first_classes({"name": f"hf:{tmp_path / 'd'}", "tokenizer": str(tmp_path / "tok")}, 2)


def test_data_classes_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match=r"data\.classes=11: digits has 10 classes"):
        load_dataset(DataConfig(name="digits", classes=11), "train")
    with pytest.raises(ValueError, match=r"data\.classes=1: .*between 2 and 10"):
        load_dataset(DataConfig(name="digits", classes=1), "train")


def test_data_classes_is_refused_on_language_model_text(tmp_path):
    pytest.importorskip("datasets")
    from hf_tiny import word_tokenizer

    word_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "lm").mkdir()
    for split in ("train", "test"):
        (tmp_path / "lm" / f"{split}.jsonl").write_text('{"text": "the cat sat"}\n' * 4)
    cfg = DataConfig(name=f"hf:{tmp_path / 'lm'}", tokenizer=str(tmp_path / "tok"), classes=2)
    with pytest.raises(ValueError, match=r"data\.classes=2: .* has no labels"):
        load_dataset(cfg, "train")


# ----------------------------------------------------------------------------- next token
def test_next_token_classes_need_a_causal_model():
    pytest.importorskip("transformers")
    from hf_tiny import tiny_model
    from nclayers.config import Config
    from nclayers.jobs.common import check_causal

    cfg = Config().updated({"model.name": "hf:x", "analyze.task": "next_token"})
    check_causal(tiny_model("llama", "causal_lm"), cfg)  # causal: accepted
    check_causal(tiny_model("gpt2", "sequence"), cfg)  # a causal classifier too
    for family in ("bert", "roberta"):
        with pytest.raises(ValueError, match="is not a causal language model"):
            check_causal(tiny_model(family, "sequence"), cfg)


# ----------------------------------------------------------------------------- every key
# A value other than the default for every data key, with what it needs to act (a seed
# acts with its option on). A key added to DataConfig without an entry fails the walk.
DATA_VALUES = {
    "name": ("cifar10", {}), "dir": ("/nowhere", {}), "download": (True, {}),
    "noise": (0.4, {}), "noise_seed": (1, {"noise": 0.4}),
    "noise_mode": ("uniform", {"noise": 0.4}), "corruption": ("gaussian_noise", {"severity": 3}),
    "severity": (5, {"corruption": "gaussian_noise", "severity": 3}), "corrupt_test": (True, {
        "corruption": "gaussian_noise", "severity": 3}),
    "corruption_seed": (1, {"corruption": "gaussian_noise", "severity": 3}),
    "train_subset": (100, {}), "test_subset": (50, {}),
    "subset_seed": (1, {"train_subset": 100, "test_subset": 50}), "classes": (3, {}),
    "image_size": (64, {}), "resize": (80, {}), "mean": ([0.5], {}), "std": ([0.5], {}),
    "workers": (0, {}), "decoder": ("pil", {}), "skip_bad": (True, {}),
    "text_column": ("t", {}), "label_column": ("y", {}), "image_column": ("img", {}),
    "max_length": (8, {}), "tokenizer": ("tok", {}), "train_split": ("a", {}),
    "test_split": ("b", {}), "config_name": ("c", {}), "window": (3, {}),
    "padding_side": ("left", {}),
}  # fmt: skip
# Keys that name where the data lies, not what is measured: honoured by not being needed.
WHERE = {"dir"}


def _loaded(settings: dict) -> list:
    out = []
    for split in ("train", "test"):
        ds = load_dataset(DataConfig(**settings), split)
        out.append((ds.images, {k: v.tolist() for k, v in ds.labels.items()}, ds.classes))
    return out


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("key", sorted(DataConfig.model_fields))
def test_every_data_key_is_honoured_or_refused_on_digits(key):
    """Digits read every key: each changes the loaded splits, or is refused in one line
    (a key of other sources: image folders, CIFAR, Hugging Face data)."""
    value, needs = DATA_VALUES[key]
    base = {"name": "digits", **needs}
    try:
        changed = _loaded({**base, key: value})
    except ValueError as err:  # NCLayersError: refused, naming the key
        assert f"data.{key}=" in str(err) or "data.dir" in str(err), str(err)
        assert len(str(err).splitlines()) == 1
        return
    assert key in WHERE or not _same(changed, _loaded(base)), f"data.{key}={value!r} ignored"


# ----------------------------------------------------------------- the analyze keys
# Each analyze key, a value other than its default, and what it must do to a run's
# measurement on the CPU: "changes" the rows, or "same" (a GPU speed switch or a batch
# size: the numbers stay those of the default, to float64 rounding), or "refused".
ANALYZE_VALUES = {
    "split": ("train", "changes"), "reference": (None, "changes"),
    "reference_subset": (30, "changes"), "batch_size": (37, "same"),
    "classic_nc1": (True, "changes"), "amp": (False, "same"), "channels_last": (False, "same"),
    "task": ("next_token", "refused"), "top_k": (5, "refused"),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from nclayers.jobs import train_job
    from tinyruns import TINY

    torch.set_num_threads(1)
    # Label noise: the memorization verb measures its clean and noisy labels.
    args = [*(f"{k}={v}" for k, v in TINY.items() if not k.startswith("train.track")),
            "data.noise=0.4"]  # fmt: skip
    out = tmp_path_factory.mktemp("keys") / "run"
    train_job(load_config(None, [*args, "train.epochs=1"]), out, progress=False)
    return out, args


def _measured(run, args, tmp_path, extra: list[str]):
    from nclayers.jobs import RunFolder, analyze_job

    cfg = load_config(None, [*args, *extra, f"model.checkpoint={run / 'checkpoint.pt'}"])
    out = RunFolder(tmp_path / "-".join(extra or ["default"]).replace("=", "_"))
    return analyze_job(cfg, out, progress=False)


def _numbers(table) -> list:
    cols = ("split", "block", "n", "nc1", "nc2", "ncc_acc", "nc1_classic")
    return [tuple(r.get(c) for c in cols) for r in table.table]


@pytest.mark.parametrize("key", sorted(AnalyzeConfig.model_fields))
def test_every_analyze_key_is_honoured_or_refused(key, tiny_run, tmp_path):
    """Each analyze key changes what is measured, leaves the numbers as they are where it
    only says how fast (CPU: the GPU switches are off), or is refused in one line."""
    run, args = tiny_run
    value, expected = ANALYZE_VALUES[key]
    setting = f"analyze.{key}={'null' if value is None else value}"
    if expected == "refused":
        with pytest.raises(ValueError, match=f"analyze.{key}") as err:
            _measured(run, args, tmp_path, [setting])
        assert len(str(err.value).splitlines()) == 1
        return
    base = _numbers(_measured(run, args, tmp_path, []))
    changed = _numbers(_measured(run, args, tmp_path, [setting]))
    if expected == "changes":
        assert changed != base, f"{setting} changed nothing"
    else:
        assert len(changed) == len(base)
        for a, b in zip(changed, base, strict=True):
            assert a[:3] == b[:3]
            for x, y in zip(a[3:], b[3:], strict=True):
                assert (x is None and y is None) or x == pytest.approx(y, rel=1e-9), setting


# ------------------------------------------------- every key on every verb that reads a run
# The verbs that measure a run folder (`nclayers VERB RUN key=value`), what each writes,
# and the columns of those files that are numbers of the measurement (not timings).
MEASURING = ("analyze", "probe", "memorization", "prune")
WRITES = {
    "analyze": ("layers.csv",), "probe": ("layers.csv", "probe.csv"),
    "memorization": ("memorization_layers.csv", "memorization.csv"),
    "prune": ("prune.csv", "prune_layers.csv"),
}  # fmt: skip
NOT_NUMBERS = {"measurement", "seconds"}
# Each key of a section: a value other than its default, the settings it needs to act
# (with them on both sides of the comparison), and what it must do on the verb(s) that
# read it: "changes" the numbers, leaves them the "same" (a CPU speed switch, a batch
# size, where a cache goes), or is "refused" in one line naming the key. A key added to a
# section without an entry fails its walk.
PROBE_VALUES = {
    "epochs": (2, {}, "changes"), "batch_size": (32, {}, "changes"),
    "lrs": ([0.5], {}, "changes"), "val_fraction": (0.3, {}, "changes"),
    "momentum": (0.5, {}, "changes"), "weight_decay": (0.05, {}, "changes"),
    "milestones": ([1], {"epochs": 2}, "changes"),
    "gamma": (0.5, {"epochs": 2, "milestones": [1]}, "changes"),
    "augment": (True, {}, "changes"), "standardize": (False, {}, "changes"),
    "mode": ("stream", {}, "changes"), "cache_budget_gb": (0, {}, "same"),
    "cache_dir": ("CACHE", {"cache_budget_gb": 0}, "same"),
    "cache_dtype": ("float32", {}, "changes"), "eval_batch_size": (7, {}, "same"),
    "view": ("noisy", {}, "refused"), "seed": (1, {}, "changes"),
    "amp": (False, {}, "same"), "channels_last": (False, {}, "same"),
    "choose_by": ("accuracy", {}, "changes"), "standardize_per": ("feature", {}, "changes"),
}  # fmt: skip
PRUNE_VALUES = {
    "blocks": ([2], {}, "changes"), "baselines": (["random"], {}, "changes"),
    "seeds": ([1], {"baselines": ["random"]}, "changes"),
    "finetune_epochs": (1, {}, "changes"),
    "finetune_lr": (0.5, {"finetune_epochs": 1}, "changes"),
    "reference": ("train", {}, "changes"), "amp": (False, {}, "same"),
    "criteria": (["random"], {}, "changes"), "n": (2, {}, "refused"),
    # The layer scores of sequence layers (transformers): not computed on this convnet.
    "angular_position": ("mean", {}, "same"), "calibration_samples": (30, {}, "same"),
}  # fmt: skip
# The model keys on the measuring verbs, and on `train RUN --resume`: the keys that define
# the weights are refused (measure them in a new run); model.checkpoint and
# model.untrained choose other weights to measure; pool and blocks say what is measured.
MODEL_VALUES = {
    "name": ("resnet34", "refused", "refused"), "width": (8, "refused", "refused"),
    "checkpoint": ("OTHER", "changes", "refused"), "untrained": (True, "changes", "refused"),
    "blocks": ("layer1.0,layer4.1", "changes", "same"), "pool": ("flat", "changes", "same"),
    "options": ({"zero_init_residual": True}, "refused", "refused"),
    "skip_head": (True, "refused", "refused"), "skip": ("fc.*", "refused", "refused"),
}  # fmt: skip
# The train keys on `train RUN --resume` (resumed from epoch 1 to train.epochs=2; the
# weights compared): the resumed epochs follow the schedule, optimiser settings and data
# of the keys given; the optimiser's kind and the seed are the run's (refused). On the
# measuring verbs every train key that defines the weights is refused; the others
# (checkpoints, TensorBoard, NC tracked during training) are not read there.
TRAIN_VALUES = {
    "epochs": (3, {}, "changes"), "batch_size": (20, {}, "changes"),
    "optimizer": ("adamw", {}, "refused"), "lr": (0.2, {}, "changes"),
    "momentum": (0.5, {}, "changes"), "betas": ([0.5, 0.9], {}, "same"),
    "weight_decay": (0.05, {}, "changes"), "schedule": ("cosine", {}, "changes"),
    "milestones": ([1], {"schedule": "multistep"}, "changes"),
    "gamma": (0.5, {"schedule": "multistep", "milestones": [1]}, "changes"),
    "warmup_epochs": (2, {"epochs": 3}, "changes"),
    "warmup_lr": (0.001, {"epochs": 3, "warmup_epochs": 2}, "changes"),
    "warmup_steps": (1, {"schedule": "linear"}, "changes"),
    "min_lr": (0.01, {"schedule": "cosine"}, "changes"),
    "label_smoothing": (0.2, {}, "changes"), "augment": (True, {}, "changes"),
    "seed": (1, {}, "refused"), "checkpoint_every": (0, {}, "same"),
    "track_nc_every": (1, {}, "same"), "track_nc_samples": (20, {"track_nc_every": 1}, "same"),
    "amp": (False, {}, "same"), "channels_last": (False, {}, "same"),
    "compile": (True, {}, "same"), "tensorboard": (True, {}, "same"),
}  # fmt: skip
# Resuming these is slower than the walk's budget: marked slow (the others run always).
SLOW_RESUMES = {"epochs", "batch_size", "schedule", "milestones", "gamma", "warmup_epochs",
                "warmup_lr", "warmup_steps", "min_lr", "label_smoothing", "augment",
                "checkpoint_every", "track_nc_every", "track_nc_samples", "channels_last",
                "compile", "tensorboard", "betas", "amp"}  # fmt: skip


def _setting(section: str, key: str, value) -> str:
    import yaml

    if isinstance(value, (list, dict)):
        text = yaml.safe_dump(value, default_flow_style=True).strip()
    else:
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else (
            str(value))  # fmt: skip
    return f"{section}.{key}={text}"


def _settings(section: str, values: dict) -> list[str]:
    return [_setting(section, k, v) for k, v in values.items()]


def _verb(verb: str, run, settings: list[str], out=None) -> tuple[int, str]:
    """`nclayers VERB RUN settings [--out OUT]`: (exit status, what it printed on stderr)."""
    import contextlib
    import io

    from nclayers.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([verb, str(run), *settings, *(["--out", str(out)] if out else []), "-q"])
    return rc, err.getvalue()


def _rows(folder, verb: str) -> list:
    from nclayers.table import Table

    out = []
    for name in WRITES[verb]:
        table = Table.from_csv(folder / name)
        cols = [c for c in table.columns if c not in NOT_NUMBERS]
        out += [tuple(r.get(c) for c in cols) for r in table]
    return out


_MEASURED: dict = {}


def _measure(verb: str, run, settings: list[str], tmp) -> list:
    """The numbers `verb` writes measuring `run` with `settings` (into a new folder under
    `tmp`, reading the run's weights); the same call is measured once."""
    key = (verb, str(run), tuple(settings))
    if key not in _MEASURED:
        out = tmp / f"m{len(_MEASURED)}"
        rc, err = _verb(verb, run, settings, out)
        assert rc == 0, err
        _MEASURED[key] = _rows(out, verb)
    return _MEASURED[key]


def _same_numbers(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            if isinstance(u, float) and isinstance(v, float):
                if not (u == pytest.approx(v, rel=1e-9, abs=1e-12) or (u != u and v != v)):
                    return False
            elif u != v:
                return False
    return True


def _check(expected: str, verb: str, run, base: list[str], setting: str, tmp) -> None:
    """`verb` on `run` with `base` + `setting` does what `expected` says."""
    if expected == "refused":
        key = setting.split("=", 1)[0]
        new = tmp / f"refused{len(list(tmp.iterdir()))}"
        for out in (new, None):  # into a new folder, and in the run's own
            rc, err = _verb(verb, run, [*base, setting], out)
            assert rc == 2, f"{verb} {setting}: not refused ({err})"
            line = err.strip()
            assert len(line.splitlines()) == 1 and key in line, line
        assert not (new / "config.yaml").exists()  # not made a run by a refused command
        return
    before = _measure(verb, run, base, tmp)
    after = _measure(verb, run, [*base, setting], tmp)
    if expected == "changes":
        assert not _same_numbers(after, before), f"{verb}: {setting} changed nothing"
    else:
        assert _same_numbers(after, before), f"{verb}: {setting} changed the numbers"


@pytest.fixture(scope="module")
def measure_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("measured")


@pytest.mark.parametrize("key", sorted(ProbeSettings.model_fields))
def test_every_probe_key_is_honoured_or_refused_on_probe(key, tiny_run, measure_dir):
    run, _ = tiny_run
    value, needs, expected = PROBE_VALUES[key]
    if value == "CACHE":
        value = str(measure_dir / f"cache-{key}")
    base = _settings("probe", {"epochs": 1, "batch_size": 16, **needs})
    _check(expected, "probe", run, base, _setting("probe", key, value), measure_dir)


@pytest.mark.parametrize("key", sorted(PruneConfig.model_fields))
def test_every_prune_key_is_honoured_or_refused_on_prune(key, tiny_run, measure_dir):
    run, _ = tiny_run
    value, needs, expected = PRUNE_VALUES[key]
    base = _settings("prune", needs)
    _check(expected, "prune", run, base, _setting("prune", key, value), measure_dir)


def _other_checkpoint(run, tmp):
    """The run's checkpoint with every weight halved: other weights of the same model."""
    path = tmp / "other.pt"
    if not path.exists():
        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
        model = {k: v / 2 if v.is_floating_point() else v for k, v in state["model"].items()}
        torch.save({**state, "model": model}, path)
    return str(path)


@pytest.mark.parametrize("verb", MEASURING)
@pytest.mark.parametrize("key", sorted(ModelConfig.model_fields))
def test_every_model_key_is_honoured_or_refused_on_the_measuring_verbs(
    key, verb, tiny_run, measure_dir
):
    run, _ = tiny_run
    value, expected, _ = MODEL_VALUES[key]
    if value == "OTHER":
        value = _other_checkpoint(run, measure_dir)
    base = ["probe.epochs=1"] if verb == "probe" else []
    _check(expected, verb, run, base, _setting("model", key, value), measure_dir)


@pytest.mark.parametrize("verb", MEASURING)
@pytest.mark.parametrize("key", sorted(TrainConfig.model_fields))
def test_every_train_key_is_refused_or_not_read_on_the_measuring_verbs(
    key, verb, tiny_run, measure_dir
):
    """A train key that defines the weights is refused naming it (train a new run with
    it); the others only act while training (checkpoints, TensorBoard, NC tracked during
    training): not read, see the test of the sections a verb does not read."""
    run, _ = tiny_run
    value, _, _ = TRAIN_VALUES[key]
    if f"train.{key}" in NOT_WEIGHTS:
        return
    base = ["probe.epochs=1"] if verb == "probe" else []
    _check("refused", verb, run, base, _setting("train", key, value), measure_dir)


@pytest.mark.parametrize(
    ("section", "values", "verbs"),
    [
        ("probe", PROBE_VALUES, ("analyze", "memorization", "prune")),
        ("prune", PRUNE_VALUES, ("analyze", "probe", "memorization")),
        ("train", {k: v for k, v in TRAIN_VALUES.items() if f"train.{k}" in NOT_WEIGHTS},
         MEASURING),
    ],
)  # fmt: skip
def test_a_section_a_verb_does_not_read_is_accepted_and_changes_nothing(
    section, values, verbs, tiny_run, measure_dir
):
    """probe.* on analyze, prune.* on probe, ...: a run's config file holds every section
    (a sweep runs every stage with one config), so they are accepted; they change neither
    the numbers nor the measurement's key (the stage stays done). The same for the train
    keys that act only while training (train.checkpoint_every, ...) on the measuring verbs."""
    from nclayers.config import load_config as load
    from nclayers.jobs.folder import measurement_key

    run, args = tiny_run
    given: dict = {}
    for key, (value, needs, expected) in values.items():
        if expected != "refused" or section == "train":
            given.update({**needs, key: str(measure_dir) if value == "CACHE" else value})
    settings = _settings(section, given)
    for verb in verbs:
        base = ["probe.epochs=1"] if verb == "probe" else []
        before = _measure(verb, run, base, measure_dir)
        assert _same_numbers(_measure(verb, run, [*base, *settings], measure_dir), before), verb
        if verb != "prune":  # prune keeps no measurements
            cfg = load(None, [*args, *base])
            assert measurement_key(verb, cfg.updated(settings)) == measurement_key(verb, cfg)


def _resumed(run, tmp, settings: list[str]) -> tuple[int, str, dict | None]:
    """`nclayers train COPY --resume train.epochs=2 settings` on a copy of `run` (trained
    for 1 epoch): exit status, stderr, the resumed weights."""
    import shutil

    copy = tmp / f"resume{len(list(tmp.iterdir()))}"
    shutil.copytree(run, copy)
    rc, err = _verb("train", copy, ["--resume", "train.epochs=2", *settings])
    if rc:
        return rc, err, None
    return rc, err, torch.load(copy / "checkpoint.pt", map_location="cpu", weights_only=True)


_RESUMED: dict = {}


def _check_resume(expected: str, run, tmp, base: list[str], setting: str) -> None:
    if expected == "refused":
        rc, err, _ = _resumed(run, tmp, [*base, setting])
        key = setting.split("=", 1)[0]
        assert rc == 2 and len(err.strip().splitlines()) == 1 and key in err, err
        return
    for settings in (tuple(base), (*base, setting)):
        if settings not in _RESUMED:
            rc, err, state = _resumed(run, tmp, list(settings))
            assert rc == 0, err
            _RESUMED[settings] = state["model"]
    a, b = _RESUMED[tuple(base)], _RESUMED[(*base, setting)]
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same == (expected == "same"), f"train --resume {setting}: {expected} expected"


@pytest.mark.parametrize(
    "key",
    [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_RESUMES else k
     for k in sorted(TrainConfig.model_fields)],
)  # fmt: skip
def test_every_train_key_is_honoured_or_refused_on_resume(key, tiny_run, tmp_path):
    run, _ = tiny_run
    value, needs, expected = TRAIN_VALUES[key]
    _check_resume(expected, run, tmp_path, _settings("train", needs), _setting("train", key, value))


@pytest.mark.parametrize("key", sorted(ModelConfig.model_fields))
def test_every_model_key_is_honoured_or_refused_on_resume(key, tiny_run, tmp_path):
    run, _ = tiny_run
    value, _, expected = MODEL_VALUES[key]
    if value == "OTHER":
        value = _other_checkpoint(run, tmp_path)
    _check_resume(expected, run, tmp_path, [], _setting("model", key, value))


@pytest.mark.parametrize("key", sorted(DataConfig.model_fields))
def test_every_data_key_that_defines_the_weights_is_refused_on_analyze(key, tiny_run, measure_dir):
    """The data keys that define the weights (the training data: noise, subsets, classes,
    corruption, ...) are refused on a verb that measures the run, naming the key; the
    others (where the data lie, how they are read, the test subset) are walked on the
    data they load above."""
    run, _ = tiny_run
    if f"data.{key}" in NOT_WEIGHTS:
        return
    # (other values than the run's: noise 0.4, train_subset 100)
    value = {"noise": 0.2, "train_subset": 50}.get(key, DATA_VALUES[key][0])
    _check("refused", "analyze", run, [], _setting("data", key, value), measure_dir)


def test_the_sections_training_does_not_read_change_nothing_on_resume(tiny_run, tmp_path):
    """probe.* and prune.* given to `train RUN --resume`: accepted, the weights as without."""
    run, _ = tiny_run
    given = []
    for section, values in (("probe", PROBE_VALUES), ("prune", PRUNE_VALUES)):
        given += _settings(section, {k: v for k, (v, _, e) in values.items()
                                     if e != "refused" and v != "CACHE"})  # fmt: skip
    rc, err, before = _resumed(run, tmp_path, [])
    assert rc == 0, err
    rc, err, after = _resumed(run, tmp_path, given)
    assert rc == 0, err
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
