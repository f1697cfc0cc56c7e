"""Data sets, labels views and device-resident batches.

`load_dataset(data_cfg, split)` returns an `ArrayDataset` whose labels views are
"clean" (the true labels) and, on the training split with label noise, "noisy" (the
labels the model is trained on).
"""

from __future__ import annotations

from nclayers.data.arrays import ArrayDataset, balanced_subset
from nclayers.data.batches import DeviceBatches
from nclayers.data.noise import cifar10n_labels, shuffle_labels

DATASETS = ("digits", "cifar10", "cifar100")


def load_dataset(cfg, split: str) -> ArrayDataset:
    """Load `split` of the data set described by a `DataConfig`, with subset and noise."""
    name = cfg.name
    if name == "digits":
        from nclayers.data.digits import load_digits_split

        ds = load_digits_split(split)
    elif name in ("cifar10", "cifar100"):
        from nclayers.data.cifar import load_cifar_split

        if not cfg.dir:
            raise ValueError(
                f"data.dir is not set: {name} is read from a local folder; pass "
                "data.dir=PATH (the folder holding cifar-10-batches-py/)"
            )
        ds = load_cifar_split(name, split, cfg.dir, download=cfg.download)
    else:
        raise ValueError(f"data.name={name!r}: expected one of {DATASETS}")

    noise = cfg.noise
    if split == "train" and noise not in (None, "", 0, 0.0, "clean"):
        clean = ds.labels["clean"]
        if isinstance(noise, str):
            if name != "cifar10":
                raise ValueError(f"data.noise={noise!r}: CIFAR-10N labels exist for cifar10 only")
            noisy = cifar10n_labels(noise, cfg.dir)
        else:
            noisy = shuffle_labels(clean, float(noise), seed=cfg.noise_seed)
        ds = ds.with_views({"clean": clean, "noisy": noisy})

    size = cfg.train_subset if split == "train" else cfg.test_subset
    if size:
        ds = ds.subset(
            balanced_subset(ds.labels["clean"], int(size), ds.num_classes, cfg.subset_seed)
        )
    return ds


__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DeviceBatches",
    "balanced_subset",
    "cifar10n_labels",
    "load_dataset",
    "shuffle_labels",
]
