"""Pieces every job shares: the model a config (and its run folder) describes."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nclayers.jobs.folder import CHECKPOINT, RunFolder
from nclayers.models import build_model, load_weights


def build_from_config(model_cfg, num_classes: int) -> nn.Module:
    """The model `cfg.model` names, with `model.checkpoint` loaded when set."""
    options = dict(model_cfg.options)
    if model_cfg.width is not None:
        options["width"] = model_cfg.width
    model = build_model(model_cfg.name, num_classes, **options)
    if model_cfg.checkpoint:
        load_weights(model, model_cfg.checkpoint)
    return model


def load_model(cfg, num_classes: int, folder: RunFolder | str | Path | None = None) -> nn.Module:
    """Build the configured model; load `model.checkpoint` if set, else the run folder's
    own checkpoint.pt when it has one (the weights `nclayers train` left there)."""
    model = build_from_config(cfg.model, num_classes)
    if not cfg.model.checkpoint and folder is not None:
        folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        if folder.exists(CHECKPOINT):
            load_weights(model, folder.file(CHECKPOINT))
    return model
