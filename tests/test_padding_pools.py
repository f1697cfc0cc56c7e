"""Padding cannot change a measurement: every `model.pool` of a text classifier's layers
gives the same metrics one sequence at a time and in padded batches, padded on the
right or on the left."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from hf_tiny import tiny_model
from nclayers import analyze
from nclayers.data.text import TextBatches, TextData
from nclayers.models import find_blocks
from nclayers.taps import TokenMask, pool_output

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
