"""Padding cannot change a measurement: every `model.pool` of a text classifier's layers
gives the same metrics one sequence at a time and in padded batches, padded on the
right or on the left."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from hf_tiny import tiny_model
from nclayers import analyze
from nclayers.data.text import TextBatches, TextData, from_texts
from nclayers.models import find_blocks
from nclayers.taps import TokenMask, pool_output
from test_forward_order import numpy_nc1

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 60


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert", "sequence", layers=2, vocab=VOCAB)


def text_data(sequences: list[list[int]]) -> TextData:
    lengths = torch.tensor([len(s) for s in sequences])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
    labels = {"clean": torch.arange(len(sequences)) % 3}
    return TextData(ids, offsets, labels, ["a", "b", "c"], pad_id=0, vocab_size=VOCAB)


# Distinct sequences, so that no two classes have the same mean feature.
sequences = st.lists(
    st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=9),
    min_size=6,
    max_size=14,
    unique_by=tuple,
)
FIXTURES = [HealthCheck.function_scoped_fixture]  # the model: built once, never changed


@settings(max_examples=10, deadline=None, suppress_health_check=FIXTURES)
@given(sequences)
def test_every_pool_is_the_same_at_any_batch_size_and_padding_side(bert, seqs):
    data = text_data(seqs)
    for pool in ("mean", "cls", "last"):
        blocks = find_blocks(bert, pool=pool)
        results = {}
        for batch, side in ((1, "right"), (64, "right"), (64, "left"), (1, "left")):
            batches = TextBatches(data, batch, padding_side=side)
            table = analyze(bert, batches, 3, blocks, progress=False)
            results[batch, side] = [(r["nc1"], r["nc2"]) for r in table]
        alone = results[1, "right"]
        for key, rows in results.items():
            for (nc1, nc2), (nc1_alone, nc2_alone) in zip(rows, alone, strict=True):
                assert nc1 == pytest.approx(nc1_alone, rel=1e-5), (pool, key)
                assert nc2 == pytest.approx(nc2_alone, rel=1e-5, abs=1e-6), (pool, key)


def test_cls_takes_the_first_real_token_on_either_side():
    out = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = TokenMask(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    left = TokenMask(torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]))
    torch.testing.assert_close(pool_output(out, "cls", 0, right), out[:, 0])
    torch.testing.assert_close(
        pool_output(out, "cls", 0, left), torch.stack([out[0, 2], out[1, 1]])
    )
    torch.testing.assert_close(pool_output(out, "cls"), out[:, 0])  # no mask: token 0


def test_cls_takes_the_tokenizers_cls_token_where_it_closes_the_sequence():
    out = torch.arange(3 * 5 * 2, dtype=torch.float32).view(3, 5, 2)
    cls = 3
    # Row 0: XLNet's "w w <sep> <cls>"; row 1: "[CLS] w w" (BERT's), with a later 3 in the
    # text; row 2 holds no cls token (cut by truncation): its first real token.
    right = torch.tensor([[7, 8, 2, 3, 0], [3, 9, 3, 0, 0], [7, 8, 9, 0, 0]])
    left = torch.tensor([[0, 7, 8, 2, 3], [0, 0, 3, 9, 3], [0, 0, 7, 8, 9]])
    for ids, want in ((right, [3, 0, 0]), (left, [4, 2, 2])):
        mask = TokenMask((ids != 0).long(), ids, cls)
        assert mask.cls().tolist() == want
        torch.testing.assert_close(pool_output(out, "cls", 0, mask), out[[0, 1, 2], want])
    # Without a cls token (cls_id None) the first real token, as before.
    assert TokenMask((left != 0).long(), left, None).cls().tolist() == [1, 2, 2]


@pytest.fixture(scope="module")
def xlnet():
    from hf_tiny import TEXT, xlnet_tokenizer

    tokenizer = xlnet_tokenizer()
    model = tiny_model("xlnet", "sequence", layers=2, vocab=len(tokenizer))
    words = TEXT.split()
    gen = torch.Generator().manual_seed(0)
    texts = []
    for i in range(24):  # distinct texts of 1-7 words
        n = 1 + i % 7
        texts.append(" ".join(words[j] for j in torch.randint(len(words), (n,), generator=gen)))
    return model, tokenizer, from_texts(texts, tokenizer, [i % 3 for i in range(24)])


def xlnet_states(model, sequences: list[list[int]]) -> list[list[torch.Tensor]]:
    """Per layer, each sequence's hidden states (T x D), by hooks on forwards of one
    sequence at a time (no padding)."""
    states: list[list[torch.Tensor]] = [[] for _ in model.transformer.layer]
    hooks = [layer.register_forward_hook(
        lambda m, a, o, i=i: states[i].append(o[0][:, 0]))  # T x 1 x D
        for i, layer in enumerate(model.transformer.layer)]  # fmt: skip
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return states


def test_xlnet_cls_pools_its_cls_token_on_either_padding_side(xlnet):
    """XLNet's tokenizer appends `<sep> <cls>`: pool "cls" reads that token, as a hooked
    forward of each text alone reads it, whatever the batch size and padding side; its
    layers' hidden states are T x N x D, pooled as N x T x D ("mean" too)."""
    model, tokenizer, data = xlnet
    assert data.cls_id == tokenizer.cls_token_id == 3
    sequences = [data.sequence(i) for i in range(len(data))]
    assert all(ids[-1] == data.cls_id for ids in sequences)
    states = xlnet_states(model, sequences)
    labels = data.labels["clean"].numpy()
    by_hand = {
        "cls": [numpy_nc1(torch.stack([h[-1] for h in s]).numpy(), labels, 3) for s in states],
        "mean": [numpy_nc1(torch.stack([h.mean(0) for h in s]).numpy(), labels, 3)
                 for s in states],
    }  # fmt: skip
    for pool, want in by_hand.items():
        blocks = find_blocks(model, pool=pool)
        for batch, side in ((1, "right"), (5, "right"), (5, "left"), (64, "left")):
            table = analyze(model, TextBatches(data, batch, padding_side=side), 3, blocks,
                            progress=False)  # fmt: skip
            got = [r["nc1"] for r in table.where(view="clean")]
            assert got == pytest.approx(want, rel=1e-4), (pool, batch, side)


def test_a_sequence_cut_before_its_cls_token_is_named_at_loading(xlnet, caplog):
    _, tokenizer, _ = xlnet
    texts = ["the cat sat on the mat", "the dog"]  # 6 words + 2 specials; 2 + 2
    with caplog.at_level("WARNING", logger="nclayers.data"):
        data = from_texts(texts, tokenizer, [0, 1], max_length=5)
    assert "1 of 2 sequences lack the tokenizer's cls token (id 3)" in caplog.text
    assert data.sequence(0)[-1] != 3 and data.sequence(1)[-1] == 3
    batch = next(iter(TextBatches(data, 2, padding_side="left")))[0]
    mask = TokenMask(batch["attention_mask"], batch["input_ids"], data.cls_id)
    assert mask.cls().tolist() == [0, 4]  # the cut one: its first real token


def test_the_command_line_pools_an_xlnet_folders_cls_token(xlnet, tmp_path):
    """`nclayers analyze model.name=hf:FOLDER data.name=hf:DATA model.pool=cls`: the
    data's tokenizer (the model folder's) names the cls token, whichever padding side."""
    import csv

    from transformers import PreTrainedTokenizerFast

    from nclayers.cli import main
    from nclayers.table import Table

    model, tokenizer, data = xlnet
    model.save_pretrained(tmp_path / "xlnet")
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>", unk_token="<unk>",
        sep_token="<sep>", cls_token="<cls>",
    ).save_pretrained(tmp_path / "xlnet")  # fmt: skip
    texts = [tokenizer.decode(data.sequence(i), skip_special_tokens=True) for i in range(12)]
    labels = data.labels["clean"][:12].tolist()
    (tmp_path / "data").mkdir()
    for split in ("train", "test"):
        with open(tmp_path / "data" / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label"])
            writer.writeheader()
            writer.writerows(
                {"text": t, "label": "abc"[y]} for t, y in zip(texts, labels, strict=True)
            )
    sequences = [tokenizer(t)["input_ids"] for t in texts]
    states = xlnet_states(model, sequences)
    want = [numpy_nc1(torch.stack([h[-1] for h in s]).numpy(), np.array(labels), 3)
            for s in states]  # fmt: skip
    for side, batch in (("right", 1), ("left", 64)):
        out = tmp_path / side
        args = [f"model.name=hf:{tmp_path / 'xlnet'}", f"data.name=hf:{tmp_path / 'data'}",
                "model.pool=cls", f"data.padding_side={side}", f"analyze.batch_size={batch}",
                "device=cpu", "analyze.reference=null"]  # fmt: skip
        assert main(["analyze", *args, "--out", str(out), "-q"]) == 0
        rows = Table.from_csv(out / "layers.csv").where(split="test")
        assert [r["nc1"] for r in rows] == pytest.approx(want, rel=1e-4), side
