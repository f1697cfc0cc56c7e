"""Data sets, labels views, corruptions and batches.

`load_dataset(data_cfg, split)` returns an `ArrayDataset` (images in memory: digits,
CIFAR) or a `FolderDataset` (file paths: ImageNet and other image folders, `data.name`
imagenet or folder), both with the same API, and for `data.name=hf:PATH_OR_ID` (see
`nclayers.data.hf_data`) a `TextData` (tokenised text) or an `ArrayDataset` (images for
vision transformers); `make_batches(ds, batch_size, device, ...)` batches any of them
(`DeviceBatches`, `FolderBatches`, `TextBatches`). Their labels views are
"clean" (the true labels) and, on the training split with label noise, "noisy" (the
labels the model is trained on). `with_changed_views` adds the views that single out
the samples whose label was changed. With `data.corruption`, the training split's images
(and the test split's with `data.corrupt_test`) are corrupted once, and the data set
keeps the clean images too (`ds.clean_twin()`).
"""

from __future__ import annotations

import logging

import torch

from nclayers.data.arrays import ArrayDataset, balanced_subset
from nclayers.data.batches import DeviceBatches
from nclayers.data.corrupt import CORRUPTIONS, corrupt, parse_severity
from nclayers.data.folderbatches import FolderBatches
from nclayers.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, FolderDataset
from nclayers.data.noise import (
    CHANGED_CLEAN,
    CHANGED_NOISY,
    NOISE_MODES,
    UNCHANGED,
    changed_views,
    cifar10n_labels,
    cifar100n_labels,
    cifarn_labels,
    has_label_noise,
    shuffle_labels,
    uniform_labels,
)
from nclayers.data.text import TextBatches, TextData
from nclayers.errors import NCLayersError

DATASETS = ("digits", "cifar10", "cifar100", "cifar10c", "imagenet", "folder")
Dataset = ArrayDataset | FolderDataset | TextData
# Keywords of the image batches that text batches have no use for.
_IMAGE_ONLY = ("workers", "decoder", "prefetch", "channels_last", "crop_padding", "flip",
               "dtype")  # fmt: skip
log = logging.getLogger("nclayers.data")


def load_dataset(cfg, split: str, model_name: str | None = None) -> Dataset:
    """Load `split` of the data set described by a `DataConfig`: the images, label noise
    (on the full training split, so a subset keeps each image's own label), the subset,
    then the corruption (per sample, by its index in the full split).

    Image folders (`data.name` imagenet or folder) read `data.dir`/train and /val (the
    test split) and the keys `data.classes` (first N sorted classes), `data.image_size`,
    `data.resize`, `data.mean`, `data.std` (None: ImageNet's), `data.skip_bad`,
    `data.workers` and `data.decoder` (see `load_folder_split` and `FolderBatches`).
    Hugging Face data sets (`data.name=hf:...`) are tokenised with `data.tokenizer`, else
    with the tokenizer of `model_name` (`model.name`), and sized for that model's inputs
    (`nclayers.data.hf_data`)."""
    corruption = getattr(cfg, "corruption", None)
    if corruption:  # bad names fail before any file is read
        from nclayers.data.corrupt import check_corruption

        check_corruption(corruption)
        if cfg.severity is None:
            raise NCLayersError(
                f"data.corruption={corruption!r} needs data.severity: 1..5 or the paper's "
                "level L1, L2, L3 (= 1, 3, 5)"
            )
        parse_severity(cfg.severity)
    ds = _read(cfg, split, model_name)
    classes = getattr(cfg, "classes", None)
    # Image folders keep their first classes as they list them (load_folder_split); a
    # human label set (CIFAR-N) is looked up over the whole split, so it is filtered after.
    filtered = not classes or cfg.name in ("imagenet", "folder")
    if not filtered and not isinstance(cfg.noise, str):
        ds, filtered = first_classes(ds, int(classes), cfg.name), True

    if split == "train" and has_label_noise(cfg.noise):
        if not ds.labels:
            raise NCLayersError(f"data.noise={cfg.noise}: {cfg.name} has no labels to change")
        ds = _with_label_noise(ds, cfg)
    if not filtered:
        ds = first_classes(ds, int(classes), cfg.name)

    size = cfg.train_subset if split == "train" else cfg.test_subset
    if size and "clean" in ds.labels:
        ds = ds.subset(
            balanced_subset(ds.labels["clean"], int(size), ds.num_classes, cfg.subset_seed)
        )
    elif size and int(size) < len(ds):  # language-model text: a seeded random subset
        gen = torch.Generator().manual_seed(cfg.subset_seed)
        ds = ds.subset(torch.randperm(len(ds), generator=gen)[: int(size)].sort().values)
    _measured_noise(ds, cfg.name, split)

    corrupt_split = split == "train" or (split == "test" and cfg.corrupt_test)
    if corruption and cfg.name != "cifar10c" and corrupt_split:  # cifar10c comes corrupted
        ds = corrupt_dataset(ds, corruption, cfg.severity, cfg.corruption_seed)
    return ds


def first_classes(ds: Dataset, n: int, name: str = "") -> Dataset:
    """The samples of the first `n` classes (data.classes), numbered as before: a sample
    is kept when its label is below `n` in every labels view (with human label noise, its
    true and its noisy label)."""
    from dataclasses import replace

    if not ds.labels:
        raise NCLayersError(
            f"data.classes={n}: {name or ds.name} has no labels (language-model text); "
            "unset data.classes (next-token classes are chosen by analyze.top_k)"
        )
    if not 2 <= n <= ds.num_classes:
        raise NCLayersError(
            f"data.classes={n}: {name or ds.name} has {ds.num_classes} classes; keep between "
            f"2 and {ds.num_classes} (or unset data.classes for all of them)"
        )
    keep = torch.ones(len(ds), dtype=torch.bool)
    for y in ds.labels.values():
        keep &= (y >= 0) & (y < n)
    return replace(ds.subset(keep.nonzero().flatten()), classes=list(ds.classes[:n]))


def _read(cfg, split: str, model_name: str | None) -> Dataset:
    """The split as its files hold it (no noise, subset or corruption yet)."""
    name = cfg.name
    if name.startswith("hf:"):
        from nclayers.data.hf_data import load_hf_split

        ds = load_hf_split(cfg, split, model_name)
        if cfg.corruption and isinstance(ds, TextData):
            raise NCLayersError(
                f"data.corruption={cfg.corruption!r}: corruptions act on images; {name} is text"
            )
        return ds
    if name == "digits":
        from nclayers.data.digits import load_digits_split

        return load_digits_split(split)
    if name in ("cifar10", "cifar100", "cifar10c"):
        if not cfg.dir:
            raise NCLayersError(
                f"data.dir is not set: {name} is read from a local folder; pass "
                "data.dir=PATH (the folder holding cifar-10-batches-py/ or CIFAR-10-C/)"
            )
        if name == "cifar10c":
            from nclayers.data.cifar10c import load_cifar10c_split

            return load_cifar10c_split(split, cfg.dir, cfg.corruption, cfg.severity)
        from nclayers.data.cifar import load_cifar_split

        return load_cifar_split(name, split, cfg.dir, download=cfg.download)
    if name in ("imagenet", "folder"):
        return _load_folder(cfg, split)
    raise NCLayersError(f"data.name={name!r}: expected one of {DATASETS}")


def _measured_noise(ds: Dataset, name: str, split: str) -> None:
    """Record the noise rate measured on the samples actually used (after the subset)."""
    if "noisy" in ds.labels:
        changed = int((ds.labels["noisy"] != ds.labels["clean"]).sum())
        ds.meta.update(noise_changed=changed, noise_rate=changed / len(ds))
        log.info(
            "%s %s: %d of %d training labels differ from the true ones (%.2f%%)",
            name, split, changed, len(ds), 100 * changed / len(ds),
        )  # fmt: skip


def _load_folder(cfg, split: str) -> FolderDataset:
    from nclayers.data.imagefolder import load_folder_split

    return load_folder_split(
        cfg.dir, split, name=cfg.name, classes=getattr(cfg, "classes", None),
        image_size=getattr(cfg, "image_size", 224), resize=getattr(cfg, "resize", 256),
        mean=getattr(cfg, "mean", None), std=getattr(cfg, "std", None),
        skip_bad=getattr(cfg, "skip_bad", False), workers=getattr(cfg, "workers", None),
        decoder=getattr(cfg, "decoder", "auto"),
    )  # fmt: skip


def make_batches(
    ds: Dataset, batch_size: int, device: torch.device | str = "cpu", *,
    augment: bool | None = None, **kwargs,
) -> DeviceBatches | FolderBatches:  # fmt: skip
    """The batches for any data set: `DeviceBatches` for an `ArrayDataset` (held on the
    device), `FolderBatches` for a `FolderDataset` (read from its files). Both take the
    same keywords (train, shuffle, seed, views, drop_last, shard, channels_last, dtype,
    ...) and yield (normalised images on the device, labels or a dict of views).
    `TextBatches` for a `TextData` take the same (image settings are ignored) and
    `next_token` (NextTokenClasses), and yield (tokenised inputs, labels).

    augment: the training augmentation of the data set's recipe, or none: CIFAR's
    random crop (padding 4) and flip, ImageNet's random resized crop and flip; None
    leaves it to `train` (and `crop_padding`/`flip`). Text has none."""
    if isinstance(ds, TextData):
        for key in _IMAGE_ONLY:
            kwargs.pop(key, None)
        return TextBatches(ds, batch_size, device, **kwargs)
    if kwargs.pop("next_token", None) is not None:
        raise NCLayersError("next_token: next-token classes apply to text (a TextData)")
    if isinstance(ds, FolderDataset):
        return FolderBatches(ds, batch_size, device, augment=augment, **kwargs)
    if not isinstance(ds, ArrayDataset):
        raise NCLayersError(
            f"dataset: expected an ArrayDataset or a FolderDataset (what "
            f"nclayers.data.load_dataset returns), got {type(ds).__name__}"
        )
    for key in ("workers", "decoder", "prefetch"):
        kwargs.pop(key, None)  # folder settings: an array set is already in memory
    if augment is not None:
        kwargs.setdefault("crop_padding", 4 if augment else 0)
        kwargs.setdefault("flip", augment)
    return DeviceBatches(ds, batch_size, device, **kwargs)


def _with_label_noise(ds: Dataset, cfg) -> Dataset:
    clean, noise = ds.labels["clean"], cfg.noise
    mode = getattr(cfg, "noise_mode", "shuffle")
    if isinstance(noise, str):
        if ds.name not in ("cifar10", "cifar100"):
            raise NCLayersError(
                f"data.noise={noise!r}: human label sets exist for cifar10 (CIFAR-10N) and "
                f"cifar100 (CIFAR-100N), not {ds.name}; or give a rate in [0, 1]"
            )
        noisy, file_clean = cifarn_labels(ds.name, noise, cfg.dir)
        if len(noisy) != len(clean) or (file_clean is not None and not torch.equal(
            file_clean, clean
        )):  # fmt: skip
            raise NCLayersError(
                f"data.noise={noise!r}: the label file's clean labels do not match the "
                f"training images' labels in data.dir={cfg.dir!r}: the images are not in the "
                "original CIFAR training order, or the file is for another data set"
            )
        ds.meta["noise_source"] = f"{ds.name}n:{noise}"
    elif mode == "shuffle":
        noisy = shuffle_labels(clean, float(noise), seed=cfg.noise_seed)
        ds.meta["noise_source"] = f"shuffle:{float(noise)}"
    elif mode == "uniform":
        noisy = uniform_labels(clean, float(noise), ds.num_classes, seed=cfg.noise_seed)
        ds.meta["noise_source"] = f"uniform:{float(noise)}"
    else:
        raise NCLayersError(f"data.noise_mode={mode!r}: expected one of {NOISE_MODES}")
    return ds.with_views({"clean": clean, "noisy": noisy})


def corrupt_dataset(ds: Dataset, name: str, severity, seed: int = 0) -> Dataset:
    """`ds` with corrupted images (by each sample's `index`) and its clean images kept
    (an image folder: each image corrupted as it is decoded, see `FolderDataset`)."""
    from dataclasses import replace

    severity = parse_severity(severity)
    if isinstance(ds, FolderDataset):
        return ds.corrupted(name, severity, seed)
    images = corrupt(ds.images, name, severity, seed=seed, index=ds.index)
    meta = dict(ds.meta, corruption=name, corruption_severity=severity, corruption_seed=seed)
    return replace(ds, images=images, clean_images=ds.images, meta=meta)


def with_changed_views(ds: Dataset) -> Dataset:
    """`ds` plus the views changed_clean, changed_noisy and unchanged (-1: left out)."""
    if "noisy" not in ds.labels:
        raise NCLayersError(
            f"{ds.name} {ds.split}: no 'noisy' labels view; the changed-sample views exist "
            "for a training split with label noise (data.noise=...)"
        )
    return ds.with_views({**ds.labels, **changed_views(ds.labels["clean"], ds.labels["noisy"])})


__all__ = [
    "CHANGED_CLEAN",
    "CHANGED_NOISY",
    "CORRUPTIONS",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NOISE_MODES",
    "UNCHANGED",
    "ArrayDataset",
    "Dataset",
    "DeviceBatches",
    "FolderBatches",
    "FolderDataset",
    "TextBatches",
    "TextData",
    "balanced_subset",
    "changed_views",
    "cifar10n_labels",
    "cifar100n_labels",
    "corrupt",
    "corrupt_dataset",
    "first_classes",
    "has_label_noise",
    "load_dataset",
    "make_batches",
    "shuffle_labels",
    "uniform_labels",
    "with_changed_views",
]
