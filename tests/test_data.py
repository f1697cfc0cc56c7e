"""Data sets, labels views, noise and the device-resident batch pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nclayers.config import DataConfig
from nclayers.data import DeviceBatches, load_dataset, shuffle_labels
from nclayers.data.arrays import ArrayDataset, balanced_subset
from nclayers.data.batches import random_crop_flip


def test_digits_split_is_fixed_and_stratified():
    train = load_dataset(DataConfig(name="digits"), "train")
    test = load_dataset(DataConfig(name="digits"), "test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    counts = torch.bincount(test.labels["clean"], minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # stratified: 25% of 174..183 per class
    again = load_dataset(DataConfig(name="digits"), "test")
    assert torch.equal(again.images, test.images)
    # Normalisation constants match the training images.
    x = train.images.float() / 255
    assert x.mean().item() == pytest.approx(train.mean[0], abs=2e-3)
    assert x.std().item() == pytest.approx(train.std[0], abs=2e-3)


def test_shuffled_noise_keeps_class_counts():
    y = torch.arange(1000) % 10
    noisy = shuffle_labels(y, 0.4, seed=3)
    assert torch.equal(torch.bincount(noisy), torch.bincount(y))
    changed = (noisy != y).float().mean().item()
    assert 0.3 < changed <= 0.4  # shuffled among themselves: some keep their label
    assert torch.equal(noisy, shuffle_labels(y, 0.4, seed=3))
    assert torch.equal(shuffle_labels(y, 0.0), y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shuffle_labels(y, 1.5)


def test_noisy_training_split_has_two_views():
    ds = load_dataset(DataConfig(name="digits", noise=0.2), "train")
    assert ds.views == ["clean", "noisy"]
    test = load_dataset(DataConfig(name="digits", noise=0.2), "test")
    assert test.views == ["clean"]


def test_balanced_subset():
    y = torch.arange(1000) % 10
    idx = balanced_subset(y, 95, 10, seed=1)
    counts = torch.bincount(y[idx], minlength=10)
    assert counts.sum() == 95 and counts.max() - counts.min() <= 1
    scarce = torch.tensor([0] + [1] * 10 + [2] * 10)
    with pytest.raises(ValueError, match="class 0 has only 1"):
        balanced_subset(scarce, 9, 3)


def test_crop_offsets_and_flip_rate_are_uniform():
    """Chi-square goodness of fit of the 9 x 9 crop offsets and the flip rate."""
    n, side, pad = 8100, 8, 4
    # Every pixel holds its own position (row * 8 + col + 1), so a crop reveals its offset.
    code = (torch.arange(side * side, dtype=torch.float32) + 1).view(1, 1, side, side)
    out = random_crop_flip(
        code.expand(n, 1, side, side), pad, True, torch.Generator().manual_seed(0)
    )
    out = out[:, 0].numpy()
    offsets, flips = [], []
    for img in out:
        # The crop always overlaps the image by >= 4 x 4 pixels: take a non-zero pixel
        # whose right neighbour is non-zero too; +1 to the right means not flipped.
        i, j = np.argwhere((img[:, :-1] > 0) & (img[:, 1:] > 0))[0]
        flipped = img[i, j + 1] != img[i, j] + 1
        r, c = divmod(int(img[i, j]) - 1, side)
        col = side - 1 - j if flipped else j
        offsets.append((r - i + pad) * 9 + (c - col + pad))
        flips.append(flipped)
    flip_rate = float(np.mean(flips))
    assert abs(flip_rate - 0.5) < 0.025  # binomial standard error 0.0056
    counts = np.bincount(offsets, minlength=81)
    assert len(counts) == 81  # every offset lies in [0, 8] x [0, 8]
    expected = n / 81
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 131.0  # chi-square with 80 degrees of freedom, p = 0.0003


def test_device_batches_epochs_and_normalisation():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    ds = ArrayDataset(images, {"clean": torch.arange(50) % 5}, list("abcde"), (0.5, 0.4, 0.3),
                      (0.2, 0.25, 0.3))  # fmt: skip
    plain = DeviceBatches(ds, 16)
    xs = torch.cat([x for x, _ in plain])
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(xs, (images.float() - mean) / std, rtol=0, atol=0)
    shuffled = DeviceBatches(ds, 16, train=True, seed=4)
    shuffled.set_epoch(0)
    e0 = torch.cat([y for _, y in shuffled])
    shuffled.set_epoch(1)
    e1 = torch.cat([y for _, y in shuffled])
    shuffled.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in shuffled]), e0)  # reproducible per epoch
    assert not torch.equal(e0, e1)
    assert sorted(e0.tolist()) == sorted(ds.labels["clean"].tolist())
    # Evaluation shards of 3 ranks partition the samples exactly; training shards are
    # equal in length (lockstep DDP steps), padded by wrapping.
    shards = [DeviceBatches(ds, 8, shard=(r, 3)) for r in range(3)]
    seen = torch.cat([s._order() for s in shards])
    assert sorted(seen.tolist()) == list(range(50))
    assert [len(s) for s in shards] == [3, 3, 2]  # 17, 17, 16 samples in batches of 8
    train_shards = [DeviceBatches(ds, 8, train=True, shard=(r, 3)) for r in range(3)]
    orders = [s._order() for s in train_shards]
    assert [len(o) for o in orders] == [17, 17, 17]
    for batches in (*shards, *train_shards, DeviceBatches(ds, 8, drop_last=True)):
        assert sum(len(y) for _, y in batches) == batches.samples_per_epoch
    assert set(torch.cat(orders).tolist()) == set(range(50))


def test_cifar10_reader(shared_data):
    cfg = DataConfig(name="cifar10", dir=str(shared_data))
    test = load_dataset(cfg, "test")
    assert len(test) == 10000 and test.images.shape[1:] == (3, 32, 32)
    assert (
        test.classes[0] == "airplane"
        and torch.bincount(test.labels["clean"]).tolist() == [1000] * 10
    )
    sub = load_dataset(DataConfig(name="cifar10", dir=str(shared_data), train_subset=1000), "train")
    assert torch.bincount(sub.labels["clean"]).tolist() == [100] * 10
    # Pixel statistics of the JPEG-decoded export (DESIGN/README of the data).
    x = test.images[:2000].float() / 255
    assert x[:, 0].mean().item() == pytest.approx(0.49, abs=0.02)


def test_cifar10n_views(shared_data):
    ds = load_dataset(DataConfig(name="cifar10", dir=str(shared_data), noise="worse"), "train")
    clean, noisy = ds.labels["clean"], ds.labels["noisy"]
    assert (clean != noisy).float().mean().item() == pytest.approx(0.4021, abs=1e-3)


def test_missing_data_dir_is_explained(tmp_path):
    with pytest.raises(ValueError, match=r"data\.dir"):
        load_dataset(DataConfig(name="cifar10", dir=str(tmp_path)), "test")
    with pytest.raises(ValueError, match=r"data\.dir is not set"):
        load_dataset(DataConfig(name="cifar10"), "test")
    with pytest.raises(ValueError, match=r"data\.name=.mnist."):
        load_dataset(DataConfig(name="mnist"), "test")


def test_shuffled_share_is_rate_times_other_class_share():
    """A shuffled label changes unless it lands on its own class: 0.2 x 0.9 of 10 classes."""
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, 10, 5000))
    assert (shuffle_labels(y, 0.2, seed=1) != y).float().mean().item() == pytest.approx(
        0.18, abs=0.01
    )
