"""Where the probe's training features come from: the frozen backbone with its taps, and
the two sources the heads train on.

- `Stream`: the backbone runs on every training batch of every epoch, with the data
  set's augmentation when `augment` (CIFAR: random crop and flip; image folders:
  mmpretrain's random resized crop and flip);
- `FeatureCache`: every block's pooled training features computed once (one pass, no
  augmentation) and stored in bf16 (`cache_dtype`): on the device up to
  `cache_budget_gb`, beyond it in a memory-mapped file under `cache_dir` (a ResNet50's
  16 blocks are 15,104 values per image: about 39 GB for ImageNet's training split);
  `PositionCache` holds one row per next-token position instead.

Both draw the same batches (the seeded per-epoch permutation that `DeviceBatches` and
`FolderBatches` share), so without augmentation and with a float32 cache they train the
same heads up to float rounding. `Moments` and `stream_moments` give the per-feature
mean and variance for standardisation.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nclayers.data import ArrayDataset, DeviceBatches, make_batches
from nclayers.errors import NCLayersError
from nclayers.runtime import all_sum, autocast
from nclayers.runtime import world as world_of
from nclayers.taps import Block, Taps, run_model

GB = 1e9


class Moments:
    """Per-feature count, mean and sum of squared deviations in float64, merged batch by
    batch with Chan's formula (exact for features far from the origin)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        nb = x.shape[0]
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2b + delta**2 * (self.n * nb / n)
        self.n = n

    def reduce(self, world: int) -> None:
        if world == 1:
            return
        total = all_sum(torch.tensor([float(self.n)], device=self.mean.device))
        gmean = all_sum(self.mean * self.n) / total
        self.m2 = all_sum(self.m2 + self.n * (self.mean - gmean) ** 2)
        self.mean, self.n = gmean, int(total.item())

    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1)


class Backbone:
    """The frozen model with taps: `features(x)` -> B x sum(dims) pooled float32."""

    def __init__(
        self, model: nn.Module, blocks: list[Block], amp: bool, cls_id: int | None = None
    ) -> None:
        self.model, self.blocks, self.amp = model, blocks, amp
        self.device = next(model.parameters()).device
        self._out: list[torch.Tensor | None] = [None] * len(blocks)
        self.taps = Taps(blocks, self._sink, cls_id)  # cls_id: the data's (pool "cls")

    def _sink(self, index: int, feats: torch.Tensor) -> None:
        self._out[index] = feats

    @torch.no_grad()
    def features(self, x) -> torch.Tensor:
        """Images, or a tokenised batch (its attention mask goes to the taps)."""
        with autocast(self.device, self.amp):
            run_model(self.model, x, self.taps)
        if any(f is None for f in self._out):
            missing = [b.name for b, f in zip(self.blocks, self._out, strict=True) if f is None]
            raise NCLayersError(
                f"blocks {missing[:5]} did not run in the model's forward pass: take the "
                "blocks from this model (find_blocks(model, ...))"
            )
        out = torch.cat(self._out, dim=1)  # type: ignore[arg-type]
        self._out = [None] * len(self.blocks)
        return out


class Stream:
    """Training features recomputed by the backbone on every batch (with augmentation)."""

    def __init__(
        self, backbone, train, view, batch_size, augment, seed, shard, channels_last,
        next_token=None,
    ) -> None:  # fmt: skip
        self.backbone = backbone
        self.batches = make_batches(
            train, batch_size, backbone.device, train=True, shuffle=True, augment=augment,
            seed=seed, views=[view], shard=shard, channels_last=channels_last,
            next_token=next_token,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def skipped(self) -> int:
        """Unreadable files left out (image folders with skip_bad)."""
        return getattr(self.batches, "skipped", 0)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.batches:  # next-token labels: N x T, one per position
            yield self.backbone.features(x), y.reshape(-1)


NUMPY_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class FeatureCache:
    """Every training sample's pooled features, N x width in `dtype` (bf16 by default),
    computed once: on the device within `budget_gb`, else in a memory-mapped file under
    `cache_dir` (on the CPU). Batches are drawn in stream mode's order: `DeviceBatches`
    over a 1-pixel stand-in data set whose labels view is the sample's row (no image
    work). Rows of files skipped as unreadable are never drawn."""

    def __init__(
        self, backbone, train, view, width, batch_size, seed, shard, channels_last,
        budget_gb: float, cache_dir: str | Path | None, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        if dtype not in NUMPY_STORAGE:
            raise NCLayersError(f"cache_dtype={dtype}: use torch.bfloat16, float16 or float32")
        self.backbone, self.train, self.view, self.dtype = backbone, train, view, dtype
        self.shard, self.channels_last, self.seed = shard, channels_last, seed
        self.n, self.width, self.batch_size = self._capacity(), width, batch_size
        need = self.n * width * dtype.itemsize
        self.path: Path | None = None
        self.where = backbone.device
        if need > budget_gb * GB:
            self.where = torch.device("cpu")
            self.path = memmap_path(need, budget_gb, cache_dir, shard[0])
        self.features: torch.Tensor | None = None
        self.labels = self._labels()
        self.rows = torch.arange(self.n)
        self.batches = self._draws(self.rows)
        self.skipped = 0

    def _capacity(self) -> int:
        """Rows of the cache: one per training sample."""
        return len(self.train)

    def _labels(self) -> torch.Tensor:
        return self.train.labels[self.view].to(self.where)

    def _draws(self, rows: torch.Tensor) -> DeviceBatches:
        stand_in = ArrayDataset(
            images=torch.zeros(len(rows), 1, 1, 1, dtype=torch.uint8), labels={"row": rows},
            classes=["row"], mean=(0.0,), std=(1.0,),
        )  # fmt: skip
        return DeviceBatches(
            stand_in, self.batch_size, self.where, train=True, shuffle=True, crop_padding=0,
            flip=False, seed=self.seed, shard=self.shard,
        )  # fmt: skip

    def _allocate(self) -> torch.Tensor:
        if self.path is None:
            return torch.zeros(self.n, self.width, dtype=self.dtype, device=self.where)
        storage = NUMPY_STORAGE[self.dtype]
        array = np.memmap(self.path, dtype=storage, mode="w+", shape=(self.n, self.width))
        cache = torch.from_numpy(array)  # a new file reads as zeros
        return cache.view(self.dtype) if storage is np.uint16 else cache

    def fill(self, batch_size: int, bar) -> None:
        """One pass: each rank computes a disjoint strided part; an all_reduce of the
        zero-filled rest gives every rank all rows (x + 0 + 0 is exact)."""
        self.features = cache = self._allocate()
        filled = torch.zeros(self.n, dtype=torch.int32, device=self.where)
        indexed = self.train.with_views(
            {self.view: self.train.labels[self.view], "row": torch.arange(self.n)}
        )
        batches = make_batches(
            indexed, batch_size, self.backbone.device, views=[self.view, "row"],
            shard=self.shard, channels_last=self.channels_last,
        )  # fmt: skip
        for x, ys in batches:
            rows = ys["row"].to(self.where)
            cache[rows] = self.backbone.features(x).to(self.where, self.dtype)
            filled[rows] = 1
            if bar is not None:
                bar.update(1)
        if self.shard[1] > 1:  # row chunks: bounded memory, and a memory-mapped cache works
            step = max(1, (1 << 26) // max(self.width, 1))
            for start in range(0, self.n, step):
                chunk = cache[start : start + step].to(self.backbone.device, torch.float32)
                dist.all_reduce(chunk)
                cache[start : start + step] = chunk.to(self.where, self.dtype)
            filled = all_sum(filled.to(self.backbone.device)).to(self.where)
        self.rows = filled.nonzero().flatten().cpu()  # once per probe, after the pass
        self.skipped = self.n - len(self.rows)
        if self.skipped:  # unreadable files (skip_bad): never drawn
            self.batches = self._draws(self.rows)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and variance over the cache (every rank holds all rows)."""
        moments = Moments(self.width, self.backbone.device)
        step = max(1, (1 << 24) // max(self.width, 1))
        for start in range(0, len(self.rows), step):
            rows = self.rows[start : start + step].to(self.where)
            moments.update(self.features[rows].to(self.backbone.device))
        return moments.mean, moments.variance()

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.backbone.device
        for _, rows in self.batches:
            feats = self.features[rows].to(device, non_blocking=True).float()
            yield feats, self.labels[rows].to(device, non_blocking=True)

    def close(self) -> None:
        self.features = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class PositionCache(FeatureCache):
    """Next-token probes: one row per position whose next token is a class, computed in
    one pass of one process (room for every token of the split; the rows filled are
    drawn). The fill pass reads how many positions each batch keeps (one host sync per
    batch, once); the epochs then draw the rows like any cache."""

    def __init__(self, backbone, train, next_token, width, batch_size, seed, channels_last,
                 budget_gb, cache_dir, dtype) -> None:  # fmt: skip
        self.next_token = next_token
        super().__init__(backbone, train, None, width, batch_size, seed, (0, 1), channels_last,
                         budget_gb, cache_dir, dtype)  # fmt: skip

    def _capacity(self) -> int:
        return int(self.train.lengths.sum())

    def _labels(self) -> torch.Tensor:
        return torch.full((self.n,), -1, dtype=torch.int64, device=self.where)

    def fill(self, batch_size: int, bar) -> None:
        self.features = cache = self._allocate()
        batches = make_batches(self.train, batch_size, self.backbone.device,
                               next_token=self.next_token)  # fmt: skip
        filled = 0
        for x, y in batches:
            feats = self.backbone.features(x)
            keep = (y.reshape(-1) >= 0).nonzero().flatten()
            end = filled + len(keep)
            cache[filled:end] = feats[keep].to(self.where, self.dtype)
            self.labels[filled:end] = y.reshape(-1)[keep].to(self.where)
            filled = end
            if bar is not None:
                bar.update(1)
        self.rows = torch.arange(filled)
        self.batches = self._draws(self.rows)


def memmap_path(need: int, budget_gb: float, cache_dir, rank: int) -> Path:
    fix = (
        f"raise cache_budget_gb (probe.cache_budget_gb) to {math.ceil(need / GB * 100) / 100} "
        "or more, or use mode='stream' (probe.mode=stream)"
    )
    if cache_dir is None:
        raise NCLayersError(
            f"cache: the features need {need / GB:.2f} GB, over cache_budget_gb={budget_gb}, "
            f"and no cache_dir is given for a memory-mapped file: pass cache_dir, or {fix}"
        )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
    if free < need:
        raise NCLayersError(
            f"cache: the features need {need / GB:.2f} GB, over cache_budget_gb={budget_gb}, "
            f"and cache_dir={str(cache_dir)!r} has only {free / GB:.2f} GB free: free disk "
            f"space, pass another cache_dir, or {fix}"
        )
    return cache_dir / f"probe_features.rank{rank}.bin"


def stream_moments(
    backbone, train, view, width, batch_size, channels_last, world, bar
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and variance of the unaugmented training features, one pass."""
    rank, _ = world_of()
    batches = make_batches(
        train, batch_size, backbone.device, views=[view], shard=(rank, world),
        channels_last=channels_last,
    )  # fmt: skip
    moments = Moments(width, backbone.device)
    for x, _ in batches:
        moments.update(backbone.features(x))
        if bar is not None:
            bar.update(1)
    moments.reduce(world)
    return moments.mean, moments.variance()


__all__ = ["Backbone", "FeatureCache", "Moments", "PositionCache", "Stream", "stream_moments"]
