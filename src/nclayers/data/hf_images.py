"""Image data sets through `datasets`, for vision transformers (ViT, DeiT, ...).

`load_image_split(source, split, size=224)` reads a split the way `data.text.load_split`
does (a `save_to_disk` folder, Parquet/JSON/CSV files whose image column holds images,
bytes or file paths, or a hub id where the machine is online), decodes every image as
RGB, resizes its short side to `resize` (default size x 256/224) and crops the centre
`size` x `size`, and returns an `ArrayDataset` (uint8, labels view "clean") that
`DeviceBatches` serves like CIFAR: normalised with the model's `mean` and `std` (its
image processor's `image_mean`/`image_std`; ImageNet's by default).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from nclayers.data.arrays import ArrayDataset
from nclayers.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from nclayers.data.text import checked_rows, class_labels, class_names, load_split
from nclayers.errors import NCLayersError


def _pil(value):
    """A PIL image from what an image column holds: an image, bytes, a path or a dict."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # {"bytes": ..., "path": ...} of an undecoded Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    raise NCLayersError(f"image column: cannot read a {type(value).__name__} as an image")


def to_array(image, size: int, resize: int) -> np.ndarray:
    """3 x size x size uint8: RGB, short side resized to `resize`, centre crop."""
    from PIL import Image

    image = _pil(image).convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    if (round(w * scale), round(h * scale)) != (w, h):
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def load_image_split(source: str, split: str = "train", **options) -> ArrayDataset:
    """`split` of `source` as an `ArrayDataset` (see the module doc): `dataset_images` of
    the split read, `options` its keywords."""
    return dataset_images(load_split(source, split), source=source, split=split, **options)


def dataset_images(
    ds,
    *,
    source: str = "",
    split: str = "",
    size: int = 224,
    resize: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    limit: int | None = None,
) -> ArrayDataset:
    """A `datasets.Dataset` already read (`source`, `split`: its names) as an
    `ArrayDataset` of `size` x `size` images (see the module doc)."""
    if size < 1:
        raise NCLayersError(f"size={size}: the model's input side in pixels, e.g. 224")
    resize = resize or round(size * 256 / 224)
    if resize < size:
        raise NCLayersError(f"resize={resize}: the short side must be at least size={size}")
    columns = {"image_column": image_column, "label_column": label_column}
    ds = checked_rows(ds, columns, source, split, limit)
    classes = class_names(ds, label_column, classes)
    y, classes = class_labels(list(ds[label_column]), classes, label_column)
    images = np.stack([to_array(im, size, resize) for im in ds[image_column]])
    return ArrayDataset(
        torch.from_numpy(images), {"clean": y}, list(classes), tuple(mean), tuple(std),
        name=str(source), split=split,
    )  # fmt: skip


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "dataset_images", "load_image_split", "to_array"]
