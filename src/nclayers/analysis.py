"""One pass over a data split: every block, every labels view, exact statistics.

`analyze(model, loader, num_classes)` hooks every block, runs the model once over the
loader, and for each (block, labels view) accumulates exact float64 class statistics
(and, given reference class means, a nearest-class-centre accuracy). The result is a tidy
`Table`, one row per (split, view, layer), that also carries the `ClassStats`.

The pass costs about as much as inference, on a GPU too: the labels of a batch are
planned once (`LabelViews.plan`) and every block then updates all views together with a
few fused operations (`BlockStats`, `BlockNCC`); nothing in the pass reads the device, so
the host never waits for it. Counts, accuracies and errors are read once, at the end.
A label of -1 leaves the sample out of that view (its statistics and accuracies).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

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
from nclayers.models.blocks import find_blocks
from nclayers.runtime import autocast
from nclayers.runtime import progress as progress_bar
from nclayers.table import Table
from nclayers.taps import Block, Taps, missing_blocks_error


def _split_batch(batch, default_view: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(batch, Mapping):  # e.g. {"image": x, "label": y}
        x = batch.get("image", batch.get("images", batch.get("x")))
        y = batch.get("label", batch.get("labels", batch.get("y")))
    else:
        x, y = batch[0], batch[1]
    views = dict(y) if isinstance(y, Mapping) else {default_view: y}
    return x, views


def _logits(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "logits"):  # e.g. Hugging Face model outputs
        output = output.logits
    return output


@torch.no_grad()
def analyze(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    blocks: str | Sequence[str] | Sequence[Block] = "auto",
    reference: Table | Iterable | None = None,
    split: str = "test",
    classic_nc1: bool = False,
    amp: bool = True,
    progress: bool = True,
    run: str = "",
    extra: Mapping | None = None,
) -> Table:
    """Measure every block of `model` on one pass over `loader`.

    loader: yields (images, labels) where labels is a tensor (one view, named after
        `loader.views[0]` if the loader has views, else "clean") or a dict view -> tensor
        (the same views in every batch). A label of -1 leaves that sample out of that
        view; labels below -1 or >= num_classes raise a ValueError after the pass.
    blocks: "auto", module names / glob patterns, or `Block`s from `find_blocks`.
    reference: class means for the NCC accuracy: a Table returned by an earlier
        `analyze` (its "clean" view, e.g. of the training split) or another loader,
        which is then analyzed first (split "train"). None: no NCC.
    Returns a Table with one row per (view, layer): layer (1-based), block, dim, split,
    view, n, nc1, cdnv_mean, nc2, ncc_acc, and nc1_classic if asked. `table.stats`
    holds the ClassStats per layer and view, `table.meta` accuracies and timings.
    """
    if isinstance(blocks, (str,)) or (
        isinstance(blocks, Sequence) and blocks and not isinstance(blocks[0], Block)
    ):
        blocks = find_blocks(model, blocks)
    blocks = list(blocks)
    if not blocks:
        raise NCLayersError("blocks: no block to measure; see `nclayers blocks MODEL`")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    if reference is not None and not isinstance(reference, Table):
        reference = analyze(
            model, reference, num_classes, blocks, split="train", classic_nc1=False,
            amp=amp, progress=progress, run=run,
        )  # fmt: skip
    ref_stats: list[ClassStats] | None = None
    if reference is not None:
        ref_view = "clean" if "clean" in reference.stats[0] else next(iter(reference.stats[0]))
        ref_stats = [layer[ref_view] for layer in reference.stats]
        if len(ref_stats) != len(blocks):
            raise NCLayersError(
                f"reference has {len(ref_stats)} layers but {len(blocks)} blocks are measured; "
                "analyze the reference with the same blocks"
            )

    default_view = getattr(loader, "views", ["clean"])[0]
    # Reference means are checked and centred once, before the pass (that reads the device).
    nccs = [BlockNCC(r, device) for r in ref_stats] if ref_stats is not None else None
    space: LabelViews | None = None  # the labels views, stacked; fixed by the first batch
    block_stats: list[BlockStats | None] = [None] * len(blocks)
    plan: LabelPlan | None = None  # this batch's labels, shared by every block
    hits: torch.Tensor | None = None  # model accuracy, per view
    seen = 0

    def sink(index: int, feats: torch.Tensor) -> None:
        stats = block_stats[index]
        if stats is None:
            stats = block_stats[index] = BlockStats(space, feats.shape[1], classic_nc1)
        stats.update(feats, plan)
        if nccs is not None:
            nccs[index].update(feats, plan)

    was_training = model.training
    model.eval()
    bar = progress_bar(loader, progress, f"analyze {split}")
    start = time.perf_counter()
    try:
        with Taps(blocks, sink):
            for batch in bar:
                x, ys = _split_batch(batch, default_view)
                if space is None:
                    space = LabelViews(list(ys), num_classes, device)
                elif set(ys) != set(space.names):
                    raise NCLayersError(
                        f"loader: a batch has labels views {sorted(ys)}, the first had "
                        f"{sorted(space.names)}; every batch needs the same views"
                    )
                plan = space.plan([ys[v] for v in space.names])
                x = x.to(device, non_blocking=True)
                with autocast(device, amp):
                    logits = _logits(model(x))
                h = (plan.labels == logits.argmax(dim=1)).sum(1)
                hits = h if hits is None else hits.add_(h)
                seen += len(x)
    finally:
        model.train(was_training)
    if space is None or seen == 0:
        raise NCLayersError("loader yielded no batch; check the data split and subset sizes")
    missing = [b.name for b, s in zip(blocks, block_stats, strict=True) if s is None]
    if missing:
        raise missing_blocks_error(missing)
    stats = [s.class_stats() for s in block_stats]
    kept = space.kept()
    correct = torch.stack([hits, *(n.correct for n in nccs or ())])

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for layer_stats in stats:
            for s in layer_stats.values():
                s.reduce()
        counts = torch.cat([kept, torch.tensor([seen], dtype=kept.dtype, device=kept.device)])
        dist.all_reduce(counts)
        dist.all_reduce(correct)
        kept, seen = counts[:-1], int(counts[-1])
    # Every metric and accuracy of the pass, computed on the device and read at once.
    metrics = torch.stack([collapse_metrics(list(layer.values())) for layer in stats])
    fractions = (correct.double() / kept.clamp_min(1.0)).where(kept > 0, float("nan"))
    metrics, fractions = metrics.tolist(), fractions.tolist()
    seconds = time.perf_counter() - start
    frac = {
        (row, view): fractions[row][v]
        for row in range(len(fractions))
        for v, view in enumerate(space.names)
    }

    rows = []
    for i, (block, layer_stats) in enumerate(zip(blocks, stats, strict=True)):
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
                "cdnv_mean": nc1 / (num_classes * (num_classes - 1)),
                "nc2": nc2,
                "ncc_acc": frac[(i + 1, view)] if nccs is not None else None,
            }
            if classic_nc1:
                row["nc1_classic"] = s.nc1_classic()
            if extra:
                row.update(extra)
            rows.append(row)
    accuracy = {view: frac[(0, view)] for view in space.names}
    table = Table(rows, split=split, samples=seen, seconds=seconds, accuracy=accuracy)
    table.stats = stats
    return table
