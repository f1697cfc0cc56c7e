"""Hugging Face data sets behind `load_dataset` (data.name=hf:PATH_OR_ID).

`load_hf_split(data_cfg, split, model_name)` reads the data set's split that serves as
`split` (`data.train_split` / `data.test_split`: a split name or a slice of one file) once
through `datasets` and, by its columns, returns

- images (the `data.image_column` is there and the `data.text_column` is not): an
  `ArrayDataset` for vision transformers, at the model's own input size
  (`image_size` of its config, else `data.image_size`; the short side resized in the
  ratio `data.resize / data.image_size`) and normalised with its image processor's mean
  and std (`preprocessor_config.json`; `data.mean`/`data.std` win, ImageNet's otherwise);
- text: a `TextData` tokenised with `data.tokenizer`, else the model's own tokenizer
  (`model.name`'s folder or hub id), cut at `data.max_length` tokens (null: the
  tokenizer's limit, else the model's `max_position_embeddings`, else 512), with the
  batching defaults `data.window` and `data.padding_side`. Without a `data.label_column`
  the text is language-model text (no labels views).

Class names come from the training split for both splits (a ClassLabel's names, the
sorted label names, or 0..max for integers), so a test split that lacks a class still
numbers the classes as training did.
"""

from __future__ import annotations

import json
from pathlib import Path

from nclayers.data.arrays import ArrayDataset
from nclayers.data.text import (
    PREFIX,
    TextData,
    class_labels,
    dataset_text,
    load_split,
    load_tokenizer,
)
from nclayers.errors import NCLayersError

DEFAULT_MAX_LENGTH = 512
# A tokenizer's model_max_length above this means "not set" (transformers uses 1e30).
_UNSET_LENGTH = 1_000_000


def split_name(cfg, split: str) -> str:
    """The data set's split (or slice) that serves as nclayers' `split`."""
    return cfg.train_split if split == "train" else cfg.test_split if split == "test" else split


def load_hf_split(cfg, split: str, model_name: str | None = None) -> TextData | ArrayDataset:
    """`split` ("train" or "test") of the Hugging Face data set `cfg` (a DataConfig)
    describes, for the model `model_name` (see the module doc)."""
    ds = load_split(cfg.name, split_name(cfg, split), cfg.config_name)
    columns = ds.column_names
    if cfg.image_column in columns and cfg.text_column not in columns:
        return _images(cfg, ds, split, model_name)
    if cfg.text_column not in columns:
        raise NCLayersError(
            f"data.text_column={cfg.text_column!r}: not a column of {cfg.name} "
            f"({split_name(cfg, split)}); its columns are {columns} (set data.text_column, or "
            "data.image_column for images)"
        )
    return _texts(cfg, ds, split, model_name)


def _texts(cfg, ds, split: str, model_name: str | None) -> TextData:
    source = cfg.tokenizer or _model_source(model_name)
    if source is None:
        raise NCLayersError(
            f"data.tokenizer is not set and no model names one: {cfg.name} is text; set "
            "data.tokenizer=FOLDER_OR_ID (or model.name=hf:...)"
        )
    tokenizer = load_tokenizer(source)
    max_length = cfg.max_length or default_max_length(tokenizer, model_name)
    labelled = cfg.label_column in ds.column_names
    classes = _train_classes(cfg, ds, split) if labelled else None
    data = dataset_text(
        ds, tokenizer, source=cfg.name, split=split, text_column=cfg.text_column,
        label_column=cfg.label_column if labelled else None, classes=classes,
        max_length=max_length,
    )  # fmt: skip
    data.window, data.padding_side = cfg.window, cfg.padding_side
    data.meta.update(tokenizer=str(source), max_length=max_length)
    return data


def _images(cfg, ds, split: str, model_name: str | None) -> ArrayDataset:
    from nclayers.data.hf_images import IMAGENET_MEAN, IMAGENET_STD, dataset_images

    config = _model_file(model_name, "config.json")
    processor = _model_file(model_name, "preprocessor_config.json")
    size = config.get("image_size", cfg.image_size)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    resize = max(size, round(size * cfg.resize / cfg.image_size))
    mean = cfg.mean or processor.get("image_mean") or IMAGENET_MEAN
    std = cfg.std or processor.get("image_std") or IMAGENET_STD
    return dataset_images(
        ds, source=cfg.name, split=split, size=size, resize=resize,
        image_column=cfg.image_column, label_column=cfg.label_column,
        classes=_train_classes(cfg, ds, split), mean=tuple(mean), std=tuple(std),
    )  # fmt: skip


def _train_classes(cfg, ds, split: str) -> list[str] | None:
    """The class names as the training split numbers them (None: the split decides,
    which for the training split itself is the same thing)."""
    feature = ds.features.get(cfg.label_column)
    if hasattr(feature, "names"):  # a ClassLabel carries its names
        return list(feature.names)
    if split == "train":
        return None
    train = load_split(cfg.name, cfg.train_split, cfg.config_name)
    if cfg.label_column not in train.column_names:
        return None
    values = list(train[cfg.label_column])
    return class_labels(values, None, cfg.label_column)[1] if values else None


def _model_source(model_name: str | None) -> str | None:
    if not model_name:
        return None
    return model_name.removeprefix(PREFIX)


def _model_file(model_name: str | None, name: str) -> dict:
    """A JSON file of a local model folder ({} for a hub id or none)."""
    source = _model_source(model_name)
    path = Path(source) / name if source else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise NCLayersError(f"{path}: unreadable ({err})") from None


def default_max_length(tokenizer, model_name: str | None) -> int:
    """The tokenizer's limit, else the model's position count, else 512."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _UNSET_LENGTH:
        return limit
    config = _model_file(model_name, "config.json")
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return int(config[key])
    return DEFAULT_MAX_LENGTH


__all__ = ["default_max_length", "load_hf_split", "split_name"]
