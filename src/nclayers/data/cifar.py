"""CIFAR-10/100 from the official "python version" batch files in a local folder."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from nclayers.data.arrays import ArrayDataset
from nclayers.errors import NCLayersError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
        "tv": "CIFAR10",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
        "tv": "CIFAR100",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}


def _good_copy(name: str) -> str:
    layout = _LAYOUT[name]
    return (
        f"download {layout['url']} (md5 {layout['md5']}) and unpack it into data.dir, "
        "or delete the folder and set data.download=true when online"
    )


def _unpickle(path: Path, name: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as err:
        raise NCLayersError(
            f"{path}: truncated or unreadable ({type(err).__name__}: {err}); replace it with a "
            f"good copy: {_good_copy(name)}"
        ) from err
    if not isinstance(obj, dict):
        raise NCLayersError(
            f"{path}: not a CIFAR batch (a {type(obj).__name__}); {_good_copy(name)}"
        )
    return obj


def _batch(path: Path, name: str) -> tuple[np.ndarray, list[int]]:
    batch = _unpickle(path, name)
    key = _LAYOUT[name]["labels"]
    data = np.asarray(batch.get("data", ()), dtype=np.uint8)
    labels = list(batch.get(key, ()))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise NCLayersError(
            f"{path}: not a whole CIFAR batch (data {data.shape}, {len(labels)} labels); "
            f"replace it with a good copy: {_good_copy(name)}"
        )
    return data, labels


def find_cifar_root(name: str, data_dir: str | Path) -> Path:
    """The folder holding the batch files: `data_dir` itself or its standard sub-folder."""
    layout = _LAYOUT[name]
    data_dir = Path(data_dir).expanduser()
    for cand in (data_dir / layout["folder"], data_dir):
        if (cand / layout["test"][0]).is_file():
            return cand
    raise NCLayersError(
        f"data.dir={str(data_dir)!r} holds no {name} batches (looked for "
        f"{layout['folder']}/{layout['test'][0]}); point data.dir at the folder that contains "
        f"{layout['folder']}/, or set data.download=true when online"
    )


def load_cifar_split(
    name: str, split: str, data_dir: str | Path, download: bool = False
) -> ArrayDataset:
    if name not in _LAYOUT:
        raise NCLayersError(f"dataset={name!r}: expected one of {sorted(_LAYOUT)}")
    if split not in ("train", "test"):
        raise NCLayersError(f"split={split!r}: expected 'train' or 'test'")
    layout = _LAYOUT[name]
    try:
        root = find_cifar_root(name, data_dir)
    except FileNotFoundError:
        if not download:
            raise
        import torchvision

        getattr(torchvision.datasets, layout["tv"])(str(data_dir), download=True)
        root = find_cifar_root(name, data_dir)
    data, labels = [], []
    for fname in layout[split]:
        if not (root / fname).is_file():
            raise NCLayersError(f"{root / fname} is missing; {_good_copy(name)}")
        batch_data, batch_labels = _batch(root / fname, name)
        data.append(batch_data)
        labels.extend(batch_labels)
    meta_file, meta_key = layout["meta"]
    meta = _unpickle(root / meta_file, name)
    if meta_key not in meta:
        raise NCLayersError(f"{root / meta_file}: holds no {meta_key!r}; {_good_copy(name)}")
    classes = list(meta[meta_key])
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
    c10 = name == "cifar10"
    return ArrayDataset(
        images=images,
        labels={"clean": torch.tensor(labels, dtype=torch.long)},
        classes=classes,
        mean=CIFAR10_MEAN if c10 else CIFAR100_MEAN,
        std=CIFAR10_STD if c10 else CIFAR100_STD,
        name=name,
        split=split,
        meta={"root": str(root)},
    )
