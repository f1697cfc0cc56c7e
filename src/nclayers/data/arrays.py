"""In-memory image data sets: uint8 images, one or more labels views."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from nclayers.errors import NCLayersError


@dataclass
class ArrayDataset:
    """uint8 images N x C x H x W with named labels views (e.g. "clean", "noisy").

    `mean` and `std` are the per-channel normalisation constants in [0, 1] units.
    `index`: each sample's position in its source split (kept through subsets), which
    fixes per-sample randomness such as corruption noise and looks up label files.
    `clean_images`: for a corrupted data set, the same images uncorrupted (else None).
    """

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    split: str = ""
    meta: dict = field(default_factory=dict)
    index: torch.Tensor | None = None
    clean_images: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise NCLayersError(
                f"images: expected uint8 N x C x H x W, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        for view, y in self.labels.items():
            if y.shape != (len(self.images),):
                raise NCLayersError(
                    f"labels view {view!r}: shape {tuple(y.shape)} != ({len(self)},)"
                )
        if self.index is None:
            self.index = torch.arange(len(self))
        if self.index.shape != (len(self),):
            raise NCLayersError(f"index: shape {tuple(self.index.shape)} != ({len(self)},)")
        if self.clean_images is not None and self.clean_images.shape != self.images.shape:
            raise NCLayersError(
                f"clean_images: shape {tuple(self.clean_images.shape)} != images' "
                f"{tuple(self.images.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def views(self) -> list[str]:
        return list(self.labels)

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        index = torch.as_tensor(index, dtype=torch.long)
        labels = {k: v[index] for k, v in self.labels.items()}
        clean = self.clean_images[index] if self.clean_images is not None else None
        return replace(
            self, images=self.images[index], labels=labels, meta=dict(self.meta),
            index=self.index[index], clean_images=clean,
        )  # fmt: skip

    def with_views(self, views: dict[str, torch.Tensor]) -> ArrayDataset:
        return replace(self, labels=dict(views), meta=dict(self.meta))

    def clean_twin(self) -> ArrayDataset:
        """The same samples with their uncorrupted images (a corrupted data set only)."""
        if self.clean_images is None:
            raise NCLayersError(
                f"{self.name or 'data set'} {self.split}: holds no clean images beside the "
                "corrupted ones; load it with data.corruption=NAME (nclayers keeps the clean "
                "twin), not from pre-corrupted files"
            )
        meta = {k: v for k, v in self.meta.items() if not k.startswith("corruption")}
        return replace(self, images=self.clean_images, clean_images=None, meta=meta)


def balanced_subset(
    labels: torch.Tensor, size: int, num_classes: int, seed: int = 0
) -> torch.Tensor:
    """Indices of a class-balanced random subset of `size` samples (sorted, reproducible)."""
    if size >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    per_class = size // num_classes
    extra = size - per_class * num_classes
    picks = []
    for k in range(num_classes):
        idx = (labels == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        take = per_class + (1 if k < extra else 0)
        if take > len(idx):
            raise NCLayersError(
                f"subset={size}: class {k} has only {len(idx)} samples; ask for at most "
                f"{len(idx) * num_classes}"
            )
        picks.append(idx[:take])
    return torch.cat(picks).sort().values
