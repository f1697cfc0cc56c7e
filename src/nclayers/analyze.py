"""One pass over a data split: every block, every labels view, exact statistics.

`analyze(model, loader, num_classes)` hooks every block, runs the model once over the
loader, and for each (block, labels view) accumulates a float64 `ClassStats` (and, given
reference class means, a nearest-class-centre accuracy). The result is a tidy `Table`,
one row per (split, view, layer), that also carries the statistics for later use.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from nclayers.metrics import ClassStats, NCCAccuracy
from nclayers.models.blocks import find_blocks
from nclayers.report.table import Table
from nclayers.taps import Block, Taps


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


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when `amp`; a no-op elsewhere (CPU results never change)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
        `loader.views[0]` if the loader has views, else "clean") or a dict view -> tensor.
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
        raise ValueError("blocks: no block to measure; see `nclayers blocks MODEL`")
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
            raise ValueError(
                f"reference has {len(ref_stats)} layers but {len(blocks)} blocks are measured; "
                "analyze the reference with the same blocks"
            )

    default_view = getattr(loader, "views", ["clean"])[0]
    stats: list[dict[str, ClassStats]] = [{} for _ in blocks]
    ncc: list[dict[str, NCCAccuracy]] = [{} for _ in blocks]
    correct: dict[str, torch.Tensor] = {}
    seen = 0
    views: dict[str, torch.Tensor] = {}

    def sink(index: int, feats: torch.Tensor) -> None:
        layer = stats[index]
        for view, y in views.items():
            if view not in layer:
                layer[view] = ClassStats(num_classes, feats.shape[1], feats.device, classic_nc1)
                if ref_stats is not None:
                    ncc[index][view] = NCCAccuracy(ref_stats[index], device=feats.device)
            layer[view].update(feats, y)
            if ref_stats is not None:
                ncc[index][view].update(feats, y)

    was_training = model.training
    model.eval()
    bar = _progress(loader, progress, f"analyze {split}")
    start = time.perf_counter()
    try:
        with Taps(blocks, sink):
            for batch in bar:
                x, ys = _split_batch(batch, default_view)
                x = x.to(device, non_blocking=True)
                views = {v: y.to(device, non_blocking=True) for v, y in ys.items()}
                with autocast(device, amp):
                    logits = _logits(model(x))
                pred = logits.argmax(dim=1)
                for v, y in views.items():
                    hit = (pred == y).sum()
                    correct[v] = correct[v] + hit if v in correct else hit
                seen += len(x)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("loader yielded no batch; check the data split and subset sizes")

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for layer_stats, layer_ncc in zip(stats, ncc, strict=True):
            for s in layer_stats.values():
                s.reduce()
            for a in layer_ncc.values():
                a.reduce()
        seen_t = torch.tensor(seen, device=device)
        dist.all_reduce(seen_t)
        seen = int(seen_t)
        for c in correct.values():
            dist.all_reduce(c)
    seconds = time.perf_counter() - start

    rows = []
    for i, (block, layer_stats) in enumerate(zip(blocks, stats, strict=True)):
        for view, s in layer_stats.items():
            nc1 = s.nc1()
            row = {
                "run": run,
                "split": split,
                "view": view,
                "layer": i + 1,
                "block": block.name,
                "dim": s.dim,
                "n": int(s.counts.sum().item()),
                "nc1": nc1,
                "cdnv_mean": nc1 / (num_classes * (num_classes - 1)),
                "nc2": s.nc2(),
                "ncc_acc": ncc[i][view].compute() if view in ncc[i] else None,
            }
            if classic_nc1:
                row["nc1_classic"] = s.nc1_classic()
            if extra:
                row.update(extra)
            rows.append(row)
    accuracy = {v: int(c.item()) / seen for v, c in correct.items()}
    table = Table(rows, split=split, samples=seen, seconds=seconds, accuracy=accuracy)
    table.stats = stats
    return table


def _progress(loader, enabled: bool, desc: str):
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    return tqdm(loader, total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
