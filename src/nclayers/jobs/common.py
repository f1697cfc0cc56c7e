"""Pieces every job shares: the folder a job writes, the model a config measures, its
data splits, and what a measurement counts as classes (`Measure`)."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nclayers.config import Config, canonical_settings, weights_settings
from nclayers.data import Dataset, TextData, load_dataset, make_batches
from nclayers.errors import NCLayersError
from nclayers.jobs.folder import CHECKPOINT, CONFIG, RunFolder
from nclayers.models import build_model, load_weights
from nclayers.runtime import is_main, seeded
from nclayers.taps import output_logits, run_model

log = logging.getLogger("nclayers.jobs")


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
        if measured is not reference:
            _check_next_tokens_present(cfg, classes, measured)
        return Measure(ac.top_k, classes, "token")
    if isinstance(measured, TextData) and not measured.labels:
        raise NCLayersError(
            f"{cfg.data.name} has no labels (data.label_column={cfg.data.label_column!r} is "
            "not one of its columns): measure language-model text with "
            "analyze.task=next_token, or name the label column"
        )
    return Measure(measured.num_classes, None, cfg.model.pool)


@torch.no_grad()
def check_classifier(cfg: Config, model: nn.Module, ds: Dataset, num_classes: int) -> None:
    """Refuse, in one line, a classifier whose forward does not give `num_classes` outputs
    per sample (one dry forward of two samples of `ds`, in eval mode): a head built for
    other classes, an entry point without num_classes, a forward returning features."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    inputs = sample_inputs(ds, device)
    was_training = model.training
    try:
        model.eval()
        logits = output_logits(run_model(model, inputs))
    finally:
        model.train(was_training)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        shape = tuple(logits.shape)
        what = f"{shape[1]} outputs" if logits.ndim == 2 else f"outputs of shape {shape}"
        raise NCLayersError(
            f"model.name={cfg.model.name}: its forward gives {what} per sample but "
            f"{cfg.data.name} has {num_classes} classes; build its head with num_classes "
            "outputs (an entry point def net(num_classes: int, **options) gets them)"
        )


def _check_next_tokens_present(cfg: Config, classes, measured: TextData) -> None:
    """Refuse next-token classes (counted on the reference split) of which the measured
    split holds no sample: every class needs one. Names the first such token."""
    from nclayers.data.text import count_next_tokens

    counts = count_next_tokens(measured, classes.vocab_size)
    absent = [k for k, t in enumerate(classes.tokens.tolist()) if int(counts[t]) == 0]
    if not absent:
        return
    k, token = absent[0], int(classes.tokens[absent[0]])
    ref = cfg.analyze.reference
    other = "test" if ref != "test" else "train"
    fix = f"lower analyze.top_k (to {k} or less)" if k >= 2 else "raise the split's size"
    raise NCLayersError(
        f"analyze.top_k={cfg.analyze.top_k}: next-token class {k} (token {_token_text(cfg, token)}"
        f", id {token}, counted on the {ref} split) never follows a token in the "
        f"{measured.split} split ({len(absent)} class(es) have no sample there); {fix}, or "
        f"count the classes on another split (analyze.reference={other})"
    )


def _token_text(cfg: Config, token: int) -> str:
    """A token's text as the run's tokenizer spells it ('?' when no tokenizer loads)."""
    from nclayers.data.text import PREFIX, load_tokenizer

    source = cfg.data.tokenizer or cfg.model.name.removeprefix(PREFIX)
    try:
        tokenizer = load_tokenizer(source)
        return repr(tokenizer.decode([token]))
    except (OSError, ValueError, NCLayersError, ImportError, TypeError, AttributeError):
        return "?"


def check_causal(model: nn.Module, cfg: Config) -> None:
    """Refuse next-token classes on a model that sees the tokens after a position (a
    bidirectional encoder such as BERT): there the "next" token is part of the input.
    Two forwards of one short sequence that differ in the last token: a causal model's
    hidden states at the earlier positions do not change."""
    import torch

    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:  # not a transformers language model: nothing to try it on
        return
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % vocab
    states = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x in (ids, other):
            out = model(input_ids=x.to(device), attention_mask=torch.ones_like(x, device=device),
                        output_hidden_states=True)  # fmt: skip
            states.append(torch.stack([h[:, :-1].float() for h in out.hidden_states[1:]]))
    model.train(was_training)
    change = (states[0] - states[1]).abs().max() / states[0].abs().max().clamp_min(1e-12)
    if float(change) > 1e-4:
        raise NCLayersError(
            f"analyze.task=next_token: {cfg.model.name} ({type(model).__name__}) is not a "
            "causal language model: its hidden states at a position change with a later "
            "token, so the next token is visible; measure it with analyze.task=classify, or "
            "use a causal model (model.name=hf:... of a GPT-2, Llama, ...)"
        )


def sample_inputs(ds: Dataset, device: torch.device, channels_last: bool = False):
    """The inputs of a batch of (up to) two samples of `ds`: what a dry forward needs,
    in the memory format the measured batches have."""
    two = ds.subset(torch.arange(min(2, len(ds))))
    return next(iter(make_batches(two, 2, device, channels_last=channels_last, workers=0)))[0]


def number_blocks(
    model: nn.Module, rows, pool: str | None, sample: Callable[[], Any]
) -> list[dict]:
    """`rows` with `layer` set to each block's position (1-based) among the model's
    blocks in forward order, so the same block has the same layer whichever subset
    (`model.blocks`) a stage measured. Where every block was measured, the measuring pass
    already numbered them so; otherwise `sample()` (the inputs of a dry forward) orders
    all of them (`find_blocks(model, "auto", sample=...)`, a shared module's calls apart).
    A measured block outside them keeps the position the pass gave it."""
    from nclayers.models import find_blocks

    rows = list(rows)
    try:
        auto = [b.name for b in find_blocks(model, "auto", pool=pool)]
        if set(auto) <= {str(r.get("block")).split("#")[0] for r in rows}:
            return rows
        every = [b.name for b in find_blocks(model, "auto", pool=pool, sample=sample())]
    except NCLayersError:
        return rows
    if not all(r.get("block") in every for r in rows):
        return rows
    position = {n: i + 1 for i, n in enumerate(every)}
    return [{**r, "layer": position[r["block"]]} for r in rows]


def check_measured_settings(source: RunFolder, cfg: Config, verb: str) -> None:
    """Refuse, in one line, a `key=value` given to `nclayers VERB RUN` (`cfg`: the run's
    config with them) that changes a key defining the run's weights (train.*, model.name,
    data.noise, ...): VERB measures the weights the run trained, so such a key would be
    recorded beside weights it did not make. Where the command names other weights
    (model.checkpoint=FILE, model.untrained=true) the keys describe those and are taken."""
    saved = source.config()
    chosen = ("model.checkpoint", "model.untrained")
    if cfg.model.untrained or cfg.model.checkpoint != saved.model.checkpoint:
        return
    mine = canonical_settings(weights_settings(saved))
    asked = canonical_settings(weights_settings(cfg))
    changed = [k for k in asked if k not in chosen and asked[k] != mine.get(k)]
    if changed:
        key = changed[0]
        raise NCLayersError(
            f"{key}={asked[key]!r}: {source.path} was trained with {key}={mine.get(key)!r}, "
            f"and nclayers {verb} measures those weights; drop the setting, or train a new "
            f"run with it (nclayers train {source.file(CONFIG)} {key}=... --out NEW)"
        )


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
        _warn_unfinished(cfg, folder, path)
    else:  # untrained on purpose, or a Hugging Face model with its own weights
        return model
    try:
        # model.skip_head / model.skip apply to model.checkpoint, not to the run's own weights.
        given = bool(cfg.model.checkpoint)
        load_weights(model, path, skip=cfg.model.skip if given else (),
                     skip_head=given and cfg.model.skip_head)  # fmt: skip
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise NCLayersError(
            f"{path} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "it is damaged or not a weights file"
        ) from None
    return model


def _warn_unfinished(cfg: Config, folder: RunFolder, path: Path) -> None:
    """Warn (measuring anyway) when the folder's training stopped before its last epoch."""
    import torch

    if (folder.stages().get("train") or {}).get("weights", {}).get("epoch") == cfg.train.epochs:
        return  # train finished and recorded it
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, AttributeError):
        return  # not nclayers' checkpoint: load_weights says what is wrong with it
    if isinstance(epoch, int) and epoch < cfg.train.epochs:
        log.warning(
            "%s: training is unfinished (checkpoint at epoch %d of train.epochs=%d); measuring "
            "these weights. Finish it with: nclayers train %s --resume",
            folder.path, epoch, cfg.train.epochs, folder.path,
        )  # fmt: skip


__all__ = [
    "Measure",
    "build_from_config",
    "check_causal",
    "check_classifier",
    "check_measured_settings",
    "load_model",
    "load_split",
    "measure_setup",
    "number_blocks",
    "run_folder",
    "sample_inputs",
]
