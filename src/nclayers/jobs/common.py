"""Pieces every job shares: the folder a job writes, the model a config measures, its
data splits, and what a measurement counts as classes (`Measure`)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from nclayers.config import Config
from nclayers.data import Dataset, TextData, load_dataset
from nclayers.errors import NCLayersError
from nclayers.jobs.folder import CHECKPOINT, RunFolder
from nclayers.models import build_model, load_weights
from nclayers.runtime import is_main, seeded


def run_folder(folder: RunFolder | str | Path) -> RunFolder:
    """`folder` as a RunFolder; under torchrun only rank 0's writes."""
    if isinstance(folder, RunFolder):
        return folder
    return RunFolder(folder, write=is_main())


def build_from_config(model_cfg, num_classes: int, *, fresh: bool = False) -> nn.Module:
    """The model `cfg.model` names, as built (no weights loaded). `fresh`: a Hugging Face
    model is built from its config with new weights (`init=config`), because weights are
    loaded next or it is trained from scratch; a classifier's head counts `num_classes`
    (0: the data have no classes, as for language-model text: the model's own head)."""
    options = dict(model_cfg.options)
    if model_cfg.width is not None:
        options["width"] = model_cfg.width
    if model_cfg.name.startswith("hf:"):
        if fresh:
            options.setdefault("init", "config")
        return build_model(model_cfg.name, num_classes or None, **options)
    return build_model(model_cfg.name, num_classes, **options)


def load_split(cfg: Config, split: str) -> Dataset:
    """`split` of the run's data (text is tokenised with the model's tokenizer)."""
    return load_dataset(cfg.data, split, cfg.model.name)


@dataclass(frozen=True)
class Measure:
    """What a measuring stage counts as classes: `num_classes`, the `next_token` classes
    (analyze.task=next_token: the top_k most frequent next tokens of the reference split,
    shared by every split) and the blocks' `pool` ("token" for next-token classes)."""

    num_classes: int
    next_token: object | None  # NextTokenClasses
    pool: str | None


def measure_setup(cfg: Config, reference: Dataset, measured: Dataset) -> Measure:
    """The classes of a measurement: the labels of `measured`, or (next_token) the
    next-token classes counted on `reference` (the training split)."""
    ac = cfg.analyze
    if ac.task == "next_token":
        from nclayers.data.text import NextTokenClasses, count_next_tokens

        if not isinstance(reference, TextData):
            raise NCLayersError(
                f"analyze.task=next_token: {cfg.data.name} is not text; next-token classes "
                "need a text data set (data.name=hf:PATH_OR_ID) and a causal language model"
            )
        classes = NextTokenClasses.from_counts(count_next_tokens(reference), ac.top_k)
        return Measure(ac.top_k, classes, "token")
    if isinstance(measured, TextData) and not measured.labels:
        raise NCLayersError(
            f"{cfg.data.name} has no labels (data.label_column={cfg.data.label_column!r} is "
            "not one of its columns): measure language-model text with "
            "analyze.task=next_token, or name the label column"
        )
    return Measure(measured.num_classes, None, cfg.model.pool)


def number_blocks(model: nn.Module, blocks: list, rows, pool: str | None = None) -> list[dict]:
    """`rows` with `layer` set to each block's position (1-based) among the model's
    blocks in forward order (`find_blocks(model, "auto")`), so the same block has the same
    layer whichever subset (`model.blocks`) a stage measured; blocks outside that list
    keep their position among the measured ones."""
    from nclayers.models import find_blocks

    try:
        every = [b.name for b in find_blocks(model, "auto", pool=pool)]
    except NCLayersError:
        every = []
    names = [b.name for b in blocks]
    order = every if all(n in every for n in names) else names
    position = {n: i + 1 for i, n in enumerate(order)}
    return [{**r, "layer": position.get(r.get("block"), r.get("layer"))} for r in rows]


def load_model(cfg: Config, folder: RunFolder, num_classes: int) -> nn.Module:
    """The configured model with the weights the run measures: `model.checkpoint`, else
    the folder's checkpoint.pt (checked against what train wrote). Refuses a model with
    no trained weights unless `model.untrained` says so on purpose."""
    weights = folder.weights(cfg)
    # A transformers model whose weights come from a checkpoint is built from its config
    # (loading its pretrained weights first would be work thrown away).
    fresh = bool(cfg.model.checkpoint) or weights.get("file") == CHECKPOINT
    with seeded(cfg.train.seed):  # the initialisation is reproducible; the caller's RNG kept
        model = build_from_config(cfg.model, num_classes, fresh=fresh)
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


__all__ = [
    "Measure",
    "build_from_config",
    "load_model",
    "load_split",
    "measure_setup",
    "number_blocks",
    "run_folder",
]
