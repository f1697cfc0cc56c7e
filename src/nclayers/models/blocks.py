"""Which modules are a model's "blocks": the units whose outputs nclayers measures.

`find_blocks(model, "auto")` returns the repeated residual or transformer blocks of
torchvision and timm models, and the encoder/decoder layers of Hugging Face transformers
(`nclayers.models.hf.layer_names`) (known block classes first, then a generic rule: the
outermost modules of the most frequent class that is repeated inside Sequential/ModuleList
containers; failing that, the conv-(BN-)activation units of a plain conv net such as
torchvision's VGG, tapped at their activation). A list of module names or
glob patterns picks modules explicitly, e.g. `["layer*.*"]` or `["features.2", "features.5"]`;
`NAME#k` picks the k-th call of a module that runs several times per forward.

Given a `sample` batch, `find_blocks` runs it once and returns the blocks in forward order
(the order their outputs come out, which numbers the layers), a module that runs k > 1
times as k blocks `NAME#1` ... `NAME#k` (see `nclayers.taps.forward_order`). Without a
sample the order is that of `model.named_modules()`, and the measuring functions
(`analyze`, `probe`) put the blocks in forward order on their first batch.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections import Counter
from collections.abc import Sequence

from torch import nn

from nclayers.errors import NCLayersError
from nclayers.models import hf
from nclayers.taps import Block, forward_order

# Block classes by name, with the layout of their outputs.
_KNOWN_BLOCKS: dict[str, str] = {
    # torchvision
    "BasicBlock": "nchw",
    "Bottleneck": "nchw",
    "InvertedResidual": "nchw",  # MobileNet (torchvision and timm)
    "MBConv": "nchw",  # torchvision EfficientNet
    "FusedMBConv": "nchw",
    "ResBottleneckBlock": "nchw",  # torchvision RegNet
    "CNBlock": "nchw",
    "EncoderBlock": "tokens",  # torchvision ViT
    "SwinTransformerBlock": "nhwc",  # timm and torchvision Swin (both N x H x W x C)
    "SwinTransformerBlockV2": "nhwc",  # torchvision Swin V2
    "SwinTransformerV2Block": "nhwc",  # timm Swin V2
    # timm
    "Block": "tokens",  # timm ViT/DeiT
    "ResidualBlock": "nchw",
    "ConvNeXtBlock": "nchw",
    "DepthwiseSeparableConv": "nchw",  # first block of timm's EfficientNet/MobileNet
    "EdgeResidual": "nchw",
    "MixerBlock": "tokens",  # timm MLP-Mixer (N x T x C, no class token)
}

_LEAF_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.ReLU,
    nn.GELU,
    nn.Dropout,
    nn.Identity,
)


# Activations that close a conv(-BN)-activation unit of a plain conv net (VGG, AlexNet).
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU)

# Attributes that mark a model working on token sequences (ViT-like).
_TOKEN_ATTRS = ("num_prefix_tokens", "cls_token", "class_token", "pos_embed")


def _pool_for(model: nn.Module, module: nn.Module) -> tuple[str, int]:
    if hf.is_hf_model(model):
        return hf.default_pool(model)
    pool = _KNOWN_BLOCKS.get(type(module).__name__, "nchw")
    prefix = 0
    if pool == "tokens" and type(module).__name__ == "Block":
        # "Block" is also the name of some convolutional blocks (timm's legacy Xception);
        # only a model that carries tokens (itself or a wrapped ViT) has token outputs.
        if not any(hasattr(m, attr) for m in model.modules() for attr in _TOKEN_ATTRS):
            pool = "nchw"
    if pool == "tokens":
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        if prefix == 0 and hasattr(model, "class_token"):  # torchvision ViT
            prefix = 1
        pool = _token_pool(model)
    return pool, prefix


def _token_pool(model: nn.Module) -> str:
    """How a token block is pooled: as the model's head pools the last block, so the last
    block measures the feature the classifier reads. An explicit `nclayers_token_pool`
    ("mean" or "cls") wins; timm's `global_pool` "token" reads the class token, "avg"
    (and others) the token mean; torchvision's ViT (`class_token`) reads the class token."""
    for m in model.modules():  # the model itself, or the ViT it wraps
        chosen = getattr(m, "nclayers_token_pool", None)
        if chosen is not None:
            return "cls" if chosen == "cls" else "tokens"
        head_pool = getattr(m, "global_pool", None)
        if isinstance(head_pool, str) and hasattr(m, "num_prefix_tokens"):
            return "cls" if head_pool == "token" else "tokens"
        if isinstance(getattr(m, "class_token", None), nn.Parameter):
            return "cls"
    return "tokens"


def _outermost(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if not any(name.startswith(parent + ".") for parent in out):
            out.append(name)
    return out


def _auto_names(model: nn.Module) -> list[str]:
    if hf.is_hf_model(model):  # transformers: the encoder/decoder layers
        names = hf.layer_names(model)
        if names:
            return names
    known = [n for n, m in model.named_modules() if n and type(m).__name__ in _KNOWN_BLOCKS]
    known = _outermost(known)
    if len(known) >= 2:
        return known
    # Generic rule: classes of non-leaf modules held at least twice by containers.
    counts: Counter[type] = Counter()
    for _, container in model.named_modules():
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            for child in container.children():
                if not isinstance(child, _LEAF_TYPES) and any(True for _ in child.children()):
                    counts[type(child)] += 1
    repeated = [cls for cls, c in counts.most_common() if c >= 2]
    if repeated:
        names = [n for n, m in model.named_modules() if n and type(m) is repeated[0]]
        return _outermost(names)
    return _conv_units(model)


def _conv_units(model: nn.Module) -> list[str]:
    """Plain conv nets (torchvision's VGG) hold no repeated block class, only flat
    Sequentials of layers; their units are the activations right after a conv or a
    batch norm (the classifier's activations follow a Linear and are left out)."""
    names: list[str] = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        for (_, before), (name, child) in itertools.pairwise(children):
            if isinstance(child, _ACTIVATIONS) and isinstance(before, (nn.Conv2d, nn.BatchNorm2d)):
                names.append(f"{prefix}.{name}" if prefix else name)
    return names if len(names) >= 2 else []


def find_blocks(
    model: nn.Module,
    spec: str | Sequence[str] = "auto",
    pool: str | None = None,
    sample=None,
) -> list[Block]:
    """Return the model's blocks; in forward order, one per call, given a `sample` batch
    (a tensor or a tokenised mapping) to run once.

    spec: "auto", or module names / glob patterns (a comma-separated string or a list);
    `NAME#k` names the k-th call of a module that runs several times.
    pool: force one pooling for every block ("nchw", "nhwc", "tokens", "mean", "cls",
    "last", "token", "flat"; see `nclayers.taps.Block`); by default each block's class
    decides: a ViT's blocks are pooled as its head pools (the class token under timm's
    global_pool="token", else the token mean), a transformers text model pools "mean"
    (its real tokens).
    """
    modules = dict(model.named_modules())
    # A registry model may carry its own block list (e.g. VGG's conv units).
    if spec == "auto" and hasattr(model, "nclayers_blocks"):
        spec = list(model.nclayers_blocks)
    if spec == "auto":
        names = _auto_names(model)
        if not names:
            raise NCLayersError(
                f"blocks='auto' found no repeated blocks in {type(model).__name__}; name the "
                "modules to tap, e.g. blocks='layer1.*,layer2.*' (see `nclayers blocks`)"
            )
    else:
        patterns = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
        names = []
        for pattern in patterns:
            pattern, call = _call_of(pattern)
            hits = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                known = ", ".join(list(n for n in modules if n)[:8])
                raise NCLayersError(
                    f"blocks: {pattern!r} matches no module of {type(model).__name__}; "
                    f"module names look like: {known}, ..."
                )
            names += [f"{n}#{call}" if call else n for n in hits if n not in names]
        if any(any(ch in p for ch in "*?[") for p in patterns):
            names = _outermost(names)  # a glob like 'layer*.*' should not tap sub-modules too
        order = {n: i for i, n in enumerate(modules)}
        names.sort(key=lambda n: (order[_call_of(n)[0]], _call_of(n)[1]))
    blocks = []
    for name in names:
        path, call = _call_of(name)
        module = modules[path]
        block_pool, prefix = _pool_for(model, module)
        if pool is not None:
            block_pool = pool
        seq_first = hf.is_hf_model(model) and hf.sequence_first(model)
        blocks.append(Block(name, module, block_pool, prefix, call, seq_first=seq_first))
    return forward_order(model, blocks, sample) if sample is not None else blocks


def resolve_blocks(model: nn.Module, blocks, verb: str = "measure") -> list[Block]:
    """`blocks` as given to a measuring function: Blocks as they are, or a spec (a string,
    or a list of module names) for `find_blocks`; refuses an empty list."""
    if isinstance(blocks, str) or (
        isinstance(blocks, Sequence) and blocks and not isinstance(blocks[0], Block)
    ):
        blocks = find_blocks(model, blocks)
    blocks = list(blocks)
    if not blocks:
        raise NCLayersError(f"blocks: no block to {verb}; see `nclayers blocks MODEL`")
    return blocks


def _call_of(name: str) -> tuple[str, int]:
    """('blocks.0', 2) for 'blocks.0#2' (the module's second call), (name, 0) otherwise."""
    path, sep, call = name.rpartition("#")
    if not sep:
        return name, 0
    if not call.isdigit() or int(call) < 1:
        raise NCLayersError(
            f"blocks: {name!r}: after '#' comes the call number (1, 2, ...), e.g. {path}#1"
        )
    return path, int(call)
