"""Settings apply or refuse: `data.classes` keeps the first N classes on every data source
(digits, CIFAR, CIFAR-N, CIFAR-10-C, Hugging Face text and images), or is refused in one
line where it cannot apply; next-token classes refuse a model that is not causal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nclayers.config import AnalyzeConfig, DataConfig, load_config
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
    args = [f"{k}={v}" for k, v in TINY.items() if not k.startswith("train.track")]
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
