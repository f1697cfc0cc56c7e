"""Pieces every job shares: the folder a job writes, and the model a config measures."""

from __future__ import annotations

import pickle
from pathlib import Path

from torch import nn

from nclayers.config import Config
from nclayers.errors import NCLayersError
from nclayers.jobs.folder import CHECKPOINT, RunFolder
from nclayers.models import build_model, load_weights
from nclayers.runtime import is_main, seeded


def run_folder(folder: RunFolder | str | Path) -> RunFolder:
    """`folder` as a RunFolder; under torchrun only rank 0's writes."""
    if isinstance(folder, RunFolder):
        return folder
    return RunFolder(folder, write=is_main())


def build_from_config(model_cfg, num_classes: int) -> nn.Module:
    """The model `cfg.model` names, as built (no weights loaded)."""
    options = dict(model_cfg.options)
    if model_cfg.width is not None:
        options["width"] = model_cfg.width
    return build_model(model_cfg.name, num_classes, **options)


def load_model(cfg: Config, folder: RunFolder, num_classes: int) -> nn.Module:
    """The configured model with the weights the run measures: `model.checkpoint`, else
    the folder's checkpoint.pt (checked against what train wrote). Refuses a model with
    no trained weights unless `model.untrained` says so on purpose."""
    weights = folder.weights(cfg)
    with seeded(cfg.train.seed):  # the initialisation is reproducible; the caller's RNG kept
        model = build_from_config(cfg.model, num_classes)
    if cfg.model.checkpoint:
        path = Path(cfg.model.checkpoint)
    elif weights.get("file") == CHECKPOINT:
        path = folder.verify(CHECKPOINT)
    else:  # untrained on purpose, or a Hugging Face model with its own weights
        return model
    try:
        load_weights(model, path)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise NCLayersError(
            f"{path} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "it is damaged or not a weights file"
        ) from None
    return model


__all__ = ["build_from_config", "load_model", "run_folder"]
