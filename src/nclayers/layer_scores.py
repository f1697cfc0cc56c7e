"""Which layers can go: similarity scores of every layer from one pass, and n layers
chosen by each criterion.

Scores, from forward hooks on the blocks (each block's input hidden state and its
output, N x T x D, the attention mask of the batch marking the real tokens):

- Block Influence (ShortGPT, Men et al. 2024): BI_l = 1 - mean over the real tokens of
  cos(x_l, y_l), x_l the input and y_l the output of layer l. Low BI: the layer barely
  turns its input.
- Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers", Eq. 7): d(l, n) = arccos(cos(x_l, y_{l+n-1})) / pi between the input of layer
  l and the output of layer l+n-1 (the input of layer l+n), at each sequence's last real
  token (the paper's choice, `position="last"`), averaged over the sequences;
  `position="mean"` averages it over every real token instead. Every (l, n) comes from
  the same pass: `angular[l-1, m-1]` holds the distance from the input of layer l to
  the output of layer m >= l.

Choices of n layers (1-based, sorted), `choose_layers(criterion, n, ...)`:
"block_influence" the n lowest BI; "angular" the n consecutive layers l*..l*+n-1 with
l* = argmin_l d(l, n) (Gromov's rule); "plateau" the NC rule of `nclayers.equality`
(the plateau blocks by the least NC1 enhancement first, then the other blocks by the
same order); "last" the last n; "random" n drawn with a seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nclayers.errors import NCLayersError
from nclayers.models.blocks import find_blocks
from nclayers.runtime import all_sum, autocast
from nclayers.runtime import progress as progress_bar
from nclayers.table import Table
from nclayers.taps import (
    Block,
    CallHooks,
    TokenMask,
    batch_rows,
    hidden_state,
    run_model,
    to_device,
)

CRITERIA = ("plateau", "block_influence", "angular", "last", "random")
POSITIONS = ("last", "mean")


@dataclass
class LayerScores:
    """The scores of one pass: `block_influence[l-1]` per layer, `angular` L x L (NaN
    below the diagonal), the position rule, and the sequences and tokens counted."""

    blocks: list[str]
    block_influence: list[float]
    angular: torch.Tensor
    position: str
    sequences: int
    tokens: int

    def angular_distance(self, n: int) -> list[float]:
        """d(l, n) for l = 1 .. L-n+1: from the input of layer l to the output of l+n-1."""
        layers = len(self.blocks)
        if not 1 <= n <= layers:
            raise NCLayersError(f"n={n}: choose 1..{layers} consecutive layers")
        return [float(self.angular[l, l + n - 1]) for l in range(layers - n + 1)]

    def table(self, n: int = 1) -> Table:
        """One row per layer: layer, block, block_influence, angular (d(l, n))."""
        ang = self.angular_distance(n)
        return Table(
            {"layer": i + 1, "block": b, "block_influence": self.block_influence[i],
             "angular": ang[i] if i < len(ang) else None, "angular_n": n}
            for i, b in enumerate(self.blocks)
        )  # fmt: skip


class _Scorer:
    """Per-batch hooks: the cosine sums of BI, and each layer's input and output at the
    scored positions, normalised, for the angular distances after the forward."""

    def __init__(self, blocks: Sequence[Block], position: str, device: torch.device) -> None:
        self.blocks, self.position, self.device = list(blocks), position, device
        n = len(self.blocks)
        f64 = dict(dtype=torch.float64, device=device)
        self.bi_sum, self.bi_count = torch.zeros(n, **f64), torch.zeros(n, **f64)
        self.ang_sum, self.ang_count = torch.zeros(n, n, **f64), torch.zeros((), **f64)
        self.mask: TokenMask | None = None
        self.weight: torch.Tensor | None = None  # N x T float64, 1 on real tokens: per batch
        self.ins: list[torch.Tensor | None] = [None] * n
        self.outs: list[torch.Tensor | None] = [None] * n

    def record(self, index: int, args, kwargs, output) -> None:
        """One layer's call (a `CallHooks` hook): its input and output hidden states."""
        x = args[0] if args else kwargs.get("hidden_states")
        y = hidden_state(output)
        if self.blocks[index].seq_first and isinstance(x, torch.Tensor) and y.ndim == 3:
            x, y = x.transpose(0, 1), y.transpose(0, 1)  # T x N x D (XLNet) -> N x T x D
        if not isinstance(x, torch.Tensor) or x.shape != y.shape or y.ndim != 3:
            raise NCLayersError(
                f"block {self.blocks[index].name}: its input and output hidden states "
                "must be N x T x D of one shape to be compared; score sequence layers"
            )
        x, y = x.float(), y.float()
        weight = self._weight(y)
        self.bi_sum[index] += (torch.cosine_similarity(x, y, dim=-1) * weight).sum()
        self.bi_count[index] += weight.sum()
        self.ins[index], self.outs[index] = self._at(x), self._at(y)

    def _weight(self, y: torch.Tensor) -> torch.Tensor:
        """The batch's token weights, made by its first block and shared by the others."""
        if self.weight is None:
            self.weight = (
                torch.ones(y.shape[:2], dtype=torch.float64, device=y.device)
                if self.mask is None
                else (self.mask.mask != 0).to(torch.float64)
            )
        return self.weight

    def _at(self, h: torch.Tensor) -> torch.Tensor:
        """Unit vectors at the scored positions: N x 1 x D (last) or N x T x D (mean)."""
        if self.position == "last":
            if self.mask is None:
                h = h[:, -1:]
            else:
                index = self.mask.last().view(-1, 1, 1).expand(-1, 1, h.shape[2])
                h = h.gather(1, index)
        return torch.nn.functional.normalize(h, dim=-1)

    def finish_batch(self) -> None:
        """Angles between every input and every later output of this batch."""
        u, v = torch.stack(self.ins), torch.stack(self.outs)  # L x N x T' x D
        cos = torch.einsum("lntd,mntd->lmnt", u, v).clamp(-1.0, 1.0)
        angle = torch.arccos(cos).double() / math.pi
        if self.position == "last":  # one position per sequence
            weight = torch.ones(angle.shape[2:], dtype=torch.float64, device=angle.device)
        else:
            weight = self.weight
        self.ang_sum += (angle * weight).sum((2, 3))
        self.ang_count += weight.sum()
        self.weight = None
        self.ins = [None] * len(self.blocks)
        self.outs = [None] * len(self.blocks)


@torch.no_grad()
def layer_scores(
    model: nn.Module,
    batches: Iterable,
    blocks: str | Sequence[str] | Sequence[Block] = "auto",
    *,
    position: str = "last",
    amp: bool = False,
    progress: bool = False,
) -> LayerScores:
    """Block Influence and the angular distances of every layer (see the module doc) in
    one pass over `batches` ((inputs, labels) pairs or inputs; labels are ignored)."""
    if position not in POSITIONS:
        raise NCLayersError(f"position={position!r}: choose one of {POSITIONS}")
    if isinstance(blocks, str) or (blocks and not isinstance(blocks[0], Block)):
        blocks = find_blocks(model, blocks)
    blocks = list(blocks)
    if not blocks:
        raise NCLayersError("blocks: no layer to score")
    device = next(model.parameters()).device
    scorer = _Scorer(blocks, position, device)
    hooks = CallHooks(blocks, scorer.record)  # a shared module's calls are separate layers
    was_training, sequences = model.training, 0
    model.eval()
    try:
        for batch in progress_bar(batches, progress, "layer scores"):
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            inputs = to_device(inputs, device)
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            scorer.mask = TokenMask(mask) if mask is not None else None
            hooks.reset()
            with autocast(device, amp):
                run_model(model, inputs)
            if any(x is None for x in scorer.ins):
                raise NCLayersError(f"blocks: {[b.name for b in blocks]} did not all run")
            scorer.finish_batch()
            sequences += batch_rows(inputs)
    finally:
        model.train(was_training)
        hooks.remove()
    return _result(scorer, blocks, position, sequences)


def _result(scorer: _Scorer, blocks: list[Block], position: str, sequences: int) -> LayerScores:
    sums = torch.cat([scorer.bi_sum, scorer.bi_count, scorer.ang_sum.flatten(),
                      scorer.ang_count.view(1)])  # fmt: skip
    n = len(blocks)
    sums = all_sum(sums)
    bi_sum, bi_count = sums[:n], sums[n : 2 * n]
    ang = sums[2 * n : 2 * n + n * n].view(n, n) / sums[-1].clamp_min(1.0)
    upper = torch.ones(n, n, dtype=torch.bool, device=ang.device).triu()
    ang = torch.where(upper, ang, float("nan")).cpu()
    bi = (1.0 - bi_sum / bi_count.clamp_min(1.0)).tolist()
    total = all_sum(torch.tensor([sequences], dtype=torch.float64, device=sums.device))
    return LayerScores([b.name for b in blocks], bi, ang, position, int(total.item()),
                       int(bi_count[0].item()))  # fmt: skip


# ----------------------------------------------------------------------------- choices
def _candidates(candidates: Sequence[int] | None, layers: int) -> list[int]:
    out = sorted(set(candidates)) if candidates is not None else list(range(1, layers + 1))
    bad = [c for c in out if not 1 <= c <= layers]
    if bad:
        raise NCLayersError(f"candidates: {bad} are not layers 1..{layers}")
    return out


def plateau_order(nc1: Sequence[float], fraction: float = 0.5, min_run: int = 2) -> list[int]:
    """Layers (1-based) in the order the NC rule removes them: the plateau blocks of
    `equality.find_plateau` first, then the others; within each, by the least NC1
    enhancement e_l = log(NC1_(l-1)/NC1_l) first. Layer 1 (no enhancement) comes last."""
    from nclayers.equality import enhancement, find_plateau

    rows = enhancement([{"layer": i + 1, "nc1": v} for i, v in enumerate(nc1)])
    e = {r["layer"]: r["e_nc1"] for r in rows}
    layers = sorted(e)
    plateau = set(find_plateau(layers, [e[l] for l in layers], fraction, min_run).layers)

    def key(layer: int) -> tuple:
        return (layer not in plateau, e[layer] is None, e[layer] or 0.0, layer)

    return sorted(layers, key=key)


def choose_layers(
    criterion: str,
    n: int,
    *,
    scores: LayerScores | None = None,
    nc1: Sequence[float] | None = None,
    layers: int | None = None,
    candidates: Sequence[int] | None = None,
    seed: int = 0,
    fraction: float = 0.5,
    min_run: int = 2,
) -> list[int]:
    """The n layers (1-based, sorted) `criterion` removes (see the module doc).

    scores: for "block_influence" and "angular"; nc1: NC1 per layer for "plateau"
    (e.g. the clean test view of `analyze`); layers: the layer count where neither is
    given; candidates: the layers that may go (default all); fraction, min_run: the
    plateau rule's settings (equality.plateau_fraction, equality.plateau_min_run).
    """
    if criterion not in CRITERIA:
        raise NCLayersError(f"criterion={criterion!r}: choose one of {list(CRITERIA)}")
    total = len(scores.blocks) if scores else len(nc1) if nc1 is not None else layers
    if total is None:
        raise NCLayersError(f"criterion={criterion!r}: give scores, nc1 or layers")
    pool = _candidates(candidates, total)
    if not 0 <= n <= len(pool):
        raise NCLayersError(f"n={n}: choose 0..{len(pool)} of the candidate layers")
    if criterion in ("block_influence", "angular") and scores is None:
        raise NCLayersError(f"criterion={criterion!r} needs the layer scores (layer_scores)")
    if criterion == "plateau" and nc1 is None:
        raise NCLayersError("criterion='plateau' needs NC1 per layer (from analyze)")
    if criterion == "last":
        return pool[len(pool) - n :]
    if criterion == "random":
        return sorted(random.Random(seed).sample(pool, n))
    if criterion == "block_influence":
        bi = scores.block_influence
        return sorted(sorted(pool, key=lambda l: (bi[l - 1], l))[:n])
    if criterion == "angular":
        return _angular_choice(scores, n, pool)
    order = [l for l in plateau_order(nc1, fraction, min_run) if l in pool]
    return sorted(order[:n])


def _angular_choice(scores: LayerScores, n: int, pool: list[int]) -> list[int]:
    if n == 0:
        return []
    allowed = set(pool)
    d = scores.angular_distance(n)
    starts = [l for l in range(1, len(d) + 1) if all(m in allowed for m in range(l, l + n))]
    if not starts:
        raise NCLayersError(
            f"n={n}: no run of {n} consecutive candidate layers; the angular rule removes "
            "consecutive layers"
        )
    best = min(starts, key=lambda l: (d[l - 1], l))
    return list(range(best, best + n))


__all__ = ["CRITERIA", "LayerScores", "choose_layers", "layer_scores", "plateau_order"]
