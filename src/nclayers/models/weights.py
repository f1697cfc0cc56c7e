"""Load weights into a model from a local checkpoint file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The model's state_dict inside a checkpoint object (nclayers' own or a plain one)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                return extract_state_dict(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError("checkpoint holds no state_dict (expected tensors under 'model' or top level)")


def _strip_prefixes(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    # DDP's 'module.' and torch.compile's '_orig_mod.' prefixes carry no meaning here.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in own
        ):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a checkpoint file into `model`; mismatched keys or shapes raise a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint={str(path)!r} does not exist; pass the path of a .pt file")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    state = _strip_prefixes(extract_state_dict(obj), set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if shape or (strict and (missing or unexpected)):
        lines = [f"checkpoint {str(path)!r} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  {len(missing)} model keys missing from it, e.g. {missing[:4]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} keys the model lacks, e.g. {unexpected[:4]}")
        if shape:
            lines.append(f"  {len(shape)} shape mismatches, e.g. {shape[:3]}")
        lines.append("  build the same architecture and options (width, num_classes) it was saved from")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=strict)
    return model
