"""Forward hooks that pool every block's output to one vector per sample.

A tap pools the block output on the device where it was computed (accumulating in
float32 even under bf16 autocast) and hands the result to a sink at once, so no feature
map outlives its batch.

Blocks of sequence models (Hugging Face layers) return N x T x D hidden states, as a
tensor, a tuple whose first entry is the hidden state, or a model-output object. Their
pools need the batch's attention mask (1 = real token, 0 = padding), which the caller
hands to the taps per batch (`Taps.set_mask`, or `run_model(model, inputs, taps)` with a
tokenised batch): "mean" averages the real tokens only, "last" takes the last real token
whatever the padding side, and "token" keeps every position as a sample (N*T x D; the
labels of padded or excluded positions are -1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nclayers.errors import NCLayersError

# How a block's output is reduced to one vector per sample.
POOLS = ("nchw", "nhwc", "tokens", "mean", "cls", "last", "token", "flat")
# Pools that read a N x T x D sequence.
SEQUENCE_POOLS = ("tokens", "mean", "cls", "last", "token")


@dataclass(frozen=True)
class Block:
    """One tapped module: its name in `model.named_modules()`, the module and its pooling.

    pool: "nchw" averages a N x C x H x W map over H and W; "nhwc" a N x H x W x C map
    (timm's Swin); "tokens" and "mean" average N x T x C tokens after `prefix_tokens`
    class or register tokens, over the real tokens only when the batch has an attention
    mask; "cls" takes token 0; "last" the last real token; "token" keeps every position
    (N*T x C); "flat" keeps an N x D output as it is.
    """

    name: str
    module: nn.Module
    pool: str = "nchw"
    prefix_tokens: int = 0


class TokenMask:
    """One batch's attention mask (N x T, nonzero = real token) and what the pools derive
    from it, computed once per batch and shared by every block."""

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.ndim != 2:
            raise NCLayersError(
                f"attention_mask: expected N x T (one row per sequence), got {tuple(mask.shape)}"
            )
        self.mask = mask
        self._weights: dict[int, torch.Tensor] = {}
        self._last: torch.Tensor | None = None

    def weights(self, prefix: int) -> torch.Tensor:
        """N x 1 x T float32: 1/(real tokens) on the real tokens from `prefix` on, else 0."""
        if prefix not in self._weights:
            w = self.mask.to(torch.float32)
            if prefix:
                w = torch.cat([torch.zeros_like(w[:, :prefix]), w[:, prefix:]], dim=1)
            self._weights[prefix] = (w / w.sum(1, keepdim=True).clamp_min(1.0)).unsqueeze(1)
        return self._weights[prefix]

    def last(self) -> torch.Tensor:
        """N int64: the position of each row's last real token (left or right padding)."""
        if self._last is None:
            t = self.mask.shape[1]
            positions = torch.arange(1, t + 1, device=self.mask.device)
            # The largest (position + 1) x [real] is the last real token; a row without
            # any real token gives position 0.
            self._last = ((self.mask != 0) * positions).argmax(1)
        return self._last


def hidden_state(output) -> torch.Tensor:
    """The hidden state in a block output: the tensor itself, the first entry of a tuple
    (Hugging Face layers of some families and versions), or a model-output object's."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # a transformers ModelOutput is an ordered dict
        for key in ("hidden_states", "last_hidden_state"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"block output is a {type(output).__name__}, not a tensor")


def _pool_sequence(
    output: torch.Tensor, pool: str, prefix_tokens: int, mask: TokenMask | None
) -> torch.Tensor:
    f32 = torch.float32
    if pool == "token":
        return output.reshape(-1, output.shape[-1]).to(f32)
    if pool == "cls":
        return output[:, 0].to(f32)
    if mask is not None and mask.mask.shape != output.shape[:2]:
        raise NCLayersError(
            f"attention_mask of shape {tuple(mask.mask.shape)} does not fit a block output of "
            f"shape {tuple(output.shape)}; pool a block whose output has one row per token"
        )
    if pool == "last":
        if mask is None:
            return output[:, -1].to(f32)
        index = mask.last().view(-1, 1, 1).expand(-1, 1, output.shape[2])
        return output.gather(1, index).squeeze(1).to(f32)
    if mask is None:  # "tokens" / "mean" without padding
        return output[:, prefix_tokens:].mean(dim=1, dtype=f32)
    return torch.bmm(mask.weights(prefix_tokens), output.to(f32)).squeeze(1)


def pool_output(
    output, pool: str, prefix_tokens: int = 0, mask: TokenMask | None = None
) -> torch.Tensor:
    """Reduce one block output to N x D float32 (N*T x D for pool "token") by `pool`;
    `mask` is the batch's attention mask for the sequence pools."""
    output = hidden_state(output)
    f32 = torch.float32
    if pool in SEQUENCE_POOLS and output.ndim == 3:
        return _pool_sequence(output, pool, prefix_tokens, mask)
    if output.ndim == 2 and pool != "token":
        return output.to(f32)
    if pool == "nchw" and output.ndim == 4:
        return output.mean(dim=(2, 3), dtype=f32)
    if pool == "nhwc" and output.ndim == 4:
        return output.mean(dim=(1, 2), dtype=f32)
    if pool == "flat":
        return output.flatten(1).to(f32)
    raise NCLayersError(
        f"pool={pool!r} does not fit a block output of shape {tuple(output.shape)}; "
        f"choose one of {POOLS}"
    )


class Taps:
    """Context manager: while active, every block's pooled output goes to `sink(index, x)`.

    >>> with Taps(blocks, sink=lambda i, x: stats[i].update(x, y)) as taps:
    ...     logits = run_model(model, inputs, taps)   # a tensor or a tokenised batch

    A tokenised batch's attention mask reaches the sequence pools through `set_mask`
    (which `run_model` calls); it holds until the next call.
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        sink: Callable[[int, torch.Tensor], None],
    ) -> None:
        self.blocks = list(blocks)
        self.sink = sink
        self.mask: TokenMask | None = None
        self._handles: list = []

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """The attention mask of the batch about to run (None: every token is real)."""
        self.mask = TokenMask(mask) if mask is not None else None

    def _hook(self, index: int, block: Block):
        def hook(_module, _inputs, output):
            self.sink(index, pool_output(output, block.pool, block.prefix_tokens, self.mask))

        return hook

    def __enter__(self) -> Taps:
        for i, block in enumerate(self.blocks):
            self._handles.append(block.module.register_forward_hook(self._hook(i, block)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.mask = None


def run_model(model: nn.Module, inputs, taps: Taps | None = None):
    """Call `model` on one batch's inputs: a tensor (images) as `model(x)`, a mapping (a
    tokenised batch: input_ids, attention_mask, ...) as `model(**inputs)`, handing its
    attention mask to `taps` first."""
    if isinstance(inputs, Mapping):
        if taps is not None:
            taps.set_mask(inputs.get("attention_mask"))
        return model(**inputs)
    if taps is not None:
        taps.set_mask(None)
    return model(inputs)


def output_logits(output) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a tuple's first entry, or the
    `.logits` of a model-output object (Hugging Face)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "logits"):
        output = output.logits
    return output


def to_device(inputs, device: torch.device):
    """A batch's inputs (a tensor or a mapping of tensors) on `device`, copied without
    waiting where the copy allows it."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def batch_rows(inputs) -> int:
    """Samples in a batch's inputs (the first dimension of a tensor or of its first entry)."""
    if isinstance(inputs, Mapping):
        inputs = next(iter(inputs.values()))
    return int(inputs.shape[0])


def head(inputs, n: int):
    """The first `n` samples of a batch's inputs (a tensor or a mapping of tensors)."""
    if isinstance(inputs, Mapping):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]


def missing_blocks_error(names: Sequence[str]) -> ValueError:
    return NCLayersError(
        f"blocks {list(names)[:5]} never ran in the forward pass; name modules the model calls"
    )


@torch.no_grad()
def trace_blocks(
    model: nn.Module,
    blocks: Sequence[Block],
    sample,
    record: Callable[[Block, tuple, object], object],
) -> list:
    """Run `sample` (a tensor, or a tokenised batch as a mapping) once in eval mode; per
    block what `record(block, inputs, output)` returned, `inputs` the positional inputs
    (or the `hidden_states` keyword where a layer is called with keywords only). Raises
    if a block never ran."""
    seen: list = [None] * len(blocks)
    ran = [False] * len(blocks)

    def hook_for(index: int, block: Block):
        def hook(_module, args, kwargs, output):
            if not args and "hidden_states" in kwargs:
                args = (kwargs["hidden_states"],)
            seen[index], ran[index] = record(block, args, output), True

        return hook

    handles = [
        b.module.register_forward_hook(hook_for(i, b), with_kwargs=True)
        for i, b in enumerate(blocks)
    ]
    was_training = model.training
    try:
        model.eval()
        run_model(model, sample)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not all(ran):
        raise missing_blocks_error(b.name for b, r in zip(blocks, ran, strict=True) if not r)
    return seen


def probe_shapes(
    model: nn.Module, blocks: Sequence[Block], sample
) -> list[tuple[tuple[int, ...], int]]:
    """Run one sample batch (a tensor or a tokenised batch) and return, per block, (raw
    output shape, pooled dim)."""
    mask = sample.get("attention_mask") if isinstance(sample, Mapping) else None
    token_mask = TokenMask(mask) if mask is not None else None

    def record(block: Block, _inputs, out):
        raw = hidden_state(out)
        pooled = pool_output(raw, block.pool, block.prefix_tokens, token_mask)
        return tuple(raw.shape), int(pooled.shape[1])

    return trace_blocks(model, blocks, sample, record)
