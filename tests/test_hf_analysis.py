"""The one-pass analysis on transformers models: masked pools, padded batches, next-token
classes, against features computed independently (per-sequence forwards without
padding, forward hooks, output_hidden_states) and measured by nclayers.metrics."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import padded, tiny_model
from nclayers import metrics
from nclayers.analysis import AnalysisResult, analyze
from nclayers.models import find_blocks
from nclayers.table import Table
from nclayers.taps import TokenMask, pool_output

pytestmark = pytest.mark.usefixtures("one_thread")


def random_sequences(n: int, seed: int, vocab: int = 100, low: int = 3, high: int = 9):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lengths]


def test_masked_pools_equal_hand_computation():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(4, 6, 5, generator=gen)
    lengths = [6, 3, 1, 4]
    for side in ("right", "left"):
        _, mask = padded([[1] * k for k in lengths], side)
        tm = TokenMask(mask)
        mean, last = pool_output(out, "mean", 0, tm), pool_output(out, "last", 0, tm)
        for i, k in enumerate(lengths):
            real = range(0, k) if side == "right" else range(6 - k, 6)
            hand = sum(out[i, t] for t in real) / k
            torch.testing.assert_close(mean[i], hand)
            torch.testing.assert_close(last[i], out[i, max(real)])
    # A tuple output (older transformers layers), a prefix token, every position.
    torch.testing.assert_close(pool_output((out, None), "mean", 1), out[:, 1:].mean(1))
    torch.testing.assert_close(pool_output(out, "last"), out[:, -1])
    torch.testing.assert_close(pool_output(out, "token"), out.reshape(24, 5))
    bf = pool_output(out.bfloat16(), "mean", 0, TokenMask(mask))
    assert bf.dtype == torch.float32
    with pytest.raises(ValueError, match="does not fit a block output"):
        pool_output(out[:, :5], "mean", 0, TokenMask(mask))


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert", "sequence", layers=3, vocab=100)


def text_batches(sequences, labels, bs, side="right"):
    out = []
    for i in range(0, len(sequences), bs):
        ids, mask = padded(sequences[i : i + bs], side)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if side == "left":  # the positions each token has without padding
            inputs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
        out.append((inputs, labels[i : i + bs]))
    return out


@torch.no_grad()
def test_padded_classifier_equals_unpadded_forwards(bert):
    """Mean-pooled layer outputs of padded batches = each sequence alone (no padding),
    its layer outputs from output_hidden_states (a BERT layer's own output)."""
    seqs = random_sequences(36, seed=1)
    labels = torch.arange(36) % 3
    table = analyze(bert, text_batches(seqs, labels, 8), 3, progress=False)
    assert isinstance(table, AnalysisResult) and len(table) == 3
    per_layer = [[] for _ in range(3)]
    logits = []
    for s in seqs:
        out = bert(input_ids=torch.tensor([s]), output_hidden_states=True)
        logits.append(out.logits[0])
        for layer in range(3):
            per_layer[layer].append(out.hidden_states[layer + 1][0].double().mean(0))
    for row, feats in zip(table, per_layer, strict=True):
        f = torch.stack(feats).numpy()
        assert row["n"] == 36 and row["dim"] == 32
        assert row["nc1"] == pytest.approx(metrics.nc1(f, labels.numpy()), rel=1e-4)
        assert row["nc2"] == pytest.approx(metrics.nc2(f, labels.numpy()), rel=1e-4)
    expected = (torch.stack(logits).argmax(1) == labels).double().mean().item()
    assert table.accuracy == {"clean": pytest.approx(expected)}
    assert table.samples == 36 and table.split == "test" and table.seconds > 0
    assert [list(s) for s in table.stats] == [["clean"]] * 3
    assert type(table.where(layer=2)) is Table


@torch.no_grad()
def test_last_and_cls_pools_with_left_padding(bert):
    seqs = random_sequences(30, seed=2)
    labels = torch.arange(30) % 3
    for pool, pick in (("last", -1), ("cls", 0)):
        blocks = find_blocks(bert, pool=pool)
        side = "left" if pool == "last" else "right"
        table = analyze(bert, text_batches(seqs, labels, 7, side), 3, blocks, progress=False)
        feats = [[] for _ in range(3)]
        for s in seqs:  # alone: no padding, the last token is the last position
            hs = bert(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states
            for layer in range(3):
                feats[layer].append(hs[layer + 1][0, pick].double())
        for row, f in zip(table, feats, strict=True):
            f = torch.stack(f).numpy()
            assert row["nc1"] == pytest.approx(metrics.nc1(f, labels.numpy()), rel=1e-4)


def hand_next_token(ids, mask, classes):
    """Labels by hand: the class of the next real token, -1 elsewhere."""
    cls = {t: k for k, t in enumerate(classes)}
    b, t = ids.shape
    out = torch.full((b, t), -1, dtype=torch.int64)
    for i in range(b):
        for j in range(t - 1):
            if mask[i, j] and mask[i, j + 1] and int(ids[i, j + 1]) in cls:
                out[i, j] = cls[int(ids[i, j + 1])]
    return out


@torch.no_grad()
def test_next_token_analysis_equals_forward_hooks():
    """Token-level NC of a causal LM: every kept position of every layer, from hooks of
    our own on the layers; the model's accuracy from its logits, counted by hand."""
    model = tiny_model("llama", "causal_lm", layers=3, vocab=12)
    seqs = random_sequences(24, seed=3, vocab=12, low=4, high=10)
    classes = [3, 5, 7, 9]  # the class tokens, as a top-K would give them
    data = []
    for i in range(0, 24, 6):
        ids, mask = padded(seqs[i : i + 6], "right")
        labels = hand_next_token(ids, mask, classes)
        data.append(({"input_ids": ids, "attention_mask": mask}, labels))
    blocks = find_blocks(model, pool="token")
    table = analyze(model, data, 4, blocks, token_classes=torch.tensor(classes), progress=False)

    layers = list(model.model.layers)
    captured = {}
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o))
             for i, m in enumerate(layers)]  # fmt: skip
    feats, labels, hits = [[] for _ in layers], [], 0
    try:
        for inputs, y in data:
            logits = model(**inputs).logits
            for b, t in (y >= 0).nonzero().tolist():
                labels.append(int(y[b, t]))
                hits += int(logits[b, t].argmax()) == classes[int(y[b, t])]
                for i in range(len(layers)):
                    out = captured[i][0] if isinstance(captured[i], tuple) else captured[i]
                    feats[i].append(out[b, t].double())
    finally:
        for h in hooks:
            h.remove()
    y = torch.tensor(labels).numpy()
    for row, f in zip(table, feats, strict=True):
        f = torch.stack(f).numpy()
        assert row["n"] == len(labels)
        assert row["nc1"] == pytest.approx(metrics.nc1(f, y), rel=1e-6)
        assert row["nc2"] == pytest.approx(metrics.nc2(f, y), rel=1e-6)
    assert table.accuracy["clean"] == pytest.approx(hits / len(labels))
    assert table.samples == 24


def test_one_mapping_per_batch_and_reference(bert):
    """{"input_ids", "attention_mask", "labels"} batches; NCC from a reference pass."""
    seqs = random_sequences(30, seed=4)
    labels = torch.arange(30) % 3
    pairs = text_batches(seqs, labels, 10)
    mapping = [dict(x, labels=y) for x, y in pairs]
    a = analyze(bert, pairs, 3, reference=pairs, progress=False)
    b = analyze(bert, mapping, 3, reference=analyze(bert, mapping, 3, progress=False),
                progress=False)  # fmt: skip
    for ra, rb in zip(a, b, strict=True):
        assert ra["nc1"] == pytest.approx(rb["nc1"], rel=1e-9)
        assert ra["ncc_acc"] == rb["ncc_acc"] and ra["ncc_acc"] is not None
    with pytest.raises(ValueError, match="holds no class statistics"):
        analyze(bert, pairs, 3, reference=Table(list(a)), progress=False)


def test_text_batches_and_analysis_never_read_the_device():
    """Between two batches nothing of ours calls aten._local_scalar_dense: not the
    batches (padding, next-token labels), not the masked pools, not the statistics.
    (transformers models read their attention mask once per batch while building their
    attention mask, e.g. to skip it when nothing is padded: those reads are the model's,
    the same in plain inference.)"""
    from hf_tiny import TEXT, word_tokenizer
    from nclayers.data.text import NextTokenClasses, TextBatches, count_next_tokens, from_texts
    from test_opcount import SYNC, count

    sentences = [s.strip() + " ." for s in TEXT.split(" . ") if s.strip(" .")] * 3
    data = from_texts(sentences, word_tokenizer(), [i % 3 for i in range(len(sentences))])
    classes = NextTokenClasses.from_counts(count_next_tokens(data), 4)
    lm = tiny_model("llama", "causal_lm", layers=2, vocab=data.vocab_size)
    cls = tiny_model("bert", "sequence", layers=2, vocab=data.vocab_size)
    cases = [
        (lm, TextBatches(data, 4, next_token=classes, padding_side="left"), 4, "token"),
        (cls, TextBatches(data, 4), 3, "mean"),
        (cls, TextBatches(data, 4, padding_side="left"), 3, "last"),
    ]
    for model, batches, k, pool in cases:
        blocks = find_blocks(model, pool=pool)
        ops = count(lambda b, m=model, k=k, bl=blocks: analyze(m, b, k, bl, progress=False),
                    batches)  # fmt: skip
        plain = count(lambda b, m=model: [m(**x) for x, _ in b], batches)
        assert ops[SYNC] == plain[SYNC], pool


def test_outputs_that_are_not_the_labels_classes_give_no_accuracy(bert):
    """A sequence classifier measured per token: its N x K logits cannot be read as
    N x T labels; the statistics are measured, the model's accuracy is NaN."""
    import math

    seqs = random_sequences(12, seed=5)
    data = []
    for i in (0, 6):
        ids, mask = padded(seqs[i : i + 6])
        labels = torch.where(mask.bool(), torch.arange(ids.shape[1]) % 3, -1)
        data.append(({"input_ids": ids, "attention_mask": mask}, labels))
    table = analyze(bert, data, 3, find_blocks(bert, pool="token"), progress=False)
    assert table[0]["n"] == sum(map(len, seqs)) and math.isnan(table.accuracy["clean"])
