"""The official CIFAR-10-C release (Hendrycks & Dietterich), read from a local folder.

Layout of the release (zenodo.org/record/2535967): `<corruption>.npy`, uint8 of shape
(50000, 32, 32, 3): the 10,000 CIFAR-10 test images at severity 1, then 2, ... 5; and
`labels.npy` (50000,) of the same order. Files with 5 x n rows (n images per severity)
are read the same way. `data.name=cifar10c` reads the test split from
there (`data.corruption`, `data.severity`); its training split is the clean CIFAR-10
training set (the robustness protocol: train clean, test corrupted), from the same
data.dir.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nclayers.data.arrays import ArrayDataset
from nclayers.data.cifar import CIFAR10_MEAN, CIFAR10_STD, load_cifar_split
from nclayers.data.corrupt import check_corruption, parse_severity
from nclayers.errors import NCLayersError

FOLDER = "CIFAR-10-C"
SEVERITIES = 5
SOURCE = "https://zenodo.org/record/2535967 (CIFAR-10-C.tar)"
CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def find_cifar10c_root(data_dir: str | Path) -> Path:
    data_dir = Path(data_dir).expanduser()
    for cand in (data_dir / FOLDER, data_dir):
        if (cand / "labels.npy").is_file():
            return cand
    raise NCLayersError(
        f"data.dir={str(data_dir)!r} holds no {FOLDER}/labels.npy; unpack the CIFAR-10-C "
        f"release ({SOURCE}) there, or point data.dir at the folder holding {FOLDER}/"
    )


def _load_npy(path: Path, shape_tail: tuple[int, ...]) -> np.ndarray:
    """A memory-mapped .npy of uint8 (N, *shape_tail), checked whole before use."""
    how = f"replace it with a good copy from {SOURCE}"
    if not path.is_file():
        raise NCLayersError(f"{path} is missing; {how}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise NCLayersError(
            f"{path}: truncated or unreadable ({type(err).__name__}: {err}); {how}"
        ) from err
    if arr.dtype != np.uint8 or arr.shape[1:] != shape_tail or len(arr) % SEVERITIES:
        raise NCLayersError(
            f"{path}: expected uint8 of shape (5 x 10000, "
            f"{', '.join(map(str, shape_tail))}), got {arr.dtype} {arr.shape}; {how}"
        )
    return arr


def load_cifar10c_split(
    split: str, data_dir: str | Path, corruption: str, severity, clean_dir: str | Path | None = None
) -> ArrayDataset:
    """Test split: the release's images of `corruption` at `severity` (1..5 or L1..L3).
    Train split: clean CIFAR-10 training images from `clean_dir` (default `data_dir`)."""
    if split == "train":
        ds = load_cifar_split("cifar10", "train", clean_dir or data_dir)
        ds.name = "cifar10c"
        return ds
    if split != "test":
        raise NCLayersError(f"split={split!r}: expected 'train' or 'test'")
    if not corruption:
        raise NCLayersError(
            "data.name=cifar10c needs data.corruption=NAME (e.g. gaussian_noise) and "
            "data.severity=1..5"
        )
    check_corruption(corruption)
    severity = parse_severity(severity)
    root = find_cifar10c_root(data_dir)
    images = _load_npy(root / f"{corruption}.npy", (32, 32, 3))
    labels = _load_npy(root / "labels.npy", ())
    if len(labels) != len(images):
        raise NCLayersError(
            f"{root / 'labels.npy'}: {len(labels)} labels for {len(images)} images in "
            f"{corruption}.npy; replace them with good copies from {SOURCE}"
        )
    per = len(images) // SEVERITIES
    rows = slice((severity - 1) * per, severity * per)
    x = torch.from_numpy(np.array(images[rows])).permute(0, 3, 1, 2).contiguous()  # a copy
    y = torch.from_numpy(np.asarray(labels[rows]).astype(np.int64))
    if int(y.min()) < 0 or int(y.max()) >= len(CLASSES):
        raise NCLayersError(f"{root / 'labels.npy'}: labels outside 0..9; {SOURCE}")
    return ArrayDataset(
        images=x,
        labels={"clean": y},
        classes=list(CLASSES),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        name="cifar10c",
        split="test",
        meta={"root": str(root), "corruption": corruption, "severity": severity},
    )
