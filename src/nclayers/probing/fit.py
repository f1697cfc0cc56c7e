"""The fit loop: `probe(model, train, test, num_classes, blocks, settings)` trains, on the
frozen model, one linear head per block and learning rate of `settings.lrs`, all from the
same forward pass, keeps per block the head whose lr scores best on held-out training rows
(by default the lowest cross-entropy: `nclayers.probing.holdout` says why), and reports the
chosen heads' accuracy on `test`.

The model is frozen (eval mode, no gradient, so neither its weights nor its BatchNorm
statistics change); the taps pool every block's output. Every batch costs one batched
matmul, one cross-entropy, one backward and one SGD step for all heads together (the
grid's heads are columns of the same weight tensor: `ProbeHeads`), and under
torch.distributed one all_reduce. The loss is the sum of the heads' own mean losses, so
each head receives exactly the gradient it would get if it were trained alone; SGD's
momentum and weight decay act element-wise, so each head also has its own optimiser state
(`GridSGD`).

The splits are what the data layer gives: in-memory `ArrayDataset`s (CIFAR, digits),
`FolderDataset`s (ImageNet and other image folders) or tokenised `TextData` (Hugging Face
models: the batch's attention mask reaches the pools), batched by `make_batches`. With
`next_token` (NextTokenClasses, causal language models) every position whose next token
is a class is a sample (blocks pooled "token"): the heads learn and are scored on those
positions only (a position labelled -1 counts nothing). The training features come from a
`Stream` or a `FeatureCache` (`settings.mode`, see nclayers.probing.features).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from nclayers.config import ProbeSettings
from nclayers.data import ArrayDataset, FolderDataset, TextData, make_batches
from nclayers.errors import NCLayersError
from nclayers.models.blocks import resolve_blocks
from nclayers.probing.features import (
    Backbone,
    FeatureCache,
    PositionCache,
    Stream,
    stream_moments,
)
from nclayers.probing.heads import GridSGD, ProbeHeads
from nclayers.probing.holdout import choose, held_out
from nclayers.probing.result import ProbeResult, score_heads
from nclayers.runtime import all_sum, counter, speed_switches
from nclayers.runtime import world as world_of
from nclayers.table import Table
from nclayers.taps import Block, forward_order, probe_shapes

MODES = ("auto", "stream", "cache")
Split = ArrayDataset | FolderDataset | TextData


def probe(
    model: nn.Module,
    train: Split,
    test: Split,
    num_classes: int,
    blocks: str | Sequence[str] | Sequence[Block] = "auto",
    settings: ProbeSettings | Mapping[str, Any] = ProbeSettings(),  # noqa: B008 (frozen)
    *,
    state: dict | None = None,
    on_epoch: Callable[[dict], Any] | None = None,
    progress: bool = False,
    next_token=None,
) -> ProbeResult:
    """Train linear probes on every block of the frozen `model`; accuracy on `test`.

    train, test: data sets of `nclayers.data.load_dataset`, batched by `make_batches`
        (training: seeded per-epoch permutation, the data set's augmentation when
        `settings.augment`); the heads learn and are scored on the `settings.view` labels.
    settings: a `ProbeSettings` (the config's `probe:` section; a mapping of its keys
        works too): epochs, the lr grid `lrs` and `val_fraction`, the schedule
        (`milestones`, `gamma`), momentum, weight decay, batch size, `standardize`, the
        feature source (`mode`, `cache_budget_gb`, `cache_dir`, `cache_dtype`), `amp`.
        With several lrs, `val_fraction` of the training rows (class-balanced, seeded by
        `settings.seed`) are held out and choose each block's lr (`choose_by`: the lowest
        held-out cross-entropy, or the highest accuracy); the rest train.
    state, on_epoch: after every epoch `on_epoch(state)` gets the heads, optimiser and
        history; passed back as `state` it continues exactly (batches seeded by epoch).
    next_token: NextTokenClasses (causal LMs): a position whose next token is one is a
        sample (what the data is, not a setting).
    Under torch.distributed each rank trains on its shard (batch `batch_size // world`),
        head gradients are averaged with one all_reduce per step.
    """
    s = _settings(settings)
    blocks = resolve_blocks(model, blocks, "probe")
    rank, world = world_of()
    augment = s.augment and not isinstance(train, TextData)  # text has no augmentation
    mode = _check_settings(s, augment, world, positions=next_token is not None)
    _check_inputs(model, train, test, s.view, num_classes, next_token)
    fit_train, val = _split(train, s, next_token)
    was_training = model.training
    model.eval()  # frozen: BatchNorm uses (and keeps) its running statistics
    t0 = time.perf_counter()
    try:
        fit = _Fit(model, blocks, fit_train, num_classes, s, next_token)
        if state is not None:
            fit.resume(state, s.epochs)
        source = fit.source(mode, augment, (rank, world))
        stats = (
            _stats_split(train, val, s, next_token) if s.standardize and state is None else False
        )
        fit.run(source, stats, world, on_epoch, progress)
        train_seconds = time.perf_counter() - t0
        choice, selection = fit.choose(val, progress)
    finally:
        model.train(was_training)
    heads = fit.heads.select(choice)
    acc, _, n_test = score_heads(
        model, heads, fit.blocks, test, s.view, s.eval_batch_size, s.amp, fit.channels_last,
        progress, next_token,
    )  # fmt: skip
    rows = [
        {"split": "test", "view": s.view, "layer": i + 1, "block": name, "dim": d,
         "n": n_test, "probe_acc": a, "probe_lr": s.lrs[j]}
        for i, (name, d, a, j) in enumerate(
            zip(fit.names, fit.dims, acc[:, 0].tolist(), choice, strict=True))
    ]  # fmt: skip
    return ProbeResult(
        rows, history=Table(fit.history), selection=selection, heads=heads, grid=fit.heads,
        state=fit.snapshot(s.epochs), mode=mode, epochs=s.epochs, resumed_from=fit.start,
        train_samples=len(fit_train), val_samples=len(val) if val is not None else 0,
        test_samples=n_test, world=world, seconds=time.perf_counter() - t0,
        train_seconds=train_seconds, skipped=fit.skipped,
    )  # fmt: skip


def _settings(settings) -> ProbeSettings:
    if isinstance(settings, ProbeSettings):
        return settings
    if isinstance(settings, Mapping):
        return ProbeSettings(**settings)
    raise NCLayersError(
        f"settings: got a {type(settings).__name__}; pass nclayers.config.ProbeSettings(...) "
        "(or a mapping of its keys, e.g. {'epochs': 5, 'lrs': [0.1]})"
    )


def _split(train: Split, s: ProbeSettings, next_token) -> tuple[Split, Split | None]:
    """(rows that train the heads, held-out rows that choose the lr or None)."""
    if len(s.lrs) == 1:  # nothing to choose: every row trains
        return train, None
    rows, val = held_out(train, s.val_fraction, s.seed, None if next_token else s.view)
    return train.subset(rows), train.subset(val)


def _stats_split(train: Split, val: Split | None, s: ProbeSettings, next_token):
    """The rows whose unaugmented features give the standardisation statistics: the
    held-out rows, or (one lr) as many drawn by the same rule, which still train; a
    tenth of the rows estimates a mean and variance per feature well and costs a tenth of
    a pass. None (next-token positions): every cached or streamed training position."""
    if next_token is not None:
        return None
    if val is not None:
        return val
    try:
        return train.subset(held_out(train, s.val_fraction, s.seed, s.view)[1])
    except NCLayersError:  # too few rows to draw from: all of them
        return train


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
        raise NCLayersError(f"view={view!r} (probe.view): the {name} split has labels views "
                            f"{ds.views}; choose one of them")  # fmt: skip
    y = ds.labels[view]
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise NCLayersError(
            f"{name}: labels span [{int(y.min())}, {int(y.max())}] but num_classes="
            f"{num_classes}; pass the data set's number of classes"
        )


def _check_inputs(model, train, test, view: str, num_classes: int, next_token) -> None:
    _check_split(train, "train", view, num_classes, next_token)
    _check_split(test, "test", view, num_classes, next_token)
    if not any(True for _ in model.parameters()):
        raise NCLayersError("model: has no parameters to find its device by")


def _check_settings(s: ProbeSettings, augment: bool, world: int, positions: bool = False) -> str:
    """The validated mode ("stream" or "cache"); `positions` (next-token probes) are
    cached by one process only, so under torch.distributed "auto" streams them."""
    mode = s.mode
    if positions and world > 1 and mode != "stream":
        if mode == "cache":
            raise NCLayersError(
                "mode='cache' of next-token positions runs in one process; under torchrun "
                "use mode='stream' (probe.mode=stream)"
            )
        mode = "stream"
    if mode == "auto":
        mode = "stream" if augment else "cache"
    if mode == "cache" and augment:
        raise NCLayersError(
            "mode='cache' computes each feature once, so it cannot augment: set augment=False "
            "(probe.augment=false) or use mode='stream'"
        )
    if s.batch_size < world:
        raise NCLayersError(
            f"batch_size={s.batch_size} is smaller than the {world} processes: set "
            f"batch_size >= {world}"
        )
    return mode


class _Fit:
    """The heads of the grid, their optimiser and history, and the epochs that train them."""

    def __init__(self, model, blocks, train, num_classes, s: ProbeSettings, next_token=None):
        self.s = s
        self.train, self.device = train, next(model.parameters()).device
        self.next_token = next_token  # positions as samples, -1 left out
        self.channels_last = s.channels_last and speed_switches(self.device) and _is_convnet(model)
        sample = make_batches(train.subset(torch.arange(min(2, len(train)))), 2, self.device,
                              workers=0)  # fmt: skip
        x = next(iter(sample))[0]
        # The layers: the blocks in forward order, a shared module's calls apart (one head each).
        blocks = forward_order(model, blocks, x)
        self.backbone = Backbone(model, blocks, s.amp, getattr(train, "cls_id", None))
        self.dims = [d for _, d in probe_shapes(model, blocks, x)]
        self.heads = ProbeHeads(self.dims, num_classes, len(s.lrs)).to(self.device)
        self.optimizer = GridSGD(self.heads, s.lrs, s.momentum, s.weight_decay)
        self.names, self.blocks = [b.name for b in blocks], list(blocks)
        self.start, self.history, self.skipped = 0, [], 0

    def resume(self, state: dict, epochs: int) -> None:
        _check_state(state, self.names, self.dims, self.heads.num_classes, list(self.s.lrs),
                     epochs)  # fmt: skip
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start, self.history = int(state["epoch"]), list(state["history"])

    def source(self, mode: str, augment: bool, shard) -> Stream | FeatureCache:
        s, batch = self.s, self.s.batch_size // shard[1]
        if mode == "stream":
            return Stream(self.backbone, self.train, s.view, batch, augment, s.seed, shard,
                          self.channels_last, self.next_token)  # fmt: skip
        dtype = getattr(torch, s.cache_dtype)
        if self.next_token is not None:
            return PositionCache(self.backbone, self.train, self.next_token, sum(self.dims),
                                 batch, s.seed, self.channels_last, s.cache_budget_gb,
                                 s.cache_dir, dtype)  # fmt: skip
        return FeatureCache(self.backbone, self.train, s.view, sum(self.dims), batch, s.seed,
                            shard, self.channels_last, s.cache_budget_gb, s.cache_dir,
                            dtype)  # fmt: skip

    def run(self, source, stats, world: int, on_epoch, progress: bool) -> None:
        """The cache pass (cache mode), the standardisation pass over `stats` (a split;
        None: every training row, from the cache where there is one; False: none), then
        the epochs."""
        s, todo = self.s, self.s.epochs - self.start
        fill = isinstance(source, FeatureCache) and todo > 0
        from_cache = stats is None and fill  # the cache pass gives the moments too
        rows = len(self.train) if stats is None else (len(stats) if stats is not False else 0)
        passes = -(-len(self.train) // world // s.eval_batch_size) if fill else 0
        if stats is not False and not from_cache:
            passes += -(-rows // world // s.eval_batch_size)
        bar = counter(todo * len(source) + passes, progress, "probe", unit="batch")
        try:
            with self.backbone.taps:
                if fill:
                    source.fill(s.eval_batch_size, bar)
                if stats is not False:
                    mean, var = (source.moments() if from_cache else stream_moments(
                        self.backbone, self.train if stats is None else stats, s.view,
                        sum(self.dims), s.eval_batch_size, self.channels_last, world,
                        bar))  # fmt: skip
                    self.heads.set_standardization(mean, var, s.standardize_per)
                for epoch in range(self.start, s.epochs):
                    factor = s.gamma ** sum(epoch >= m for m in s.milestones)
                    self._epoch(source, epoch, factor, world, bar)
                    if on_epoch is not None:
                        on_epoch(self.snapshot(epoch + 1))
        finally:
            if isinstance(source, FeatureCache):
                source.close()
            if bar is not None:
                bar.close()
        self.skipped = source.skipped

    def _epoch(self, source, epoch: int, factor: float, world: int, bar) -> None:
        source.set_epoch(epoch)
        h, n_lr = len(self.dims), len(self.s.lrs)
        sums = torch.zeros(2 * h * n_lr + 1, dtype=torch.float64, device=self.device)
        masked = self.next_token is not None
        for feats, y in source:
            loss, hits, count = _step(self.heads, self.optimizer, feats, y, world, factor,
                                      masked)  # fmt: skip
            sums[: h * n_lr] += (loss * count).flatten()
            sums[h * n_lr : -1] += hits.flatten()
            sums[-1] += count
            if bar is not None:
                bar.update(1)
        sums = all_sum(sums).tolist()  # one host sync per epoch
        seen = sums[-1]
        for i, name in enumerate(self.names):
            for j, lr in enumerate(self.s.lrs):
                self.history.append({
                    "epoch": epoch + 1, "layer": i + 1, "block": name, "probe_lr": lr,
                    "lr": lr * factor, "loss": sums[i * n_lr + j] / seen,
                    "train_acc": sums[h * n_lr + i * n_lr + j] / seen,
                })  # fmt: skip

    def choose(self, val, progress: bool) -> tuple[list[int], Table]:
        """Per block the index of the lr whose heads score best on the held-out rows (by
        `choose_by`: the lowest loss or the highest accuracy), and every head's held-out
        scores (none held out with a single lr: index 0)."""
        if val is None:
            return [0] * len(self.dims), Table()
        s = self.s
        acc, loss, _ = score_heads(
            self.backbone.model, self.heads, self.blocks, val, s.view, s.eval_batch_size,
            s.amp, self.channels_last, progress, self.next_token,
        )  # fmt: skip
        choice = choose(acc, loss, s.lrs, s.choose_by)
        rows = [
            {"layer": i + 1, "block": name, "probe_lr": lr, "val_acc": float(acc[i, j]),
             "val_loss": float(loss[i, j]), "chosen": j == choice[i]}
            for i, name in enumerate(self.names) for j, lr in enumerate(s.lrs)
        ]  # fmt: skip
        return choice, Table(rows)

    def snapshot(self, epoch: int) -> dict:
        """A snapshot (copies: training goes on mutating the live tensors in place)."""
        return {
            "epoch": epoch,
            "heads": {k: v.detach().clone() for k, v in self.heads.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "history": [dict(r) for r in self.history],
            "blocks": list(self.names),
            "dims": list(self.dims),
            "num_classes": self.heads.num_classes,
            "lrs": list(self.s.lrs),
        }


def _step(
    heads: ProbeHeads,
    optimizer: GridSGD,
    feats: torch.Tensor,
    y: torch.Tensor,
    world: int,
    factor: float,
    masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """One SGD step of every head: (H x L mean loss, H x L correct, samples), on the
    device. `masked`: labels of -1 (next-token positions that are no class) count
    nothing; the mean is over the others (their count a device tensor: no sync)."""
    logits = heads(feats)  # H x B x L x K
    h, n, n_lr, k = logits.shape
    target = y[None, :, None].expand(h, n, n_lr).reshape(-1)
    losses = F.cross_entropy(logits.reshape(-1, k), target, reduction="none",
                             ignore_index=-1 if masked else -100).view(h, n, n_lr)  # fmt: skip
    if masked:
        count = (y >= 0).sum()
        losses = losses.sum(1) / count.clamp_min(1)
    else:
        count = n
        losses = losses.mean(1)
    optimizer.zero_grad()
    losses.sum().backward()  # each head's own mean loss: each gets exactly its gradient
    if world > 1:
        grad = heads.theta.grad
        dist.all_reduce(grad)
        grad /= world
    optimizer.step(factor)
    hits = (logits.detach().argmax(-1) == y[:, None]).sum(1)
    return losses.detach().double(), hits, count


def _check_state(state: dict, names, dims, num_classes, lrs, epochs) -> None:
    saved = (state.get("blocks"), state.get("dims"), state.get("num_classes"), state.get("lrs"))
    if saved != (list(names), list(dims), num_classes, lrs):
        raise NCLayersError(
            f"state: saved for blocks {saved[0]} (dims {saved[1]}, {saved[2]} classes, lrs "
            f"{saved[3]}), not for the probed blocks {list(names)} (dims {list(dims)}, "
            f"{num_classes} classes, lrs {lrs}); probe the same model, blocks and lrs, or "
            "start without the saved state"
        )
    if int(state["epoch"]) > epochs:
        raise NCLayersError(
            f"state: {state['epoch']} epochs are already done but epochs={epochs}; raise "
            "epochs or start without the saved state"
        )


def _is_convnet(model: nn.Module) -> bool:
    from nclayers.train import is_convnet

    return is_convnet(model)


__all__ = ["probe"]
