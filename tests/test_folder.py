"""ImageNet-style folders read by `folder_loader`, on images the test writes itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from nclayers.data.folder import IMAGENET_MEAN, IMAGENET_STD, folder_loader

# Solid colours per class, so a centre crop of any image has a known value.
COLOURS = {"cat": (200, 40, 10), "dog": (10, 120, 250)}


def make_folder(root: Path, per_class: int = 3) -> Path:
    sizes = [(300, 260), (260, 400), (256, 256)]
    for split in ("train", "val"):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("RGB", sizes[i % len(sizes)], colour)
                # JPEG as in ImageNet (upper-case suffix) and PNG: ImageFolder reads both.
                suffix = ".JPEG" if i % 2 == 0 else ".png"
                image.save(folder / f"{name}_{i}{suffix}", quality=100)
    return root


def expected_pixel(colour: tuple[int, int, int]) -> torch.Tensor:
    rgb = torch.tensor(colour, dtype=torch.float32) / 255
    return (rgb - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_eval_split_is_centre_cropped_normalised_and_ordered(tmp_path):
    loader, classes = folder_loader(make_folder(tmp_path), "val", batch_size=4, workers=0)
    assert classes == ["cat", "dog"]
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 2]
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.shape == (6, 3, 224, 224) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    for image, label in zip(images, labels, strict=True):
        centre = image[:, 100:124, 100:124].mean(dim=(1, 2))
        # JPEG shifts a solid colour by a level or two; 0.05 is ~3 levels after normalising.
        torch.testing.assert_close(
            centre, expected_pixel(COLOURS[classes[label]]), atol=0.05, rtol=0
        )


def test_train_split_augments_and_shuffles_with_workers(tmp_path):
    torch.manual_seed(0)
    loader, _ = folder_loader(make_folder(tmp_path, 4), "train", 3, train=True, workers=2)
    labels = []
    for images, y in loader:
        assert images.shape[1:] == (3, 224, 224)
        labels += y.tolist()
    assert sorted(labels) == [0] * 4 + [1] * 4
    assert labels != sorted(labels)  # shuffled (fixed seed: not in folder order)


def test_missing_split_and_empty_folder_are_explained(tmp_path):
    root = make_folder(tmp_path)
    with pytest.raises(ValueError, match=r"split='test'.*holds \['train', 'val'\]"):
        folder_loader(root, "test", 4)
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="split='empty'"):
        folder_loader(root, "empty", 4)
    with pytest.raises(ValueError, match="batch_size=0"):
        folder_loader(root, "val", 0)
