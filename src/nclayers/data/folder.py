"""ImageNet-style image folders: `root/<split>/<class>/<image>`.

`folder_loader(root, "val", 64)` reads a split with torchvision's `ImageFolder` and the
usual ImageNet transforms: resize 256, centre crop 224 for evaluation; random resized
crop 224 and a horizontal flip for training; both normalised with ImageNet's channel
statistics. Class indices follow the sorted class folder names, as in ImageFolder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from nclayers.errors import NCLayersError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(size: int = 224, resize: int = 256) -> transforms.Compose:
    """Resize the short side to `resize`, take the central `size` square, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(size: int = 224) -> transforms.Compose:
    """Random resized crop to `size`, horizontal flip with p=0.5, normalise."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def image_folder(root: str | Path, split: str, train: bool = False) -> datasets.ImageFolder:
    """The `split` folder under `root` as an ImageFolder with the matching transform."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise NCLayersError(
            f"split={split!r}: {str(folder)!r} is not a folder (root={str(root)!r} holds "
            f"{found or 'nothing'}); expected root/{split}/<class>/<image>"
        )
    transform = train_transform() if train else eval_transform()
    try:
        return datasets.ImageFolder(folder, transform=transform)
    except FileNotFoundError as err:  # no class folder or no image in them
        raise NCLayersError(
            f"split={split!r}: {err}; expected root/{split}/<class>/<image>"
        ) from err


def folder_loader(
    root: str | Path,
    split: str,
    batch_size: int,
    train: bool = False,
    workers: int = 2,
) -> tuple[DataLoader, list[str]]:
    """A DataLoader of (images, labels) over `root/split` and the class names in index order.

    train=True shuffles and augments (random resized crop and flip); otherwise the order is
    fixed and the images are centre-cropped. Images are float32 N x 3 x 224 x 224, normalised.
    """
    if batch_size < 1:
        raise NCLayersError(f"batch_size={batch_size}: must be a positive integer")
    if workers < 0:
        raise NCLayersError(f"workers={workers}: must be 0 (load in this process) or more")
    dataset = image_folder(root, split, train=train)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=False,
    )
    return loader, list(dataset.classes)
