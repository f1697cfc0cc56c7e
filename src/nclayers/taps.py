"""Forward hooks that pool every block's output to one vector per sample.

A tap pools the block output on the device where it was computed (accumulating in
float32 even under bf16 autocast) and hands the B x D result to a sink at once, so no
feature map outlives its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nclayers.errors import NCLayersError

# How a block's output is reduced to one vector per sample.
POOLS = ("nchw", "nhwc", "tokens", "cls", "flat")


@dataclass(frozen=True)
class Block:
    """One tapped module: its name in `model.named_modules()`, the module and its pooling.

    pool: "nchw" averages a N x C x H x W map over H and W; "nhwc" a N x H x W x C map
    (timm's Swin); "tokens" averages N x T x C tokens after `prefix_tokens` class or
    register tokens; "cls" takes token 0; "flat" keeps an N x D output as it is.
    """

    name: str
    module: nn.Module
    pool: str = "nchw"
    prefix_tokens: int = 0


def pool_output(output, pool: str, prefix_tokens: int = 0) -> torch.Tensor:
    """Reduce one block output to N x D float32 according to `pool`."""
    if isinstance(output, (tuple, list)):  # some blocks return (features, extras)
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"block output is a {type(output).__name__}, not a tensor")
    f32 = torch.float32
    if output.ndim == 2:
        return output.to(f32)
    if pool == "nchw" and output.ndim == 4:
        return output.mean(dim=(2, 3), dtype=f32)
    if pool == "nhwc" and output.ndim == 4:
        return output.mean(dim=(1, 2), dtype=f32)
    if pool == "tokens" and output.ndim == 3:
        return output[:, prefix_tokens:].mean(dim=1, dtype=f32)
    if pool == "cls" and output.ndim == 3:
        return output[:, 0].to(f32)
    if pool == "flat":
        return output.flatten(1).to(f32)
    raise NCLayersError(
        f"pool={pool!r} does not fit a block output of shape {tuple(output.shape)}; "
        f"choose one of {POOLS}"
    )


class Taps:
    """Context manager: while active, every block's pooled output goes to `sink(index, x)`.

    >>> with Taps(blocks, sink=lambda i, x: stats[i].update(x, y)):
    ...     logits = model(images)
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        sink: Callable[[int, torch.Tensor], None],
    ) -> None:
        self.blocks = list(blocks)
        self.sink = sink
        self._handles: list = []

    def _hook(self, index: int, block: Block):
        def hook(_module, _inputs, output):
            self.sink(index, pool_output(output, block.pool, block.prefix_tokens))

        return hook

    def __enter__(self) -> Taps:
        for i, block in enumerate(self.blocks):
            self._handles.append(block.module.register_forward_hook(self._hook(i, block)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def missing_blocks_error(names: Sequence[str]) -> ValueError:
    return NCLayersError(
        f"blocks {list(names)[:5]} never ran in the forward pass; name modules the model calls"
    )


@torch.no_grad()
def trace_blocks(
    model: nn.Module,
    blocks: Sequence[Block],
    sample: torch.Tensor,
    record: Callable[[Block, tuple, object], object],
) -> list:
    """Run `sample` once in eval mode; per block what `record(block, inputs, output)`
    returned. Raises if a block never ran."""
    seen: list = [None] * len(blocks)
    ran = [False] * len(blocks)

    def hook_for(index: int, block: Block):
        def hook(_module, inputs, output):
            seen[index], ran[index] = record(block, inputs, output), True

        return hook

    handles = [b.module.register_forward_hook(hook_for(i, b)) for i, b in enumerate(blocks)]
    was_training = model.training
    try:
        model.eval()
        model(sample)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not all(ran):
        raise missing_blocks_error(b.name for b, r in zip(blocks, ran, strict=True) if not r)
    return seen


def probe_shapes(
    model: nn.Module, blocks: Sequence[Block], sample: torch.Tensor
) -> list[tuple[tuple[int, ...], int]]:
    """Run one sample batch and return, per block, (raw output shape, pooled dim)."""

    def record(block: Block, _inputs, out):
        raw = out[0] if isinstance(out, (tuple, list)) else out
        pooled = pool_output(raw, block.pool, block.prefix_tokens)
        return tuple(raw.shape), int(pooled.shape[1])

    return trace_blocks(model, blocks, sample, record)
