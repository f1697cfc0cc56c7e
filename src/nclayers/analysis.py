"""One pass over a data split: every block, every labels view, exact statistics.

`analyze(model, loader, num_classes)` hooks every block, runs the model once over the
loader, and for each (block, labels view) accumulates exact float64 class statistics
(and, given reference class means, a nearest-class-centre accuracy). The result is an
`AnalysisResult`: a tidy `Table`, one row per (split, view, layer), that also carries the
`ClassStats`, the model's accuracy per view, the sample count and the time taken.

The pass costs about as much as inference, on a GPU too: the labels of a batch are
planned once (`LabelViews.plan`) and every block then updates all views together with a
few fused operations (`BlockStats`, `BlockNCC`); nothing in the pass reads the device, so
the host never waits for it. Counts, accuracies and errors are read once, at the end.
A label of -1 leaves the sample out of that view (its statistics and accuracies).

The layers are the blocks in forward order, as the first batch runs them (its forward
records the order in which the blocks' outputs come out), and a block that runs k > 1
times per forward is k layers, one per call (`nclayers.taps.traced_forward`).

Batches hold images (a tensor, `model(x)`) or a tokenised batch (a mapping of tensors,
`model(**inputs)`, whose attention mask reaches the sequence pools of the taps). In a
token-level task (blocks pooled "token", e.g. next-token classes) every position is a
sample: the labels are N x T (or N*T), -1 where a position is left out, and the model's
N x T x V logits count as right where their top token is the position's class token
(`token_classes`: the vocabulary id of each class).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nclayers.errors import NCLayersError
from nclayers.metrics import (
    BlockNCC,
    BlockStats,
    ClassStats,
    LabelPlan,
    LabelViews,
    collapse_metrics,
)
from nclayers.models.blocks import resolve_blocks
from nclayers.runtime import autocast
from nclayers.runtime import progress as progress_bar
from nclayers.table import Table
from nclayers.taps import (
    Block,
    Taps,
    batch_rows,
    missing_blocks_error,
    output_logits,
    run_model,
    to_device,
    traced_forward,
)

# Keys of a mapping batch that hold labels, not model inputs.
_LABEL_KEYS = ("label", "labels", "y")
_IMAGE_KEYS = ("image", "images", "x")


class AnalysisResult(Table):
    """The rows of one `analyze` pass (one per view and layer) and what the pass measured.

    stats: per layer, the `ClassStats` of each labels view (the class means a later pass
        can take as its NCC reference);
    accuracy: the model's accuracy per view (NaN where a view keeps no sample, or where
        the model's outputs cannot be read as the view's classes);
    samples: the samples (images or sequences) the pass ran over, on every rank together;
    seconds: the time of the pass; split: the split's name, as in the rows;
    blocks: the measured `Block`s, one per layer in forward order (a shared module's calls
        apart).
    `where()` and the other row selections return plain `Table`s.
    """

    def __init__(
        self,
        rows: Iterable[Mapping],
        *,
        stats: list[dict[str, ClassStats]],
        accuracy: dict[str, float],
        samples: int,
        seconds: float,
        split: str,
        blocks: Sequence[Block] = (),
        schema: Mapping[str, type] | None = None,
    ) -> None:
        super().__init__(rows, schema)
        self.blocks = list(blocks)
        self.stats = stats
        self.accuracy = accuracy
        self.samples = samples
        self.seconds = seconds
        self.split = split


def _split_batch(batch, default_view: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(model inputs, labels per view) of one batch: (inputs, labels) pairs, where inputs
    is a tensor or a tokenised mapping, or one mapping holding both."""
    if isinstance(batch, Mapping):  # {"image": x, "label": y} or a tokenised batch
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        x = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        if x is None:  # the rest are keyword inputs of the model (input_ids, ...)
            x = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    else:
        x, y = batch[0], batch[1]
    if y is None:
        raise NCLayersError(
            "loader: a batch holds no labels; yield (inputs, labels) or a mapping with one of "
            f"the keys {list(_LABEL_KEYS)} (language-model text needs next-token labels: "
            "TextBatches(..., next_token=NextTokenClasses...))"
        )
    views = dict(y) if isinstance(y, Mapping) else {default_view: y}
    return x, views


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _reference_stats(reference: AnalysisResult | None) -> list[ClassStats] | None:
    """The reference's class statistics per layer: its "clean" view, else its first."""
    if reference is None:
        return None
    if not isinstance(reference, AnalysisResult):  # e.g. a Table read from a CSV
        raise NCLayersError(
            f"reference: a {type(reference).__name__} holds no class statistics; pass the "
            "result of an earlier analyze() or a loader of the reference split"
        )
    ref_view = "clean" if "clean" in reference.stats[0] else next(iter(reference.stats[0]))
    return [layer[ref_view] for layer in reference.stats]


def _check_reference(reference: AnalysisResult, blocks: Sequence[Block]) -> None:
    """The reference measured the same layers (same count; same names where it has them)."""
    names = [b.name for b in blocks]
    ref_names = [b.name for b in reference.blocks] or names
    if len(reference.stats) != len(blocks) or ref_names != names:
        raise NCLayersError(
            f"reference has {len(reference.stats)} layers ({', '.join(ref_names[:3])}, ...) "
            f"but {len(blocks)} blocks are measured ({', '.join(names[:3])}, ...); analyze "
            "the reference with the same blocks"
        )


class _Pass:
    """What one pass accumulates: per block the class statistics (and NCC hits) of every
    view, and the model's hits per view. Nothing here reads the device."""

    def __init__(
        self,
        blocks: Sequence[Block],
        num_classes: int,
        device: torch.device,
        reference: AnalysisResult | None,
        nccs: list[BlockNCC] | None,
        classic_nc1: bool,
        token_classes: torch.Tensor | None,
    ) -> None:
        self.blocks = list(blocks)
        self.num_classes = num_classes
        self.device = device
        self.reference = reference
        self.nccs = nccs
        self.classic_nc1 = classic_nc1
        self.token_classes = token_classes
        self.space: LabelViews | None = None  # the labels views, stacked; fixed by batch 1
        self.block_stats: list[BlockStats | None] = [None] * len(self.blocks)
        self.plan: LabelPlan | None = None  # this batch's labels, shared by every block
        self.hits: torch.Tensor | None = None  # model accuracy, per view
        self.readable = True  # the model's outputs can be read as classes
        self._lookup: torch.Tensor | None = None  # vocabulary id -> class (or -2)
        self.seen = 0

    def start(self, blocks: list[Block]) -> None:
        """After the first batch's forward: the blocks in forward order, one per call,
        checked against the reference's layers."""
        self.blocks = blocks
        self.block_stats = [None] * len(self.blocks)
        if self.reference is not None:
            _check_reference(self.reference, blocks)

    def sink(self, index: int, feats: torch.Tensor) -> None:
        stats = self.block_stats[index]
        if stats is None:
            stats = BlockStats(self.space, feats.shape[1], self.classic_nc1)
            self.block_stats[index] = stats
        stats.update(feats, self.plan)
        if self.nccs is not None:
            self.nccs[index].update(feats, self.plan)

    def labels(self, ys: dict[str, torch.Tensor]) -> None:
        """Plan this batch's labels (N x T token labels count per position)."""
        if self.space is None:
            self.space = LabelViews(list(ys), self.num_classes, self.device)
        elif set(ys) != set(self.space.names):
            raise NCLayersError(
                f"loader: a batch has labels views {sorted(ys)}, the first had "
                f"{sorted(self.space.names)}; every batch needs the same views"
            )
        labels = [ys[v] for v in self.space.names]
        tokens = any(y.ndim == 2 for y in labels)  # many positions -1: plan to skip them
        self.plan = self.space.plan([y.reshape(-1) if y.ndim == 2 else y for y in labels], tokens)

    def outputs(self, logits: torch.Tensor, rows: int) -> None:
        """Count the model's hits: its top class against every view's labels. N x T x V
        logits give a class per position (through `token_classes`: vocabulary id ->
        class); outputs of another shape than the labels, or fewer than the classes, count
        nothing."""
        self.seen += rows
        tokens = logits.ndim == 3
        if tokens:
            logits = logits.reshape(-1, logits.shape[-1])
            if self.token_classes is None and logits.shape[-1] != self.num_classes:
                self.readable = False
        if logits.ndim != 2 or logits.shape[0] != self.plan.batch:
            self.readable = False
        elif not tokens and logits.shape[1] < self.num_classes:  # a head for fewer classes
            self.readable = False
        if not self.readable:
            return
        plan = self.plan
        if plan.compact is not None:  # positions of no class never count as hits
            kept, plan = plan.compact
            logits = logits.index_select(0, kept)
        pred = logits.argmax(dim=1)
        if tokens and self.token_classes is not None:
            pred = self._classes(logits.shape[-1])[pred]
        h = (plan.labels == pred).sum(1)
        self.hits = h if self.hits is None else self.hits.add_(h)

    def _classes(self, vocab: int) -> torch.Tensor:
        if self._lookup is None:
            lookup = torch.full((vocab,), -2, dtype=torch.int64, device=self.device)
            tokens = self.token_classes.to(self.device, torch.int64)
            lookup[tokens] = torch.arange(len(tokens), device=self.device)
            self._lookup = lookup
        return self._lookup


def _run(
    model: nn.Module, loader: Iterable, acc: _Pass, amp: bool, progress: bool, split: str,
    cls_id: int | None = None,
) -> None:  # fmt: skip
    """The pass itself: every batch through the model with the taps on; the first batch
    with the hooks of `traced_forward`, which put the blocks in forward order."""
    default_view = (getattr(loader, "views", None) or ["clean"])[0]
    was_training = model.training
    model.eval()
    bar = progress_bar(loader, progress, f"analyze {split}")
    try:
        with contextlib.ExitStack() as stack:
            taps = None
            for batch in bar:
                x, ys = _split_batch(batch, default_view)
                acc.labels(ys)
                x = to_device(x, acc.device)
                if taps is None:
                    with autocast(acc.device, amp):
                        blocks, pooled, out = traced_forward(
                            model, acc.blocks, x, pool=True, cls_id=cls_id
                        )
                    acc.start(blocks)
                    for i, feats in enumerate(pooled):
                        acc.sink(i, feats)
                    taps = stack.enter_context(Taps(acc.blocks, acc.sink, cls_id))
                else:
                    with autocast(acc.device, amp):
                        out = run_model(model, x, taps)
                acc.outputs(output_logits(out), batch_rows(x))
    finally:
        model.train(was_training)
    if acc.space is None or acc.seen == 0:
        raise NCLayersError("loader yielded no batch; check the data split and subset sizes")
    missing = [b.name for b, s in zip(acc.blocks, acc.block_stats, strict=True) if s is None]
    if missing:
        raise missing_blocks_error(missing)


def _measure(acc: _Pass) -> tuple[list[dict[str, ClassStats]], list, list, int]:
    """(ClassStats per layer and view, metrics per layer and view, accuracies per row,
    samples) over every rank, read from the device at once. Accuracy row 0 is the
    model's, rows 1.. the NCC accuracy of each layer."""
    stats = [s.class_stats() for s in acc.block_stats]
    kept = acc.space.kept()
    nviews = len(acc.space.names)
    hits = acc.hits if acc.hits is not None else torch.zeros_like(kept, dtype=torch.int64)
    correct = torch.stack([hits, *(n.correct for n in acc.nccs or ())])
    seen = acc.seen

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for layer_stats in stats:
            for s in layer_stats.values():
                s.reduce()
        counts = torch.cat([kept, torch.tensor([seen], dtype=kept.dtype, device=kept.device)])
        dist.all_reduce(counts)
        dist.all_reduce(correct)
        kept, seen = counts[:-1], int(counts[-1])
    metrics = torch.stack([collapse_metrics(list(layer.values())) for layer in stats])
    fractions = (correct.double() / kept.clamp_min(1.0)).where(kept > 0, float("nan"))
    if acc.hits is None or not acc.readable:  # the outputs are not the views' classes
        fractions[0] = torch.full((nviews,), float("nan"), dtype=fractions.dtype)
    return stats, metrics.tolist(), fractions.tolist(), seen


def _rows(
    acc: _Pass,
    stats: list[dict[str, ClassStats]],
    metrics: list,
    fractions: list,
    *,
    split: str,
    run: str,
    extra: Mapping | None,
) -> list[dict]:
    k = acc.num_classes
    rows = []
    for i, (block, layer_stats) in enumerate(zip(acc.blocks, stats, strict=True)):
        for v, (view, s) in enumerate(layer_stats.items()):
            n, nc1, nc2 = metrics[i][v]
            if not (math.isfinite(nc1) and math.isfinite(nc2)):
                s.nc1(), s.nc2()  # undefined: raise the ValueError that says why
            row = {
                "run": run,
                "split": split,
                "view": view,
                "layer": i + 1,
                "block": block.name,
                "dim": s.dim,
                "n": int(n),
                "nc1": nc1,
                "cdnv_mean": nc1 / (k * (k - 1)),
                "nc2": nc2,
                "ncc_acc": fractions[i + 1][v] if acc.nccs is not None else None,
            }
            if acc.classic_nc1:
                row["nc1_classic"] = s.nc1_classic()
            if extra:
                row.update(extra)
            rows.append(row)
    return rows


@torch.no_grad()
def analyze(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    blocks: str | Sequence[str] | Sequence[Block] = "auto",
    reference: AnalysisResult | Iterable | None = None,
    split: str = "test",
    classic_nc1: bool = False,
    amp: bool = True,
    progress: bool = True,
    run: str = "",
    extra: Mapping | None = None,
    token_classes: torch.Tensor | None = None,
    cls_id: int | None = None,
) -> AnalysisResult:
    """Measure every block of `model` on one pass over `loader`.

    loader: yields (inputs, labels): inputs a tensor (images) or a tokenised batch (a
        mapping: input_ids, attention_mask, ...); labels a tensor (one view, named after
        `loader.views[0]` if the loader has views, else "clean") or a dict view -> tensor
        (the same views in every batch). A label of -1 leaves that sample out of that
        view; labels below -1 or >= num_classes raise a ValueError after the pass.
    blocks: "auto", module names / glob patterns, or `Block`s from `find_blocks` (pool
        "token" for a token-level task, whose labels are N x T).
    reference: class means for the NCC accuracy: the result of an earlier `analyze`
        (its "clean" view, e.g. of the training split) or another loader, which is then
        analyzed first (split "train"). None: no NCC.
    token_classes: for N x T x V logits, the vocabulary id of each class (default: the
        loader's `token_classes` if it has them); the model is right at a position when
        its top token is that position's class token.
    cls_id: the tokenizer's cls token, where pool "cls" reads each sequence (default: the
        loader's `cls_id`, as `TextBatches` of a `TextData` carry it; None: the first
        real token).
    Returns an `AnalysisResult`: one row per (view, layer) with layer (1-based), block,
    dim, split, view, n, nc1, cdnv_mean, nc2, ncc_acc, and nc1_classic if asked; its
    `stats`, `accuracy`, `samples`, `seconds`, `split` and `blocks` (forward order; a
    module that runs k times per forward is k layers `NAME#1` ... `NAME#k`).
    """
    blocks = resolve_blocks(model, blocks)
    device = _model_device(model)
    if token_classes is None:
        token_classes = getattr(loader, "token_classes", None)
    if cls_id is None:
        cls_id = getattr(loader, "cls_id", None)
    if reference is not None and not isinstance(reference, Table):  # a loader
        reference = analyze(
            model, reference, num_classes, blocks, split="train", amp=amp, progress=progress,
            run=run, token_classes=token_classes, cls_id=cls_id,
        )  # fmt: skip
    ref_stats = _reference_stats(reference)
    # Reference means are checked and centred once, before the pass (that reads the device).
    nccs = [BlockNCC(r, device) for r in ref_stats] if ref_stats is not None else None
    acc = _Pass(blocks, num_classes, device, reference, nccs, classic_nc1, token_classes)
    start = time.perf_counter()
    _run(model, loader, acc, amp, progress, split, cls_id)
    stats, metrics, fractions, seen = _measure(acc)
    seconds = time.perf_counter() - start
    rows = _rows(acc, stats, metrics, fractions, split=split, run=run, extra=extra)
    accuracy = {view: fractions[0][v] for v, view in enumerate(acc.space.names)}
    return AnalysisResult(
        rows, stats=stats, accuracy=accuracy, samples=seen, seconds=seconds, split=split,
        blocks=acc.blocks,
    )  # fmt: skip


__all__ = ["AnalysisResult", "analyze"]
