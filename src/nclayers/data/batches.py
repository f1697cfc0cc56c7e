"""Device-resident batches for array data sets.

The whole uint8 set is moved to the device once; every batch is then a slice, cropped,
flipped and normalised with batched tensor operations (no per-image Python work, no
worker processes). Each epoch draws a fresh permutation from a seeded generator, so a
run is reproducible and can resume at any epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from nclayers.data.arrays import ArrayDataset
from nclayers.errors import NCLayersError


def random_crop_flip(
    images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop (zero padding `padding`) and horizontal flip p=0.5, per sample.

    Works on any dtype; offsets and flips come from `generator` (on the images' device).
    """
    n, _, h, w = images.shape
    dev = images.device
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # n,1,h,1
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # n,1,1,w
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=dev)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if flip:
        flips = torch.rand(n, generator=generator, device=dev) < 0.5
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    return images


def epoch_order(
    n: int, shuffle: bool, seed: int, epoch: int, shard: tuple[int, int], train: bool
) -> torch.Tensor:
    """The positions one rank visits in one epoch (on the CPU): a permutation drawn from
    (seed, epoch) when `shuffle`, else 0..n-1; under torch.distributed every `world`-th
    of them from `rank` on. Training shards are padded by wrapping so that ranks step in
    lockstep; evaluation shards are disjoint and unpadded, so reduced statistics are exact.
    Shared by `DeviceBatches` and `FolderBatches`: both draw the same batches."""
    rank, world = shard
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    if world > 1:
        if train:
            per = -(-n // world)
            order = torch.cat([order, order[: per * world - n]])
        order = order[rank::world]
    return order


def shard_size(n: int, shard: tuple[int, int], train: bool) -> int:
    """Samples one rank draws per epoch (see `epoch_order`)."""
    rank, world = shard
    if world == 1:
        return n
    if train:
        return -(-n // world)
    return len(range(rank, n, world))


class DeviceBatches:
    """Iterate (images, labels) batches of an `ArrayDataset` held on `device`.

    images: float32 (or `dtype`, e.g. bfloat16), normalised; labels: the tensor of the
    single view, or a dict view -> tensor when the data set has several views (or `views`
    names them).
    Set `epoch` (or call `set_epoch`) before iterating to draw that epoch's permutation.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        train: bool = False,
        shuffle: bool | None = None,
        crop_padding: int = 4,
        flip: bool = True,
        seed: int = 0,
        views: list[str] | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size < 1:
            raise NCLayersError(f"batch_size={batch_size}: must be a positive integer")
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        views = views or dataset.views
        missing = [v for v in views if v not in dataset.labels]
        if missing:
            raise NCLayersError(f"views {missing}: data set has views {dataset.views}")
        self.labels = {v: dataset.labels[v].to(self.device) for v in views}
        self.views = views
        self.mean = torch.tensor(dataset.mean, device=self.device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(dataset.std, device=self.device).view(1, -1, 1, 1) * 255.0
        self.batch_size = batch_size
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.crop_padding = crop_padding if train else 0
        self.flip = flip and train
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world = shard
        self.channels_last = channels_last
        self.dtype = dtype
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.images)
        order = epoch_order(
            n, self.shuffle, self.seed, self.epoch, (self.rank, self.world), self.train
        )
        return order.to(self.device)

    @property
    def shard_size(self) -> int:
        """Samples this rank draws per epoch (training shards are padded to equal size)."""
        return shard_size(len(self.images), (self.rank, self.world), self.train)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank's batches hold in an epoch, after `drop_last`."""
        if self.drop_last:
            return len(self) * self.batch_size
        return self.shard_size

    def __len__(self) -> int:
        n = self.shard_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]]:
        order = self._order()
        gen = torch.Generator(device=self.device).manual_seed(
            self.seed * 7_919 + self.epoch * 104_729 + self.rank
        )
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx]
            if self.train:
                x = random_crop_flip(x, self.crop_padding, self.flip, gen)
            x = (x.float() - self.mean) / self.std
            if self.dtype != torch.float32:
                x = x.to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            labels = {v: y[idx] for v, y in self.labels.items()}
            yield x, (labels if len(labels) > 1 else next(iter(labels.values())))
