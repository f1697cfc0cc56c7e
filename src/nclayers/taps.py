"""Forward hooks that pool every block's output to one vector per sample.

A tap pools the block output on the device where it was computed (accumulating in
float32 even under bf16 autocast) and hands the result to a sink at once, so no feature
map outlives its batch.

Blocks of sequence models (Hugging Face layers) return N x T x D hidden states, as a
tensor, a tuple whose first entry is the hidden state, or a model-output object. Their
pools need the batch's attention mask (1 = real token, 0 = padding), which the caller
hands to the taps per batch (`Taps.set_mask`, or `run_model(model, inputs, taps)` with a
tokenised batch): "mean" averages the real tokens only, "last" takes the last real token
whatever the padding side, "cls" the model's own CLS position (see `TokenMask.cls`:
the tokenizer's cls token where the data name one, `cls_id`, else the first real
token, whatever the padding side), and "token" keeps every position as a sample (N*T x
D; the labels of padded or excluded positions are -1).

A module that runs k > 1 times in one forward (a shared or recurrent block, weight tying)
is k layers: `forward_order` finds the blocks' calls on one dry forward and returns one
`Block` per call, named `NAME#1` ... `NAME#k` (`call` 1..k), in the order their outputs
come out; the taps then hand each call's output to its own layer.
"""

from __future__ import annotations

import dataclasses
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
    mask; "cls" takes token 0 (with a tokenised batch: the position of the tokenizer's
    cls token, else the first real token; see `TokenMask.cls`);
    "last" the last real token; "token" keeps every position (N*T x C); "flat" keeps an
    N x D output as it is.

    call: 0 for a module that runs once per forward; k >= 1 for the k-th call of a module
    that runs `calls` times per forward (then `name` is `path#k`, `path` the module's name).

    seq_first: the module's hidden state is T x N x D (XLNet's layers), turned to N x T x D
    before pooling.
    """

    name: str
    module: nn.Module
    pool: str = "nchw"
    prefix_tokens: int = 0
    call: int = 0
    calls: int = 1
    seq_first: bool = False

    @property
    def path(self) -> str:
        """The module's name in `model.named_modules()` (`name` without its `#call`)."""
        return self.name.rpartition("#")[0] if self.call else self.name


class TokenMask:
    """One batch's attention mask (N x T, nonzero = real token) and what the pools derive
    from it, computed once per batch and shared by every block. `input_ids` (N x T) and
    `cls_id`, the tokenizer's cls token (None: it has none), place the "cls" pool."""

    def __init__(
        self,
        mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        cls_id: int | None = None,
    ) -> None:
        if mask.ndim != 2:
            raise NCLayersError(
                f"attention_mask: expected N x T (one row per sequence), got {tuple(mask.shape)}"
            )
        self.mask = mask
        self.input_ids = input_ids if cls_id is not None else None
        self.cls_id = cls_id
        if self.input_ids is not None and self.input_ids.shape != mask.shape:
            raise NCLayersError(
                f"input_ids of shape {tuple(self.input_ids.shape)} do not fit the attention "
                f"mask of shape {tuple(mask.shape)}; give both for the same batch"
            )
        self._weights: dict[int, torch.Tensor] = {}
        self._last: torch.Tensor | None = None
        self._first: torch.Tensor | None = None
        self._cls: torch.Tensor | None = None

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

    def first(self) -> torch.Tensor:
        """N int64: the position of each row's first real token (left or right padding)."""
        if self._first is None:
            t = self.mask.shape[1]
            # The largest (T - position) x [real] is the first real token (0 without any).
            weights = torch.arange(t, 0, -1, device=self.mask.device)
            self._first = ((self.mask != 0) * weights).argmax(1)
        return self._first

    def cls(self) -> torch.Tensor:
        """N int64: each row's CLS position, the model's own. Where the batch names the
        tokenizer's cls token (`cls_id` and `input_ids`) and a row holds it among its
        real tokens: that token, the first real one where it opens the row (BERT's
        `[CLS] ... [SEP]`), else the row's last (XLNet's `... <sep> <cls>`); a row
        without it, or a batch without a cls token, takes its first real token. Left
        and right padding give the same positions in the row's real tokens."""
        if self._cls is None:
            first = self.first()
            if self.input_ids is None:
                self._cls = first
            else:
                is_cls = (self.input_ids == self.cls_id) & (self.mask != 0)
                t = self.mask.shape[1]
                # As in `last`: the largest (position + 1) x [cls] is the last cls token.
                last_cls = (is_cls * torch.arange(1, t + 1, device=self.mask.device)).argmax(1)
                opens = is_cls.gather(1, first.unsqueeze(1)).squeeze(1)
                self._cls = torch.where(opens | ~is_cls.any(1), first, last_cls)
        return self._cls


def token_mask(inputs, cls_id: int | None = None) -> TokenMask | None:
    """The `TokenMask` of a batch's inputs: a tokenised mapping's attention mask (every
    token real where it has none but names its `input_ids` and `cls_id` is given), and
    with `cls_id` its input_ids; None for images or a mapping without either."""
    if not isinstance(inputs, Mapping):
        return None
    mask, ids = inputs.get("attention_mask"), inputs.get("input_ids")
    if mask is None and ids is not None and ids.ndim == 2 and cls_id is not None:
        mask = torch.ones_like(ids)
    return TokenMask(mask, ids, cls_id) if mask is not None else None


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
    if pool in ("cls", "last") and mask is None:
        return output[:, 0 if pool == "cls" else -1].to(f32)
    if mask is not None and mask.mask.shape != output.shape[:2]:
        raise NCLayersError(
            f"attention_mask of shape {tuple(mask.mask.shape)} does not fit a block output of "
            f"shape {tuple(output.shape)}; pool a block whose output has one row per token"
        )
    if pool in ("cls", "last"):  # the CLS / last real token, whatever the padding side
        at = mask.cls() if pool == "cls" else mask.last()
        index = at.view(-1, 1, 1).expand(-1, 1, output.shape[2])
        return output.gather(1, index).squeeze(1).to(f32)
    if mask is None:  # "tokens" / "mean" without padding
        return output[:, prefix_tokens:].mean(dim=1, dtype=f32)
    return torch.bmm(mask.weights(prefix_tokens), output.to(f32)).squeeze(1)


def pool_output(
    output,
    pool: str,
    prefix_tokens: int = 0,
    mask: TokenMask | None = None,
    seq_first: bool = False,
) -> torch.Tensor:
    """Reduce one block output to N x D float32 (N*T x D for pool "token") by `pool`;
    `mask` is the batch's attention mask for the sequence pools; `seq_first`: a 3-D
    hidden state is T x N x D."""
    output = hidden_state(output)
    if seq_first and output.ndim == 3:
        output = output.transpose(0, 1)
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


class CallHooks:
    """One forward hook per module of `blocks` that hands each call to the block of that
    call: `fn(index, args, kwargs, output)`, `index` the block's place in `blocks`. A
    module that runs `calls` times per forward counts its calls 1..calls, then from 1
    again (and from 1 after `reset()`, which starts a forward); calls no block names are
    ignored. A block of `call` 0 takes every call of its module (one per forward once
    `forward_order` has split a shared module's calls into blocks of their own)."""

    def __init__(self, blocks: Sequence[Block], fn: Callable[..., None]) -> None:
        self.fn = fn
        self._table: dict[int, dict[int, int]] = {}  # id(module) -> call -> index
        self._calls: dict[int, int] = {}  # id(module) -> its calls per forward
        modules: dict[int, nn.Module] = {}
        for i, b in enumerate(blocks):
            key = id(b.module)
            self._table.setdefault(key, {})[max(b.call, 1)] = i
            self._calls[key] = max(self._calls.get(key, 1), b.calls, b.call)
            modules[key] = b.module
        self._counts: dict[int, int] = {}
        self._handles = [
            m.register_forward_hook(self._hook(key), with_kwargs=True) for key, m in modules.items()
        ]

    def _hook(self, key: int):
        table, calls = self._table[key], self._calls[key]

        def hook(_module, args, kwargs, output):
            n = self._counts.get(key, 0) % calls + 1
            self._counts[key] = n
            index = table.get(n)
            if index is not None:
                self.fn(index, args, kwargs, output)

        return hook

    def reset(self) -> None:
        """A new forward begins: count every module's calls from 1 again."""
        self._counts.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class Taps:
    """Context manager: while active, every block's pooled output goes to `sink(index, x)`.

    >>> with Taps(blocks, sink=lambda i, x: stats[i].update(x, y)) as taps:
    ...     logits = run_model(model, inputs, taps)   # a tensor or a tokenised batch

    A tokenised batch's attention mask reaches the sequence pools through `set_mask`
    (which `run_model` calls before every batch); it holds until the next call. `cls_id`,
    the tokenizer's cls token (the data's `cls_id`; None: none), places the "cls" pool at
    that token of each batch's input_ids (`TokenMask.cls`). Each call of a shared module
    goes to its own block (`path#1`, `path#2`, ...; see `CallHooks`).
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        sink: Callable[[int, torch.Tensor], None],
        cls_id: int | None = None,
    ) -> None:
        self.blocks = list(blocks)
        self.sink = sink
        self.cls_id = cls_id
        self.mask: TokenMask | None = None
        self._hooks: CallHooks | None = None

    def set_mask(self, mask: torch.Tensor | None, input_ids: torch.Tensor | None = None) -> None:
        """The attention mask (None: every token is real) and input_ids of the batch about
        to run."""
        self.mask = token_mask({"attention_mask": mask, "input_ids": input_ids}, self.cls_id)
        if self._hooks is not None:
            self._hooks.reset()

    def _hook(self, index: int, _args, _kwargs, output) -> None:
        block = self.blocks[index]
        feats = pool_output(output, block.pool, block.prefix_tokens, self.mask, block.seq_first)
        self.sink(index, feats)

    def __enter__(self) -> Taps:
        self._hooks = CallHooks(self.blocks, self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.remove()
        self._hooks = None
        self.mask = None


def run_model(model: nn.Module, inputs, taps: Taps | None = None):
    """Call `model` on one batch's inputs: a tensor (images) as `model(x)`, a mapping (a
    tokenised batch: input_ids, attention_mask, ...) as `model(**inputs)`, handing its
    attention mask to `taps` first."""
    if isinstance(inputs, Mapping):
        if taps is not None:
            taps.set_mask(inputs.get("attention_mask"), inputs.get("input_ids"))
        return model(**inputs)
    if taps is not None:
        taps.set_mask(None)
    return model(inputs)


def output_logits(output) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a tuple's first entry, a
    mapping's "logits" (a dict, or a Hugging Face model output), or the `.logits` of
    another output object. Anything else is refused in one line."""
    if isinstance(output, Mapping):
        if "logits" not in output:
            raise NCLayersError(
                f"the model's forward returned a {type(output).__name__} with keys "
                f"{list(output)[:6]} and no 'logits'; return the logits (a tensor), a tuple "
                "whose first entry they are, or a mapping holding them under 'logits'"
            )
        output = output["logits"]
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif hasattr(output, "logits"):
        output = output.logits
    if not isinstance(output, torch.Tensor):
        raise NCLayersError(
            f"the model's forward returned a {type(output).__name__}, not logits; return a "
            "tensor, a tuple whose first entry is one, or a mapping with 'logits'"
        )
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
    block what `record(block, inputs, output)` returned for its call, `inputs` the
    positional inputs (or the `hidden_states` keyword where a layer is called with
    keywords only). Raises if a block never ran."""
    seen: list = [None] * len(blocks)
    ran = [False] * len(blocks)

    def hook(index: int, args, kwargs, output) -> None:
        if not args and "hidden_states" in kwargs:
            args = (kwargs["hidden_states"],)
        seen[index], ran[index] = record(blocks[index], args, output), True

    hooks = CallHooks(blocks, hook)
    _dry_forward(model, sample, hooks.remove)
    if not all(ran):
        raise missing_blocks_error(b.name for b, r in zip(blocks, ran, strict=True) if not r)
    return seen


def _dry_forward(model: nn.Module, sample, remove_hooks: Callable[[], None]) -> None:
    """One forward of `sample` in eval mode, then `remove_hooks()` and the model's mode back."""
    was_training = model.training
    try:
        model.eval()
        run_model(model, sample)
    finally:
        model.train(was_training)
        remove_hooks()


@torch.no_grad()
def forward_order(model: nn.Module, blocks: Sequence[Block], sample) -> list[Block]:
    """The blocks as the model runs them: one dry forward of `sample` (in eval mode)
    orders them by when their outputs come out, and a block whose module runs k > 1
    times becomes k blocks `path#1` ... `path#k`, one per call (a block that already
    names one call, `call` k, stays that call). Raises, naming them, for blocks that
    never ran and calls beyond a module's count."""
    was_training = model.training
    try:
        model.eval()
        return traced_forward(model, blocks, sample)[0]
    finally:
        model.train(was_training)


def traced_forward(
    model: nn.Module,
    blocks: Sequence[Block],
    inputs,
    pool: bool = False,
    cls_id: int | None = None,
) -> tuple[list[Block], list[torch.Tensor | None], object]:
    """One forward of `inputs` (a tensor or a tokenised mapping) as the caller set it up
    (mode, grad, autocast): (the blocks in forward order, one per call, as
    `forward_order` returns them; with `pool`, each one's pooled output, else None; the
    model's output). A measuring pass runs its first batch through this, so ordering the
    blocks costs no forward of its own. `cls_id`: the tokenizer's cls token (see `Taps`)."""
    modules = {id(b.module): b for b in blocks}  # one block per module: its pooling
    wanted = {(id(b.module), b.call) for b in blocks}
    mask = token_mask(inputs, cls_id)
    events: list[tuple[int, int, torch.Tensor | None]] = []  # in the order outputs come out
    counts: dict[int, int] = {}

    def hook_for(key: int, b: Block):
        def hook(_module, _args, output):
            n = counts[key] = counts.get(key, 0) + 1
            if (key, 0) in wanted or (key, n) in wanted:
                feats = (
                    pool_output(output, b.pool, b.prefix_tokens, mask, b.seq_first)
                    if pool
                    else None
                )
                events.append((key, n, feats))

        return hook

    handles = [b.module.register_forward_hook(hook_for(k, b)) for k, b in modules.items()]
    try:
        output = run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [b.name for b in blocks if id(b.module) not in counts]
    if missing:
        raise missing_blocks_error(missing)
    for b in blocks:
        if b.call > counts[id(b.module)]:
            n = counts[id(b.module)]
            raise NCLayersError(
                f"blocks: {b.name} names call {b.call} of {b.path}, which runs {n} time(s) "
                f"per forward; name {b.path} (every call) or one of {b.path}#1 ... {b.path}#{n}"
            )
    ordered: list[Block] = []
    for key, call, _ in events:
        b, k = modules[key], counts[key]
        if k == 1:  # runs once: the block is its module
            ordered.append(dataclasses.replace(b, name=b.path, call=0, calls=1))
        else:
            ordered.append(dataclasses.replace(b, name=f"{b.path}#{call}", call=call, calls=k))
    return ordered, [feats for *_, feats in events], output


def probe_shapes(
    model: nn.Module, blocks: Sequence[Block], sample
) -> list[tuple[tuple[int, ...], int]]:
    """Run one sample batch (a tensor or a tokenised batch) and return, per block, (raw
    output shape, pooled dim)."""
    mask = token_mask(sample)

    def record(block: Block, _inputs, out):
        raw = hidden_state(out)
        pooled = pool_output(raw, block.pool, block.prefix_tokens, mask, block.seq_first)
        return tuple(raw.shape), int(pooled.shape[1])

    return trace_blocks(model, blocks, sample, record)
