"""Text data: next-token classes against a hand count, length-bucketed batches, loading
CSV / JSON lines / Parquet / plain text / save_to_disk folders through `datasets`."""

from __future__ import annotations

import collections
import json

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from hf_tiny import TEXT, word_tokenizer
from nclayers.data.text import (
    NextTokenClasses,
    TextBatches,
    count_next_tokens,
    from_texts,
    load_text,
)

SENTENCES = [s.strip() + " ." for s in TEXT.split(" . ") if s.strip(" .")]


def test_next_token_classes_equal_a_hand_count():
    tok = word_tokenizer(fast=False)
    data = from_texts(SENTENCES, tok)
    # By hand: the words that follow another word, counted over the sentences.
    follows = collections.Counter(w for s in SENTENCES for w in s.split()[1:])
    ranked = sorted(follows, key=lambda w: (-follows[w], tok.token_to_id(w)))
    k = 4
    classes = NextTokenClasses.from_counts(count_next_tokens(data), k)
    assert classes.tokens.tolist() == [tok.token_to_id(w) for w in ranked[:k]]
    assert classes.counts.tolist() == [follows[w] for w in ranked[:k]]
    # Labels of a right-padded batch: the next word's class, -1 elsewhere.
    words = [SENTENCES[0].split(), SENTENCES[3].split()]
    t = max(map(len, words))
    ids = torch.zeros(2, t, dtype=torch.int64)
    mask = torch.zeros(2, t, dtype=torch.int64)
    for i, w in enumerate(words):
        ids[i, : len(w)] = torch.tensor([tok.token_to_id(x) for x in w])
        mask[i, : len(w)] = 1
    hand = torch.full((2, t), -1)
    for i, w in enumerate(words):
        for j in range(len(w) - 1):
            if w[j + 1] in ranked[:k]:
                hand[i, j] = ranked.index(w[j + 1])
    got = classes.labels(ids, mask)
    assert torch.equal(got, hand)
    assert (got[0, len(words[0]) - 1 :] == -1).all()  # last real token and padding
    with pytest.raises(ValueError, match=r"analyze\.top_k=500"):
        NextTokenClasses.from_counts(count_next_tokens(data), 500)


def test_raw_and_wrapped_tokenizers_agree():
    raw = from_texts(SENTENCES, word_tokenizer(fast=False))
    fast = from_texts(SENTENCES, word_tokenizer())
    assert torch.equal(raw.ids, fast.ids) and torch.equal(raw.offsets, fast.offsets)
    assert raw.pad_id == fast.pad_id == 0
    assert raw.sequence(0) == [
        word_tokenizer(fast=False).token_to_id(w) for w in SENTENCES[0].split()
    ]


def corpus(n: int = 90, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    words = TEXT.replace(".", "").split()
    texts, labels = [], []
    while len(texts) < n:  # distinct texts, so a batch row tells which text it is
        k = int(torch.randint(1, 25, (1,), generator=gen))
        picks = torch.randint(0, len(words), (k,), generator=gen).tolist()
        text = " ".join(words[p] for p in picks)
        if text not in texts:
            labels.append(["neg", "pos", "mid"][len(texts) % 3])
            texts.append(text)
    return texts, labels


def test_batches_pad_little_cover_everything_and_repeat_by_seed():
    texts, labels = corpus()
    data = from_texts(texts, word_tokenizer(), labels)
    assert data.classes == ["mid", "neg", "pos"] and data.num_classes == 3
    batches = TextBatches(data, 8, shuffle=True, seed=3, window=4)
    seen, padded_tokens = [], 0
    for inputs, y in batches:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert mask[:, 0].all() and mask.sum(1).max() == ids.shape[1]  # right padding, tight
        assert (ids[mask == 0] == data.pad_id).all()
        padded_tokens += int((mask == 0).sum())
        for row, m, label in zip(ids, mask, y, strict=True):
            seq = row[m.bool()].tolist()
            i = next(j for j in range(len(data)) if data.sequence(j) == seq and j not in seen)
            seen.append(i)
            assert label == data.labels["clean"][i]
    assert sorted(seen) == list(range(len(data)))
    random_order = TextBatches(data, 8, shuffle=True, seed=3, window=1)
    assert padded_tokens < sum(int((x["attention_mask"] == 0).sum()) for x, _ in random_order)
    # The same seed and epoch give the same batches; another epoch another order.
    again = [
        x["input_ids"].tolist() for x, _ in TextBatches(data, 8, shuffle=True, seed=3, window=4)
    ]
    assert again == [x["input_ids"].tolist() for x, _ in batches]
    batches.set_epoch(1)
    assert again != [x["input_ids"].tolist() for x, _ in batches]
    assert len(batches) == 12 and batches.views == ["clean"]


def test_left_padding_positions_and_shards():
    texts, labels = corpus(20)
    data = from_texts(texts, word_tokenizer(), labels)
    for inputs, _ in TextBatches(data, 6, padding_side="left"):
        mask = inputs["attention_mask"]
        assert mask[:, -1].all()
        for m, pos in zip(mask, inputs["position_ids"], strict=True):
            real = int(m.sum())
            assert pos[m.bool()].tolist() == list(range(real))
    shards = [TextBatches(data, 4, shard=(r, 3)) for r in range(3)]
    rows = [[x["input_ids"][i][x["attention_mask"][i].bool()].tolist() for x, _ in s
             for i in range(len(x["input_ids"]))] for s in shards]  # fmt: skip
    assert sorted(len(r) for r in rows) == [6, 7, 7]
    every = [tuple(r) for shard in rows for r in shard]
    assert sorted(every) == sorted(tuple(data.sequence(i)) for i in range(20))
    train = [TextBatches(data, 4, train=True, shard=(r, 3)) for r in range(3)]
    assert {t.samples_per_epoch for t in train} == {7}


def test_next_token_batches():
    data = from_texts(SENTENCES, word_tokenizer())
    classes = NextTokenClasses.from_counts(count_next_tokens(data), 3)
    batches = TextBatches(data, 4, next_token=classes)
    assert batches.views == ["clean"] and torch.equal(batches.token_classes, classes.tokens)
    for inputs, y in batches:
        assert torch.equal(y, classes.labels(inputs["input_ids"], inputs["attention_mask"]))
    lm = TextBatches(data, 4)
    assert all(y is None for _, y in lm)
    from hf_tiny import tiny_model
    from nclayers.analysis import analyze

    model = tiny_model("gpt2", "causal_lm", layers=2, vocab=data.vocab_size)
    with pytest.raises(ValueError, match="needs next-token labels"):
        analyze(model, lm, 3, progress=False)


def write_splits(folder, fmt: str):
    texts, labels = corpus(30)
    pairs = list(zip(texts, labels, strict=True))
    rows = {"train": pairs[:20], "test": pairs[20:]}
    folder.mkdir()
    for split, part in rows.items():
        if fmt == "csv":
            import csv

            with open(folder / f"{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["sentence", "label"])
                w.writerows(part)
        elif fmt == "jsonl":
            lines = [json.dumps({"sentence": t, "label": y}) for t, y in part]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        elif fmt == "parquet":
            import pandas as pd

            pd.DataFrame(part, columns=["sentence", "label"]).to_parquet(
                folder / f"{split}.parquet"
            )
    return rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_load_text_from_data_files(tmp_path, fmt):
    rows = write_splits(tmp_path / fmt, fmt)
    tok = word_tokenizer()
    train = load_text(f"hf:{tmp_path / fmt}", "train", tok, text_column="sentence")
    test = load_text(
        str(tmp_path / fmt), "test", tok, text_column="sentence", classes=train.classes
    )
    assert len(train) == 20 and len(test) == 10 and train.classes == ["mid", "neg", "pos"]
    assert train.sequence(0) == tok(rows["train"][0][0])["input_ids"]
    hand = [train.classes.index(y) for _, y in rows["test"]]
    assert test.labels["clean"].tolist() == hand
    with pytest.raises(ValueError, match=r"data\.text_column='text'"):
        load_text(str(tmp_path / fmt), "train", tok)
    with pytest.raises(ValueError, match="split='validation'"):
        load_text(str(tmp_path / fmt), "validation", tok, text_column="sentence")


def test_load_text_from_saved_datasets_and_plain_text(tmp_path):
    import datasets

    texts, labels = corpus(12)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["neg", "pos", "mid"]),
        }
    )
    ids = [["neg", "pos", "mid"].index(y) for y in labels]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": texts[:8], "label": ids[:8]}, features),
        "test": datasets.Dataset.from_dict({"text": texts[8:], "label": ids[8:]}, features),
    })  # fmt: skip
    dd.save_to_disk(str(tmp_path / "saved"))
    tok = word_tokenizer()
    test = load_text(str(tmp_path / "saved"), "test", tok)
    assert test.classes == ["neg", "pos", "mid"] and test.labels["clean"].tolist() == ids[8:]
    with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\]"):
        load_text(str(tmp_path / "saved"), "validation", tok)
    # Plain text: one line per sequence, no labels; one file is the split "train".
    (tmp_path / "lines.txt").write_text("\n".join(texts) + "\n")
    lm = load_text(str(tmp_path / "lines.txt"), "train", tok, limit=5)
    assert len(lm) == 5 and lm.labels == {} and lm.sequence(4) == tok(texts[4])["input_ids"]
    held_out = load_text(str(tmp_path / "lines.txt"), "train[75%:]", tok)
    assert len(held_out) == 3
    with pytest.raises(ValueError, match="one data file is the split 'train'"):
        load_text(str(tmp_path / "lines.txt"), "test", tok)
