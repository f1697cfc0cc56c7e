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
    raise ValueError(
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


@torch.no_grad()
def probe_shapes(
    model: nn.Module, blocks: Sequence[Block], sample: torch.Tensor
) -> list[tuple[tuple[int, ...], int]]:
    """Run one sample batch and return, per block, (raw output shape, pooled dim)."""
    shapes: list = [None] * len(blocks)

    def record(block_index: int, block: Block):
        def hook(_m, _i, out):
            raw = out[0] if isinstance(out, (tuple, list)) else out
            pooled = pool_output(raw, block.pool, block.prefix_tokens)
            shapes[block_index] = (tuple(raw.shape), int(pooled.shape[1]))

        return hook

    handles = [b.module.register_forward_hook(record(i, b)) for i, b in enumerate(blocks)]
    try:
        was_training = model.training
        model.eval()
        model(sample)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    missing = [blocks[i].name for i, s in enumerate(shapes) if s is None]
    if missing:
        raise ValueError(
            f"blocks {missing[:5]} never ran in the forward pass; name modules the model calls"
        )
    return shapes
