"""Layers are the blocks as the forward runs them: in forward order, and a module that
runs k > 1 times per forward as k layers (`NAME#1` ... `NAME#k`), each call measured on
its own, in analyze, probes, prune and `nclayers blocks`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import nclayers
from custom_models import reversed_blocks, shared_block
from nclayers.cli import main
from nclayers.errors import NCLayersError
from nclayers.models import find_blocks
from nclayers.prune import check_prunable, prunable_layers, resolve_blocks
from nclayers.taps import Taps

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_nc1(features: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Paper Eq. 4 in float64, two passes: sum over ordered class pairs of the CDNV."""
    h = features.astype(np.float64)
    means = np.stack([h[labels == c].mean(0) for c in range(k)])
    var = np.array([((h[labels == c] - means[c]) ** 2).sum(1).mean() for c in range(k)])
    return sum(
        (var[a] + var[b]) / (2 * np.sum((means[a] - means[b]) ** 2))
        for a in range(k)
        for b in range(k)
        if a != b
    )


def hidden(out) -> torch.Tensor:
    """The hidden state in a Unit's output (what the next block takes)."""
    if isinstance(out, tuple):
        return out[0]
    return out["features"] if isinstance(out, dict) else out


class Unit(nn.Module):
    """A block returning its hidden state as a tensor, a tuple (hidden, extra) or a
    mapping whose first entry is the hidden state."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        self.lin, self.kind = nn.Linear(dim, dim), kind

    def forward(self, x: torch.Tensor):
        h = torch.tanh(self.lin(x)) + 0.5 * x
        if self.kind == "tuple":
            return h, h.sum()
        if self.kind == "dict":
            return {"features": h, "aux": h.mean()}
        return h


class Program(nn.Module):
    """`blocks` run in the order `program` lists them (an index may come back: shared)."""

    def __init__(self, kinds: list[str], program: list[int], dim: int = 5, k: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Unit(dim, kind) for kind in kinds)
        self.program = program
        self.head = nn.Linear(dim, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in self.program:
            x = hidden(self.blocks[i](x))
        return self.head(x)


@st.composite
def programs(draw):
    n = draw(st.integers(2, 4))
    kinds = draw(st.lists(st.sampled_from(["tensor", "tuple", "dict"]), min_size=n, max_size=n))
    program = list(draw(st.permutations(range(n))))
    for _ in range(draw(st.integers(0, 3))):  # shared blocks: called again somewhere
        program.insert(draw(st.integers(0, len(program))), draw(st.integers(0, n - 1)))
    return kinds, program


def hooked_layers(model: Program, batches: list) -> tuple[list[str], list[np.ndarray]]:
    """Every call of every block in the order it returns, from plain forward hooks on the
    same batches: the expected layer names (NAME, or NAME#k for a block called more than
    once) and each call's outputs over the batches as float64."""
    per_batch: list[list[tuple[int, torch.Tensor]]] = []  # per batch: (block, output) per call

    def hook(i):
        def record(_m, _a, out):
            per_batch[-1].append((i, hidden(out).detach().double()))

        return record

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        for x, _ in batches:
            per_batch.append([])
            model(x)
    for h in handles:
        h.remove()
    calls = [i for i, _ in per_batch[0]]
    names, seen = [], {}
    for i in calls:
        seen[i] = seen.get(i, 0) + 1
        names.append(f"blocks.{i}" if calls.count(i) == 1 else f"blocks.{i}#{seen[i]}")
    layers = zip(*([h for _, h in batch] for batch in per_batch), strict=True)
    return names, [torch.cat(hs).numpy() for hs in layers]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.sampled_from([1, 7, 30]), st.integers(0, 2**16))
def test_each_call_of_each_block_is_a_layer_measured_as_numpy_measures_it(case, batch, seed):
    kinds, program = case
    torch.manual_seed(seed)
    model = Program(kinds, program).eval()
    x = torch.randn(30, 5)
    y = torch.arange(30) % 3
    loader = [(x[i : i + batch], y[i : i + batch]) for i in range(0, 30, batch)]
    table = nclayers.analyze(model, loader, 3, progress=False)
    names, feats = hooked_layers(model, loader)
    assert [r["block"] for r in table] == names
    assert [r["layer"] for r in table] == list(range(1, len(names) + 1))
    for row, f in zip(table, feats, strict=True):
        assert row["n"] == 30
        assert row["nc1"] == pytest.approx(numpy_nc1(f, y.numpy(), 3), rel=1e-6)


def test_blocks_lists_the_forward_order(capsys):
    """`nclayers blocks` numbers the blocks as the forward runs them, not as registered."""
    assert main(["blocks", "custom_models:reversed_blocks", "--input-size", "8"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()[2:]]
    assert [(line[0], line[1]) for line in lines] == [("1", "blocks.2"), ("2", "blocks.1"),
                                                      ("3", "blocks.0")]  # fmt: skip


def test_reversed_blocks_are_measured_in_forward_order():
    torch.manual_seed(0)
    model = reversed_blocks(3).eval()
    x, y = torch.randn(24, 3, 8, 8), torch.arange(24) % 3
    table = nclayers.analyze(model, [(x, y)], 3, progress=False)
    assert [r["block"] for r in table] == ["blocks.2", "blocks.1", "blocks.0"]
    assert [b.name for b in find_blocks(model, sample=x[:2])] == ["blocks.2", "blocks.1",
                                                                  "blocks.0"]  # fmt: skip


def test_a_shared_block_is_one_layer_per_call():
    torch.manual_seed(0)
    model = shared_block(3).eval()
    x, y = torch.randn(30, 3, 8, 8), torch.arange(30) % 3
    table = nclayers.analyze(model, [(x[:13], y[:13]), (x[13:], y[13:])], 3, progress=False)
    assert [r["block"] for r in table] == ["blocks.0#1", "blocks.0#2", "blocks.1"]
    with torch.no_grad():
        h1 = model.blocks[0](model.stem(x))
        h2 = model.blocks[0](h1)
    for row, h in zip(table, (h1, h2), strict=False):
        assert row["n"] == 30
        assert row["nc1"] == pytest.approx(numpy_nc1(h.double().mean((2, 3)).numpy(), y.numpy(), 3),
                                           rel=1e-6)  # fmt: skip
    # A call picked by name; taps given the traced blocks hand each call to its own sink.
    blocks = find_blocks(model, "blocks.0#2", sample=x[:2])
    assert [(b.name, b.path, b.call, b.calls) for b in blocks] == [("blocks.0#2", "blocks.0", 2, 2)]
    pooled = []
    with torch.no_grad(), Taps(blocks, lambda i, f: pooled.append(f)):
        model(x)
        model(x)
    assert len(pooled) == 2
    torch.testing.assert_close(pooled[0], h2.mean((2, 3)))
    with pytest.raises(NCLayersError, match="runs 2 time"):
        find_blocks(model, "blocks.0#3", sample=x[:2])


def test_probes_train_one_head_per_call():
    from nclayers.data import ArrayDataset
    from nclayers.probing.features import Backbone
    from nclayers.taps import forward_order

    torch.manual_seed(0)
    model = shared_block(3).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = {"clean": torch.arange(30) % 3}
    ds = ArrayDataset(images, labels, ["a", "b", "c"], (0.5,) * 3, (0.25,) * 3)
    settings = {"epochs": 1, "batch_size": 10, "augment": False, "lrs": [0.1]}
    result = nclayers.probe(model, ds, ds, 3, settings=settings)
    assert [r["block"] for r in result] == ["blocks.0#1", "blocks.0#2", "blocks.1"]
    # What the heads read: each call's pooled output, side by side.
    x = torch.randn(4, 3, 8, 8)
    blocks = forward_order(model, find_blocks(model), x)
    backbone = Backbone(model, blocks, amp=False)
    with backbone.taps:
        feats = backbone.features(x)
    with torch.no_grad():
        h1 = model.blocks[0](model.stem(x))
        h2 = model.blocks[0](h1)
        h3 = model.blocks[1](h2)
    torch.testing.assert_close(feats, torch.cat([h.mean((2, 3)) for h in (h1, h2, h3)], 1))


def test_prune_refuses_a_shared_block_in_one_line():
    model = shared_block(3).eval()
    x = torch.randn(2, 3, 8, 8)
    blocks = find_blocks(model, sample=x)
    assert prunable_layers(model, blocks, x) == [3]  # blocks.1 alone runs once
    layers = resolve_blocks("blocks.0#2", blocks)
    with pytest.raises(NCLayersError) as err:
        check_prunable(model, blocks, layers, x)
    message = str(err.value)
    assert "\n" not in message
    assert "blocks.0#2" in message and "every call" in message and "blocks.0#1" in message


def test_prune_experiment_refuses_blocks_out_of_forward_order():
    from nclayers.prune import prune_experiment

    model = reversed_blocks(3).eval()
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    with pytest.raises(NCLayersError, match="forward order"):
        prune_experiment(model, find_blocks(model), [1], [(x, y)], 3)
    summary, _ = prune_experiment(model, find_blocks(model, sample=x[:2]), [1], [(x, y)], 3,
                                  seeds=(0,))  # fmt: skip
    assert [r["blocks"] for r in summary if r["variant"] == "chosen"] == ["blocks.2"]
