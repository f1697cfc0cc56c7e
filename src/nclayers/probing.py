"""Linear probes on every block at once (paper A.1): frozen backbone, one head per block.

`probe(model, train, test, num_classes)` freezes the model (eval mode, no gradient, so
neither its weights nor its BatchNorm statistics change), pools every block's output with
the taps, and trains one linear classifier per block on the pooled features, all of them
from the same forward pass. The heads live side by side in one `ProbeHeads` module: their
weights are one flat parameter, so every batch costs one batched matmul, one
cross-entropy, one backward and one SGD step for all heads together, and under
torch.distributed one all_reduce. The loss is the sum of the heads' own mean losses, so
each head receives exactly the gradient it would get if it were trained alone; SGD's
momentum and weight decay act element-wise, so each head also has its own optimiser state.

The splits are what the data layer gives: in-memory `ArrayDataset`s (CIFAR, digits),
`FolderDataset`s (ImageNet and other image folders) or tokenised `TextData` (Hugging Face
models: the batch's attention mask reaches the pools), batched by `make_batches`. With
`next_token` (NextTokenClasses, causal language models) every position whose next token
is a class is a sample (blocks pooled "token"): the heads learn and are scored on those
positions only (a position labelled -1 counts nothing); the cache holds one row per
such position.

Two modes end in the same `ProbeResult`:
- "stream": the backbone runs on every training batch of every epoch, with the data
  set's augmentation when `augment=True` (CIFAR: random crop and flip; image folders:
  mmpretrain's random resized crop and flip);
- "cache": every block's pooled training features are computed once (one pass, no
  augmentation) and stored in bf16 (`cache_dtype`): on the device up to
  `cache_budget_gb`, beyond it in a memory-mapped file under `cache_dir` (a ResNet50's
  16 blocks are 15,104 values per image: about 39 GB for ImageNet's training split);
  the heads then train on them in float32. The default when `augment=False`.

Both draw the same batches (the seeded per-epoch permutation that `DeviceBatches` and
`FolderBatches` share), so without augmentation and with a float32 cache they train the
same heads up to float rounding.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from nclayers.data import ArrayDataset, DeviceBatches, FolderDataset, TextData, make_batches
from nclayers.errors import NCLayersError
from nclayers.models.blocks import find_blocks
from nclayers.runtime import all_sum, autocast, counter
from nclayers.runtime import world as world_of
from nclayers.table import Table
from nclayers.taps import Block, Taps, forward_order, probe_shapes, run_model

MODES = ("auto", "stream", "cache")
Split = ArrayDataset | FolderDataset | TextData
GB = 1e9
_EPS = 1e-8  # added to each feature's variance before standardising (constant features)


# ----------------------------------------------------------------------------- heads
class ProbeHeads(nn.Module):
    """One linear classifier per block, stored together.

    Input: the blocks' pooled features concatenated, B x sum(dims) (float32). Each
    block's columns are placed into a zero-padded H x B x max(dims) tensor and one
    batched matmul gives every head's logits, H x B x K. Padded weight entries see zero
    inputs, so their gradient is zero and (zero-initialised) they stay zero. With
    `standardize`, features are first shifted and scaled per feature by `mean`/`scale`
    (training statistics); `linear()` folds this into plain `nn.Linear` heads.

    Zero initialisation: the probe is a convex problem, so the start does not matter for
    the optimum, and zero makes the result independent of random state and of the rank.
    """

    def __init__(self, dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.dims = [int(d) for d in dims]
        self.num_classes = int(num_classes)
        h, dmax, k = len(self.dims), max(self.dims), self.num_classes
        self._split = h * dmax * k
        # One flat parameter: one gradient tensor to all_reduce, one tensor for SGD.
        self.theta = nn.Parameter(torch.zeros(self._split + h * k))
        pos = torch.cat([i * dmax + torch.arange(d) for i, d in enumerate(self.dims)])
        self.register_buffer("pos", pos, persistent=False)
        self.register_buffer("mean", torch.zeros(sum(self.dims)))
        self.register_buffer("scale", torch.ones(sum(self.dims)))

    @property
    def weight(self) -> torch.Tensor:
        """H x max(dims) x K (a view of `theta`)."""
        h, k = len(self.dims), self.num_classes
        return self.theta[: self._split].view(h, -1, k)

    @property
    def bias(self) -> torch.Tensor:
        """H x 1 x K (a view of `theta`)."""
        return self.theta[self._split :].view(len(self.dims), 1, self.num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, h = features.shape[0], len(self.dims)
        x = (features - self.mean) * self.scale
        padded = x.new_zeros(n, h * max(self.dims)).index_copy_(1, self.pos, x)
        padded = padded.view(n, h, -1).transpose(0, 1)
        return torch.baddbmm(self.bias, padded, self.weight)

    def set_standardization(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.mean.copy_(mean.to(self.mean))
        self.scale.copy_(torch.rsqrt(var.to(self.scale) + _EPS))

    def linear(self) -> list[nn.Linear]:
        """The heads as `nn.Linear` on each block's raw pooled feature (standardisation
        folded in): `linear()[l](pooled_l)` equals `forward(features)[l]`."""
        heads, start = [], 0
        for i, d in enumerate(self.dims):
            w = self.weight[i, :d].detach().T * self.scale[start : start + d]
            b = self.bias[i, 0].detach() - w @ self.mean[start : start + d]
            layer = nn.Linear(d, self.num_classes).to(w)
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            heads.append(layer)
            start += d
        return heads


# ----------------------------------------------------------------------------- helpers
def _resolve_blocks(model: nn.Module, blocks) -> list[Block]:
    if isinstance(blocks, str) or (
        isinstance(blocks, Sequence) and blocks and not isinstance(blocks[0], Block)
    ):
        blocks = find_blocks(model, blocks)
    blocks = list(blocks)
    if not blocks:
        raise NCLayersError("blocks: no block to probe; see `nclayers blocks MODEL`")
    return blocks


def _check_split(ds: Split, name: str, view: str, num_classes: int, next_token=None) -> None:
    if not isinstance(ds, (ArrayDataset, FolderDataset, TextData)):
        raise NCLayersError(
            f"{name}: expected an ArrayDataset, FolderDataset or TextData (what "
            f"nclayers.data.load_dataset(cfg, '{name}') returns), got {type(ds).__name__}"
        )
    if len(ds) == 0:
        raise NCLayersError(
            f"{name}: the split is empty; check data.{name}_subset and the data folder"
        )
    if next_token is not None:  # the classes are the next tokens, not labels
        if not isinstance(ds, TextData) or next_token.num_classes != num_classes:
            raise NCLayersError(
                f"next_token: {next_token.num_classes} next-token classes of text, but the "
                f"{name} split is a {type(ds).__name__} and num_classes={num_classes}"
            )
        return
    if view not in ds.labels:
        raise NCLayersError(f"view={view!r}: the {name} split has labels views {ds.views}")
    y = ds.labels[view]
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise NCLayersError(
            f"{name}: labels span [{int(y.min())}, {int(y.max())}] but num_classes="
            f"{num_classes}; pass the data set's number of classes"
        )


class _Moments:
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


class _Backbone:
    """The frozen model with taps: `features(x)` -> B x sum(dims) pooled float32."""

    def __init__(self, model: nn.Module, blocks: list[Block], amp: bool) -> None:
        self.model, self.blocks, self.amp = model, blocks, amp
        self.device = next(model.parameters()).device
        self._out: list[torch.Tensor | None] = [None] * len(blocks)
        self.taps = Taps(blocks, self._sink)

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


# ----------------------------------------------------------------------------- sources
class _Stream:
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


_NUMPY_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class _Cache:
    """Every training sample's pooled features, N x width in `dtype` (bf16 by default),
    computed once: on the device within `budget_gb`, else in a memory-mapped file under
    `cache_dir` (on the CPU). Batches are drawn in stream mode's order: `DeviceBatches`
    over a 1-pixel stand-in data set whose labels view is the sample's row (no image
    work). Rows of files skipped as unreadable are never drawn."""

    def __init__(
        self, backbone, train, view, width, batch_size, seed, shard, channels_last,
        budget_gb: float, cache_dir: str | Path | None, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        if dtype not in _NUMPY_STORAGE:
            raise NCLayersError(f"cache_dtype={dtype}: use torch.bfloat16, float16 or float32")
        self.backbone, self.train, self.view, self.dtype = backbone, train, view, dtype
        self.shard, self.channels_last, self.seed = shard, channels_last, seed
        self.n, self.width, self.batch_size = self._capacity(), width, batch_size
        need = self.n * width * dtype.itemsize
        self.path: Path | None = None
        self.where = backbone.device
        if need > budget_gb * GB:
            self.where = torch.device("cpu")
            self.path = _memmap_path(need, budget_gb, cache_dir, shard[0])
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
        storage = _NUMPY_STORAGE[self.dtype]
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
        moments = _Moments(self.width, self.backbone.device)
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


class _PositionCache(_Cache):
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


def _memmap_path(need: int, budget_gb: float, cache_dir, rank: int) -> Path:
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


# ----------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate_heads(
    model: nn.Module,
    heads: ProbeHeads,
    blocks: Sequence[Block],
    test: Split,
    view: str = "clean",
    batch_size: int = 500,
    amp: bool = True,
    channels_last: bool = False,
    progress: bool = False,
    next_token=None,
) -> tuple[list[float], int]:
    """Each head's accuracy on `test` (clean labels by default; with `next_token` the
    positions whose next token is a class): (accuracies, samples), summed over all
    torch.distributed ranks (each evaluates its disjoint shard)."""
    rank, world = world_of()
    was_training = model.training
    model.eval()
    backbone = _Backbone(model, list(blocks), amp)
    batches = make_batches(
        test, batch_size, backbone.device, views=[view], shard=(rank, world),
        channels_last=channels_last, next_token=next_token,
    )  # fmt: skip
    sums = torch.zeros(len(heads.dims) + 1, dtype=torch.float64, device=backbone.device)
    bar = counter(len(batches), progress, "probe test", unit="batch")
    try:
        with backbone.taps:
            for x, y in batches:
                y = y.reshape(-1)  # next-token labels: one per position, -1 left out
                logits = heads(backbone.features(x))
                sums[:-1] += (logits.argmax(-1) == y).sum(1)  # -1 is never a class
                sums[-1] += (y >= 0).sum() if next_token is not None else len(y)
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    sums = all_sum(sums).tolist()
    return [c / sums[-1] for c in sums[:-1]], int(sums[-1])


# ----------------------------------------------------------------------------- result
class ProbeResult(Table):
    """What `probe` returns: one row per block (run, split "test", view, layer, block,
    dim, n = test samples, probe_acc), and

    history: a Table, per epoch and block: epoch, layer, block, lr, loss and train_acc
        (mean loss and accuracy on that epoch's training batches);
    heads: the trained `ProbeHeads` (`heads.linear()`: one nn.Linear per block);
    state: the final state, as given to `on_epoch` (`heads_state(result)` is what to save);
    mode ("stream" or "cache"), epochs, resumed_from (epochs done before this call),
    train_samples, test_samples, world (processes), seconds (all), train_seconds (the
    passes and epochs before testing), skipped (unreadable files left out, image folders
    with skip_bad).
    """

    def __init__(
        self, rows, *, history: Table, heads: ProbeHeads, state: dict, mode: str,
        epochs: int, resumed_from: int, train_samples: int, test_samples: int, world: int,
        seconds: float, train_seconds: float, skipped: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(rows)
        self.history, self.heads, self.state = history, heads, state
        self.mode, self.epochs, self.resumed_from = mode, epochs, resumed_from
        self.train_samples, self.test_samples, self.world = train_samples, test_samples, world
        self.seconds, self.train_seconds, self.skipped = seconds, train_seconds, skipped

    def summary(self) -> dict:
        """The numbers of the run (no tensors), e.g. for summary.json."""
        keys = ("mode", "epochs", "resumed_from", "train_samples", "test_samples", "world",
                "seconds", "train_seconds", "skipped")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


# ----------------------------------------------------------------------------- probe
def probe(
    model: nn.Module,
    train: Split,
    test: Split,
    num_classes: int,
    blocks: str | Sequence[str] | Sequence[Block] = "auto",
    *,
    epochs: int = 10,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    milestones: Sequence[int] = (5, 7),
    gamma: float = 0.2,
    batch_size: int = 128,
    augment: bool = True,
    standardize: bool = False,
    mode: str = "auto",
    cache_budget_gb: float = 4.0,
    cache_dir: str | Path | None = None,
    cache_dtype: torch.dtype = torch.bfloat16,
    eval_batch_size: int = 500,
    view: str = "clean",
    seed: int = 0,
    amp: bool = True,
    channels_last: bool = False,
    state: dict | None = None,
    on_epoch: Callable[[dict], Any] | None = None,
    progress: bool = True,
    run: str = "",
    next_token=None,
) -> ProbeResult:
    """Train one linear probe per block of the frozen `model`; accuracy on `test`.

    train, test: data sets of `nclayers.data.load_dataset`, batched by `make_batches`
        (training: seeded per-epoch permutation, the data set's augmentation when
        `augment`); the heads learn and are scored on the `view` labels (clean, A.1).
    Defaults follow A.1: 10 epochs, SGD momentum 0.9, lr 0.1 divided by 5 at epochs 5
        and 7, batch 128; weight_decay the pretraining recipe's 5e-4.
    standardize: each feature shifted and scaled by its training mean and std first.
    mode: "stream", "cache" or "auto" (cache when not `augment`): the cache holds every
        block's features once in `cache_dtype`, on the device up to `cache_budget_gb`,
        beyond it memory-mapped under `cache_dir`.
    amp: bf16 autocast for the backbone on CUDA only; the heads are float32.
    state, on_epoch: after every epoch `on_epoch(state)` gets the heads, optimiser and
        history; passed back as `state` it continues exactly (batches seeded by epoch).
    Under torch.distributed each rank trains on its shard (batch `batch_size // world`),
        head gradients are averaged with one all_reduce per step.
    next_token: NextTokenClasses (causal LMs): a position whose next token is one is a sample.
    """
    blocks = _resolve_blocks(model, blocks)
    rank, world = world_of()
    mode = _check_settings(epochs, batch_size, eval_batch_size, mode, augment, world,
                           positions=next_token is not None)  # fmt: skip
    _check_inputs(model, train, test, view, num_classes, next_token)
    was_training = model.training
    model.eval()  # frozen: BatchNorm uses (and keeps) its running statistics
    try:
        fit = _Fit(model, blocks, train, num_classes, amp, lr, momentum, weight_decay, next_token)
        if state is not None:
            fit.resume(state, epochs)
        t0 = time.perf_counter()
        source = fit.source(
            mode, view, batch_size // world, augment, seed, (rank, world), channels_last,
            cache_budget_gb, cache_dir, cache_dtype,
        )  # fmt: skip
        fit.run(source, epochs, lr, gamma, milestones, standardize and state is None,
                eval_batch_size, view, channels_last, world, on_epoch, progress)  # fmt: skip
        train_seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    accuracy, n_test = evaluate_heads(
        model, fit.heads, fit.blocks, test, view, eval_batch_size, amp, channels_last, progress,
        next_token,
    )  # fmt: skip
    return ProbeResult(
        _rows(fit, accuracy, n_test, view, run), history=Table(fit.history), heads=fit.heads,
        state=fit.snapshot(epochs), mode=mode, epochs=epochs, resumed_from=fit.start,
        train_samples=len(train), test_samples=n_test, world=world,
        seconds=time.perf_counter() - t0, train_seconds=train_seconds, skipped=fit.skipped,
    )  # fmt: skip


def _check_inputs(model, train, test, view: str, num_classes: int, next_token) -> None:
    _check_split(train, "train", view, num_classes, next_token)
    _check_split(test, "test", view, num_classes, next_token)
    if not any(True for _ in model.parameters()):
        raise NCLayersError("model: has no parameters to find its device by")


def _rows(fit, accuracy: list[float], n_test: int, view: str, run: str) -> list[dict]:
    return [
        {"run": run, "split": "test", "view": view, "layer": i + 1, "block": name,
         "dim": d, "n": n_test, "probe_acc": acc}
        for i, (name, d, acc) in enumerate(zip(fit.names, fit.dims, accuracy, strict=True))
    ]  # fmt: skip


def _check_settings(
    epochs, batch_size, eval_batch_size, mode, augment, world, positions: bool = False
) -> str:
    """The validated mode ("stream" or "cache"); `positions` (next-token probes) are
    cached by one process only, so under torch.distributed "auto" streams them."""
    if positions and world > 1 and mode != "stream":
        if mode == "cache":
            raise NCLayersError(
                "mode='cache' of next-token positions runs in one process; under torchrun "
                "use mode='stream' (probe.mode=stream)"
            )
        mode = "stream"
    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("eval_batch_size", eval_batch_size)):  # fmt: skip
        if value < 1:
            raise NCLayersError(f"{name}={value}: must be a positive integer")
    if mode not in MODES:
        raise NCLayersError(f"mode={mode!r}: expected one of {MODES}")
    if mode == "auto":
        mode = "stream" if augment else "cache"
    if mode == "cache" and augment:
        raise NCLayersError(
            "mode='cache' computes each feature once, so it cannot augment: set augment=False "
            "(probe.augment=false) or use mode='stream'"
        )
    if batch_size < world:
        raise NCLayersError(
            f"batch_size={batch_size} is smaller than the {world} processes: set "
            f"batch_size >= {world}"
        )
    return mode


class _Fit:
    """The heads, their optimiser and history, and the epochs that train them."""

    def __init__(self, model, blocks, train, num_classes, amp, lr, momentum, weight_decay,
                 next_token=None):  # fmt: skip
        self.train, self.device = train, next(model.parameters()).device
        self.next_token = next_token  # positions as samples, -1 left out
        sample = make_batches(train.subset(torch.arange(min(2, len(train)))), 2, self.device,
                              workers=0)  # fmt: skip
        x = next(iter(sample))[0]
        # The layers: the blocks in forward order, a shared module's calls apart (one head each).
        self.blocks = blocks = forward_order(model, blocks, x)
        self.backbone = _Backbone(model, blocks, amp)
        self.dims = [d for _, d in probe_shapes(model, blocks, x)]
        self.heads = ProbeHeads(self.dims, num_classes).to(self.device)
        self.optimizer = torch.optim.SGD(
            self.heads.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        self.names = [b.name for b in blocks]
        self.start, self.history, self.skipped = 0, [], 0

    def resume(self, state: dict, epochs: int) -> None:
        _check_state(state, self.names, self.dims, self.heads.num_classes, epochs)
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start, self.history = int(state["epoch"]), list(state["history"])

    def source(self, mode, view, batch, augment, seed, shard, channels_last, budget, cache_dir,
               dtype) -> _Stream | _Cache:  # fmt: skip
        if mode == "stream":
            return _Stream(self.backbone, self.train, view, batch, augment, seed, shard,
                           channels_last, self.next_token)  # fmt: skip
        if self.next_token is not None:
            return _PositionCache(self.backbone, self.train, self.next_token, sum(self.dims),
                                  batch, seed, channels_last, budget, cache_dir, dtype)  # fmt: skip
        return _Cache(self.backbone, self.train, view, sum(self.dims), batch, seed, shard,
                      channels_last, budget, cache_dir, dtype)  # fmt: skip

    def run(self, source, epochs, lr, gamma, milestones, standardize, eval_batch, view,
            channels_last, world, on_epoch, progress) -> None:  # fmt: skip
        """The cache pass (cache mode), the standardisation pass, then the epochs."""
        todo = epochs - self.start
        fill = isinstance(source, _Cache) and todo > 0  # the cache pass gives the moments too
        passes = (fill + (standardize and not fill)) * -(-len(self.train) // world // eval_batch)
        bar = counter(todo * len(source) + passes, progress, "probe", unit="batch")
        try:
            with self.backbone.taps:
                if fill:
                    source.fill(eval_batch, bar)
                if standardize:
                    mean, var = (source.moments() if fill else _stream_moments(
                        self.backbone, self.train, view, sum(self.dims), eval_batch,
                        channels_last, world, bar))  # fmt: skip
                    self.heads.set_standardization(mean, var)
                for epoch in range(self.start, epochs):
                    rate = lr * gamma ** sum(epoch >= m for m in milestones)
                    self._epoch(source, epoch, rate, world, bar)
                    if on_epoch is not None:
                        on_epoch(self.snapshot(epoch + 1))
        finally:
            if isinstance(source, _Cache):
                source.close()
            if bar is not None:
                bar.close()
        self.skipped = source.skipped

    def _epoch(self, source, epoch: int, rate: float, world: int, bar) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        source.set_epoch(epoch)
        h = len(self.dims)
        sums = torch.zeros(2 * h + 1, dtype=torch.float64, device=self.device)
        masked = self.next_token is not None
        for feats, y in source:
            loss, hits, count = _step(self.heads, self.optimizer, feats, y, world, masked)
            sums[:h] += loss * count
            sums[h:-1] += hits
            sums[-1] += count
            if bar is not None:
                bar.update(1)
        sums = all_sum(sums).tolist()  # one host sync per epoch
        seen = sums[-1]
        for i, name in enumerate(self.names):
            self.history.append({
                "epoch": epoch + 1, "layer": i + 1, "block": name, "lr": rate,
                "loss": sums[i] / seen, "train_acc": sums[h + i] / seen,
            })  # fmt: skip

    def snapshot(self, epoch: int) -> dict:
        return _state(self.heads, self.optimizer, epoch, self.history, self.names, self.dims)


def _step(
    heads: ProbeHeads,
    optimizer: torch.optim.Optimizer,
    feats: torch.Tensor,
    y: torch.Tensor,
    world: int,
    masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """One SGD step of every head: (per-head mean loss, per-head correct, samples), on
    the device. `masked`: labels of -1 (next-token positions that are no class) count
    nothing; the mean is over the others (their count a device tensor: no sync)."""
    logits = heads(feats)  # H x B x K
    h, n, k = logits.shape
    losses = F.cross_entropy(logits.reshape(h * n, k), y.repeat(h), reduction="none",
                             ignore_index=-1 if masked else -100)  # fmt: skip
    if masked:
        count = (y >= 0).sum()
        losses = losses.view(h, n).sum(1) / count.clamp_min(1)
    else:
        count = n
        losses = losses.view(h, n).mean(1)
    optimizer.zero_grad(set_to_none=False)
    losses.sum().backward()  # each head's own mean loss: each gets exactly its gradient
    if world > 1:
        grad = heads.theta.grad
        dist.all_reduce(grad)
        grad /= world
    optimizer.step()
    return losses.detach().double(), (logits.detach().argmax(-1) == y).sum(1), count


def _stream_moments(
    backbone, train, view, width, batch_size, channels_last, world, bar
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and variance of the unaugmented training features, one pass."""
    rank, _ = world_of()
    batches = make_batches(
        train, batch_size, backbone.device, views=[view], shard=(rank, world),
        channels_last=channels_last,
    )  # fmt: skip
    moments = _Moments(width, backbone.device)
    for x, _ in batches:
        moments.update(backbone.features(x))
        if bar is not None:
            bar.update(1)
    moments.reduce(world)
    return moments.mean, moments.variance()


def _state(heads: ProbeHeads, optimizer, epoch: int, history, names, dims) -> dict:
    """A snapshot (copies: training goes on mutating the live tensors in place)."""
    return {
        "epoch": epoch,
        "heads": {k: v.detach().clone() for k, v in heads.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "history": [dict(r) for r in history],
        "blocks": list(names),
        "dims": list(dims),
        "num_classes": heads.num_classes,
    }


def _check_state(state: dict, names, dims, num_classes, epochs) -> None:
    saved = (state.get("blocks"), state.get("dims"), state.get("num_classes"))
    if saved != (list(names), list(dims), num_classes):
        raise NCLayersError(
            f"state: saved for blocks {saved[0]} (dims {saved[1]}, {saved[2]} classes), not "
            f"for the probed blocks {list(names)} (dims {list(dims)}, {num_classes} "
            "classes); probe the same model and blocks, or start without the saved state"
        )
    if int(state["epoch"]) > epochs:
        raise NCLayersError(
            f"state: {state['epoch']} epochs are already done but epochs={epochs}; raise "
            "epochs or start without the saved state"
        )


def heads_state(result: ProbeResult) -> dict:
    """What to save of a probe result: blocks, dims, classes, heads (with the folded
    `nn.Linear` weights per block for use without nclayers), accuracies and the run's
    numbers."""
    heads = result.heads
    linear = heads.linear()
    return {
        "blocks": [r["block"] for r in result],
        "dims": list(heads.dims),
        "num_classes": heads.num_classes,
        "heads": {k: v.detach().cpu() for k, v in heads.state_dict().items()},
        "linear": [{k: v.detach().cpu() for k, v in h.state_dict().items()} for h in linear],
        "probe_acc": [r["probe_acc"] for r in result],
        "meta": result.summary(),
    }


def load_heads(saved: dict, device: torch.device | str = "cpu") -> ProbeHeads:
    """`ProbeHeads` from `heads_state(...)`, e.g. to re-evaluate with `evaluate_heads`."""
    heads = ProbeHeads(saved["dims"], saved["num_classes"])
    heads.load_state_dict(saved["heads"])
    return heads.to(device)


__all__ = ["ProbeHeads", "ProbeResult", "evaluate_heads", "heads_state", "load_heads", "probe"]
