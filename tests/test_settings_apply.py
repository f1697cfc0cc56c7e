"""Settings apply or refuse: `data.classes` keeps the first N classes on every data source
(digits, CIFAR, CIFAR-N, CIFAR-10-C, Hugging Face text and images), or is refused in one
line where it cannot apply; next-token classes refuse a model that is not causal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nclayers.config import DataConfig
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
