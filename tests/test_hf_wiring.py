"""How Hugging Face data sets reach the jobs (load_dataset / make_batches), the config keys
that steer them, next-token probes against a hand computation, the text demo at a
reduced size, and what `nclayers --help` imports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from hf_tiny import TEXT, positions_by_hand, tiny_model, word_tokenizer
from nclayers.config import ProbeSettings, load_config
from nclayers.data import ArrayDataset, TextBatches, TextData, load_dataset, make_batches
from nclayers.data.text import NextTokenClasses, count_next_tokens, from_texts
from nclayers.models import find_blocks
from nclayers.probing import probe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    word_tokenizer().save_pretrained(path)
    return path


def test_text_splits_are_slices_of_one_file_numbered_as_training(tmp_path, tokenizer_folder):
    # 10 rows; the held-out slice (the last 3) has no "a": numbered by the training part.
    rows = [("the cat", "a"), ("a dog", "b"), ("the mat", "c")] * 3 + [("the log", "c")]
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    cfg = load_config(None, [
        f"data.name=hf:{path}", f"data.tokenizer={tokenizer_folder}",
        "data.train_split=train[:7]", "data.test_split=train[7:]", "data.padding_side=left",
        "data.window=2",
    ]).data  # fmt: skip
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert isinstance(train, TextData) and (len(train), len(test)) == (7, 3)
    assert train.classes == test.classes == ["a", "b", "c"]
    assert test.labels["clean"].tolist() == [1, 2, 2]  # "b", "c", "c"
    batches = make_batches(test, 2, channels_last=True, workers=3)  # image keys are ignored
    assert isinstance(batches, TextBatches) and batches.padding_side == "left"
    assert batches.window == 2
    inputs, labels = next(iter(batches))
    assert "position_ids" in inputs and labels.shape == (2,)
    tok = word_tokenizer()
    assert test.sequence(0) == tok("a dog")["input_ids"]


def test_language_text_subset_and_the_model_s_tokenizer(tmp_path, tokenizer_folder):
    (tmp_path / "lm").mkdir()
    texts = [s.strip() for s in TEXT.split(" . ") if s.strip()]
    (tmp_path / "lm" / "train.txt").write_text("\n".join(texts))
    cfg = load_config(None, [f"data.name=hf:{tmp_path / 'lm'}", "data.train_subset=3"]).data
    with pytest.raises(ValueError, match=r"data\.tokenizer is not set"):
        load_dataset(cfg, "train")
    data = load_dataset(cfg, "train", f"hf:{tokenizer_folder}")  # the model's own tokenizer
    assert len(data) == 3 and not data.labels and data.num_classes == 0
    full = load_dataset(cfg.model_copy(update={"train_subset": None}), "train",
                        f"hf:{tokenizer_folder}")  # fmt: skip
    chosen = [full.sequence(i) for i in range(len(full))]
    assert all(data.sequence(i) in chosen for i in range(3))  # a subset of the sequences
    assert data.meta["tokenizer"] == str(tokenizer_folder)


def test_images_go_to_vision_models_at_their_size(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)
    rows = {"image": [Image.fromarray(p) for p in pixels], "label": [0, 1, 2, 0, 1, 2]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "imgs")
    )
    vit = tiny_model("vit", "image", layers=2)  # 16 x 16 inputs
    vit.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})
    )
    cfg = load_config(None, [f"data.name=hf:{tmp_path / 'imgs'}"]).data
    ds = load_dataset(cfg, "train", f"hf:{tmp_path / 'vit'}")
    assert isinstance(ds, ArrayDataset) and ds.images.shape == (6, 3, 16, 16)
    assert ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="next-token classes apply to text"):
        make_batches(ds, 2, next_token=object())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (["data.tokenizer=x"], r"data.tokenizer='x' applies to Hugging Face data"),
        (["analyze.task=next_token", "model.pool=mean"], "leave model.pool unset"),
        (["prune.criteria=[plateau, depth]"], "prune.criteria"),
        (["analyze.top_k=1"], "analyze.top_k"),
        (["data.padding_side=up"], "data.padding_side"),
    ],
)
def test_config_refusals(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, override)


def test_next_token_probe_accuracy_equals_its_heads_on_hand_features():
    """Probe a tiny LM on positions (cache mode), then apply the heads it returns, as plain
    nn.Linear, to each test sentence's layer outputs from hooks of our own."""
    tok = word_tokenizer(fast=False)
    sentences = [s.strip() + " ." for s in TEXT.split(" . ") if s.strip(" .")]
    train, test = from_texts(sentences * 3, tok), from_texts(sentences, tok)
    classes = NextTokenClasses.from_counts(count_next_tokens(train), 5)
    model = tiny_model("llama", "causal_lm", layers=2, vocab=train.vocab_size)
    blocks = find_blocks(model, pool="token")
    settings = ProbeSettings(epochs=3, augment=False, batch_size=16, eval_batch_size=4)
    result = probe(model, train, test, 5, blocks, settings, next_token=classes)  # the lr grid
    assert result.val_samples >= 1 and len(result.selection) == 5 * len(blocks)
    assert result.mode == "cache"
    heads = result.heads.linear()
    sequences = [test.sequence(i) for i in range(len(test))]
    feats, y = positions_by_hand(model, blocks, sequences, classes.tokens.tolist())
    keep = y >= 0
    for layer, row in enumerate(result):
        x = feats[layer][keep]
        hand = float((heads[layer](x).argmax(1) == y[keep]).double().mean())
        assert row["probe_acc"] == pytest.approx(hand, abs=1e-9)
        assert row["n"] == int(keep.sum())
    history = result.history.where(epoch=3)
    assert all(0 <= r["train_acc"] <= 1 and r["loss"] > 0 for r in history)


def test_text_demo_at_a_reduced_size(tmp_path):
    from nclayers.jobs.text_demo import TINY, run_text_demo

    summary = run_text_demo(tmp_path / "demo", progress=False, size=TINY)
    out = tmp_path / "demo"
    for name in (
        "layers.csv",
        "prune.csv",
        "layer_scores.csv",
        "summary.json",
        "report.html",
        "text_demo.png",
        "prune.png",
        "lm/checkpoint.pt",
        "classifier/checkpoint.pt",
    ):
        assert (out / name).is_file(), name  # fmt: skip
    from nclayers.jobs import RunFolder
    from nclayers.table import Table

    manifest = json.loads((out / "manifest.json").read_text())
    for figure in ("text_demo.png", "prune.png"):  # written like every file: checksummed
        assert figure in manifest and RunFolder(out).verify(figure), figure

    layers = Table.from_csv(out / "layers.csv")
    for run, blocks in (("lm", TINY.lm_layers), ("classifier", TINY.cls_layers)):
        rows = layers.where(run=run, split="test")
        assert [r["layer"] for r in rows] == list(range(1, blocks + 1))
        assert all(r["probe_acc"] is not None and r["ncc_acc"] is not None for r in rows)
    kinds = [r["kind"] for r in Table.from_csv(out / "prune.csv")]
    assert kinds == ["none", "plateau", "block_influence", "angular", "last", "random",
                     "random", "random"]  # fmt: skip
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") == 2 and "held-out perplexity" in html
    saved = json.loads((out / "summary.json").read_text())
    assert saved["cpu_seconds"] > 0 and saved["seconds"]["total"] > 0
    assert "perplexity without fine-tune" in summary["text"]
    assert "Language model, test split, per layer" in summary["text"]


def test_help_and_the_jobs_do_not_import_the_hf_extra():
    code = (
        "import sys; from nclayers.cli import build_parser; build_parser();"
        "import nclayers.jobs, nclayers.jobs.text_demo, nclayers.train, nclayers.probing;"
        "import nclayers.data.hf_data;"
        "print(sorted(m for m in ('transformers', 'datasets', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "nclayers.cli", "demo", "--help"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "--text" in help_text
