"""The embedded default data set: scikit-learn's bundled handwritten digits.

1,797 real 8x8 grey images ship inside scikit-learn, so nothing is downloaded. They are
upsampled once to 32x32 and repeated to three channels so the CIFAR models take them,
and split once, stratified, with a fixed seed (1,347 train / 450 test).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nclayers.data.arrays import ArrayDataset

TEST_FRACTION = 0.25
SPLIT_SEED = 0


def load_digits_split(split: str, size: int = 32) -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = (bunch.images / 16.0).astype(np.float32)  # values 0..16 -> [0, 1]
    labels = bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        index, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    x = torch.from_numpy(pixels[idx]).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    # Channel statistics of the training split (identical channels).
    return ArrayDataset(
        images=images,
        labels={"clean": torch.from_numpy(labels[idx])},
        classes=[str(d) for d in range(10)],
        mean=(0.3052,) * 3,
        std=(0.3236,) * 3,
        name="digits",
        split=split,
    )
