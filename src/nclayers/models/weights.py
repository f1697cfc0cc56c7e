"""Load weights into a model from a local checkpoint file.

Formats read (always with `torch.load(..., weights_only=True)`, or safetensors):
- nclayers' own checkpoints (the state_dict under "model"), plain state_dicts, and the
  usual wrappers ("state_dict", "model_state_dict", "module");
- timm and torchvision state_dicts, as they are, into a model of the same architecture
  (nclayers' Swin and ViT use timm's module names, its CIFAR ResNets torchvision's);
- mmpretrain (and mmcls) checkpoints, `{"state_dict": {"backbone.…", "head.…"},
  "meta": …}`: ResNet keys map to torchvision's names, VGG keys (ConvModule units
  `features.J.conv/bn`, the classifier inside the backbone) to torchvision's VGG-BN, Swin
  keys to timm's (blocks, patch merging with its channel order, final norm, head), ViT
  keys (`layers.I.ln1/attn/ffn`, `ln1`, `head.layers.head`) to timm's.

Pretrained ImageNet weights come from files the user downloads once: mmpretrain's model
zoo (the paper's weights), torchvision (`ResNet50_Weights.IMAGENET1K_V2.url`, ...) or timm
(the Hugging Face hub); `model.checkpoint=FILE` loads them. Nothing is downloaded here.

Whatever does not match after that raises a ValueError naming the keys and shapes.
`skip_head=True` (`model.skip_head=true`) loads a checkpoint without its classifier (the
model's `head_keys`), `skip` (`model.skip='PATTERN,...'`) without any keys it names: the
model keeps its own, e.g. an ImageNet backbone with a head for CIFAR's 10 classes.
"""

from __future__ import annotations

import fnmatch
import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from nclayers.errors import NCLayersError

_WRAPPERS = ("model", "state_dict", "model_state_dict", "module")


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The model's state_dict inside a checkpoint object (nclayers' own or a plain one)."""
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], dict):
                return extract_state_dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise NCLayersError(
        f"checkpoint holds no state_dict (expected tensors at the top level or under one of "
        f"{list(_WRAPPERS)}; found {keys})"
    )


def _strip_prefixes(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    # DDP's 'module.' and torch.compile's '_orig_mod.' prefixes carry no meaning here.
    for prefix in ("module.", "_orig_mod."):
        if (
            state
            and all(k.startswith(prefix) for k in state)
            and not any(k.startswith(prefix) for k in own)
        ):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------- mmpretrain
def is_mmpretrain(state: dict[str, torch.Tensor]) -> bool:
    """An mmpretrain/mmcls classifier: every weight under backbone., neck. or head."""
    heads = ("backbone.", "neck.", "head.", "data_preprocessor.")
    return any(k.startswith("backbone.") for k in state) and all(k.startswith(heads) for k in state)


def _merge_order_to_timm(t: torch.Tensor) -> torch.Tensor:
    """Patch-merging channels from mmcv's order to timm's (the original Swin's).

    mmcv's PatchMerging samples 2x2 neighbourhoods with nn.Unfold, so channel c of the
    neighbour (dh, dw) sits at c*4 + dh*2 + dw; timm concatenates the neighbours
    (0,0), (1,0), (0,1), (1,1), each C wide. The last dim is the 4C one (norm weight and
    bias, or the reduction's input).
    """
    lead, c4 = t.shape[:-1], t.shape[-1]
    t = t.reshape(*lead, c4 // 4, 4).transpose(-1, -2)  # (..., dh*2+dw, c)
    return t[..., [0, 2, 1, 3], :].reshape(*lead, c4)


_SWIN_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\."), r"layers.\1.blocks.\2.attn."),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\."),
        r"layers.\1.blocks.\2.mlp.fc1.",
    ),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\."),
        r"layers.\1.blocks.\2.mlp.fc2.",
    ),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(norm1|norm2)\."), r"layers.\1.blocks.\2.\3."),
]
_SWIN_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample\.(norm|reduction)\.(\w+)$")
_SWIN_STAGE = re.compile(r"^backbone\.stages\.(\d+)\.")


def _swin_from_mmpretrain(
    key: str, value: torch.Tensor, last_stage: int
) -> tuple[str, torch.Tensor] | None:
    """One mmpretrain Swin backbone key (prefix removed) as timm's; None drops it."""
    if key.endswith(("relative_position_index", "attn_mask")):
        return None  # buffers timm rebuilds itself (its index is the same one)
    if m := _SWIN_DOWNSAMPLE.match(key):
        # mmpretrain merges patches at the end of stage i, timm at the start of stage i+1.
        stage, part, name = int(m[1]), m[2], m[3]
        return f"layers.{stage + 1}.downsample.{part}.{name}", _merge_order_to_timm(value)
    for pattern, repl in _SWIN_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key), value
    # The last stage's output norm: norm3 in mmpretrain, norm in old mmcls. Norms of other
    # stages (more out_indices) have no timm counterpart and stay unmatched.
    for prefix in (f"norm{last_stage}.", "norm."):
        if key.startswith(prefix):
            return "norm." + key[len(prefix) :], value
    return key, value


_VIT_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."),
    (re.compile(r"^layers\.(\d+)\.ln1\."), r"blocks.\1.norm1."),
    (re.compile(r"^layers\.(\d+)\.ln2\."), r"blocks.\1.norm2."),
    (re.compile(r"^layers\.(\d+)\.attn\.(qkv|proj)\."), r"blocks.\1.attn.\2."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.0\.0\."), r"blocks.\1.mlp.fc1."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.1\."), r"blocks.\1.mlp.fc2."),
    (re.compile(r"^ln1\."), "norm."),  # the final norm (final_norm=True)
]
_VIT_MARK = re.compile(r"^backbone\.layers\.\d+\.ln1\.")
_VGG_UNIT = re.compile(r"^backbone\.features\.(\d+)\.(conv|bn)\.(\w+)$")


def _vit_from_mmpretrain(key: str) -> str:
    """One mmpretrain ViT backbone key (prefix removed) as timm's (cls_token and pos_embed
    keep their names)."""
    for pattern, repl in _VIT_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def _vgg_units(state: dict, own: set[str]) -> dict[tuple[int, str], str]:
    """(mmpretrain unit J, "conv" | "bn") -> torchvision's `features.I`: the k-th ConvModule
    of the checkpoint is the k-th Conv2d of the model (and its batch norm the k-th one).
    The model's kinds show in its keys: a batch norm has running statistics."""
    mm = sorted({int(m[1]) for k in state if (m := _VGG_UNIT.match(k))})
    index = sorted({int(k.split(".")[1]) for k in own if re.match(r"^features\.\d+\.", k)})
    bns = [i for i in index if f"features.{i}.running_mean" in own]
    convs = [i for i in index if i not in bns]
    names: dict[tuple[int, str], str] = {}
    for k, unit in enumerate(mm):
        if k < len(convs):
            names[unit, "conv"] = f"features.{convs[k]}"
        if k < len(bns):
            names[unit, "bn"] = f"features.{bns[k]}"
    return names


_NORM_AS_BN = re.compile(r"(^|\.)norm(\d)\.")


def _mm_kind(state: dict[str, torch.Tensor]) -> str:
    if any(_SWIN_STAGE.match(k) for k in state):
        return "Swin"
    if any(_VIT_MARK.match(k) for k in state) or "backbone.cls_token" in state:
        return "ViT"
    if any(_VGG_UNIT.match(k) for k in state):
        return "VGG"
    return "ResNet-style"


def convert_mmpretrain(
    state: dict[str, torch.Tensor], own: set[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """Rename an mmpretrain classifier's keys to the model's; returns (state, what was done)."""
    kind = _mm_kind(state)
    stages = [int(m[1]) for k in state if (m := _SWIN_STAGE.match(k))]
    vgg = _vgg_units(state, own) if kind == "VGG" else {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(("data_preprocessor.", "neck.")):
            continue  # normalisation constants and a parameter-free pooling neck
        if key.startswith("backbone."):
            unit = _VGG_UNIT.match(key) if kind == "VGG" else None
            if unit is not None and (int(unit[1]), unit[2]) in vgg:
                out[f"{vgg[int(unit[1]), unit[2]]}.{unit[3]}"] = value
                continue
            key = key[len("backbone.") :]
            if kind == "Swin":
                converted = _swin_from_mmpretrain(key, value, max(stages))
                if converted is None:
                    continue
                key, value = converted
            elif kind == "ViT":
                key = _vit_from_mmpretrain(key)
        elif key.startswith("head.layers.head.") and kind == "ViT":
            key = "head." + key[len("head.layers.head.") :]  # VisionTransformerClsHead
        elif key.startswith("head.") and key not in own and key[len("head.") :] in own:
            key = key[len("head.") :]  # LinearClsHead's head.fc -> torchvision's fc
        if key not in own:
            # mmpretrain's ResNet exposes its batch norms as norm1..3 (stored as bn1..3).
            alias = _NORM_AS_BN.sub(r"\1bn\2.", key)
            if alias in own:
                key = alias
        out[key] = value
    return out, f"read as an mmpretrain checkpoint, {kind} keys renamed to the model's"


# ----------------------------------------------------------------------------- loading
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw state_dict stored in a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise NCLayersError(
            f"checkpoint={str(path)!r} does not exist; pass the path of a weights file "
            "(model.checkpoint=FILE). nclayers downloads nothing: pretrained ImageNet "
            "weights are files from mmpretrain's model zoo (the paper's), torchvision "
            "(e.g. torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url) or timm (its "
            "Hugging Face hub pages), fetched once by hand"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as err:
        # a text or other non-checkpoint file: the legacy unpickler's KeyError / ValueError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NCLayersError(
            f"checkpoint={str(path)!r} cannot be read with torch.load(weights_only=True): "
            f"{first}. If it holds Python objects besides tensors (optimizer or logger state), "
            "re-save only its state_dict: torch.save(model.state_dict(), 'weights.pt')"
        ) from err
    return extract_state_dict(obj)


def head_keys(model: nn.Module) -> list[str]:
    """Glob patterns of the classifier's keys: the module timm's `get_classifier()` returns,
    else the last `nn.Linear` of the model (torchvision's `fc` / `classifier.6`, a
    transformers classifier's `classifier` or `score`), e.g. ['fc.*']."""
    names = {id(m): n for n, m in model.named_modules() if n}
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or id(head) not in names or not list(head.parameters()):
        linears = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
        if not linears:
            raise NCLayersError(
                f"{type(model).__name__} has no nn.Linear classifier to skip; name its keys "
                "with model.skip='PATTERN' instead of model.skip_head=true"
            )
        return [f"{linears[-1]}.*"]
    return [f"{names[id(head)]}.*"]


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    return lambda key: any(fnmatch.fnmatchcase(key, p) for p in patterns)


def match_state_dict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    strict: bool = True,
    skip: Sequence[str] = (),
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Map `state` onto `model`'s keys (prefixes, mmpretrain names) or raise a ValueError.

    strict: every model key must be in the checkpoint and every checkpoint key in the
    model; with strict=False only the keys both hold are loaded. Shapes must always agree.
    skip: glob patterns of model keys to leave as they are, e.g. ["fc.*"] for a classifier
    trained on other classes.
    """
    own = model.state_dict()
    state = _strip_prefixes(state, set(own))
    note = ""
    if is_mmpretrain(state) and not any(k.startswith("backbone.") for k in own):
        state, note = convert_mmpretrain(state, set(own))
    skipped = _matcher(skip)
    state = {k: v for k, v in state.items() if not skipped(k)}
    wanted = [k for k in own if not skipped(k)]
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != own[k].shape
    ]
    if shape or (strict and (missing or unexpected)) or not any(k in own for k in state):
        lines = [f"{source} does not match {type(model).__name__}" + (f" ({note})" if note else "")]
        if missing:
            lines.append(f"  {len(missing)} model keys missing from it, e.g. {missing[:4]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} keys the model lacks, e.g. {unexpected[:4]}")
        if shape:
            lines.append(f"  {len(shape)} shape mismatches, e.g. {shape[:3]}")
        if len(missing) > len(wanted) // 2:
            lines.append("  most keys differ: it was saved from another architecture")
        lines.append(_advice(model, [k for k in wanted if k in state and state[k].shape
                                     != own[k].shape]))  # fmt: skip
        raise NCLayersError("; ".join(line.strip() for line in lines))  # one line
    return state


def _advice(model: nn.Module, mismatched: list[str]) -> str:
    """What to do about a checkpoint that does not match: where only the classifier's
    shape differs (another number of classes), load it without its head."""
    try:
        head = head_keys(model)
    except NCLayersError:
        head = []
    if mismatched and all(_matcher(head)(k) for k in mismatched):
        return (
            f"  its classifier ({', '.join(head)}) was trained on another number of classes: "
            "model.skip_head=true loads everything else and keeps the model's own head "
            "(from Python: load_weights(model, path, skip_head=True))"
        )
    return (
        "  build the architecture and options (width, img_size) it was saved from; "
        f"model.skip='PATTERN' leaves keys out (model.skip_head=true: the classifier, "
        f"{', '.join(head) or 'none found'})"
    )


def load_weights(
    model: nn.Module,
    path: str | Path,
    strict: bool = True,
    skip: Sequence[str] = (),
    skip_head: bool = False,
) -> nn.Module:
    """Load a checkpoint file into `model`; mismatched keys or shapes raise a ValueError.

    See `match_state_dict` for `strict` and `skip`; `skip_head` adds the classifier's keys
    (`head_keys(model)`) to `skip`: the model keeps its own head.
    """
    if skip_head:
        skip = [*skip, *head_keys(model)]
    state = match_state_dict(
        model, read_checkpoint(path), strict, skip, source=f"checkpoint {str(path)!r}"
    )
    model.load_state_dict(state, strict=strict and not skip)
    return model
