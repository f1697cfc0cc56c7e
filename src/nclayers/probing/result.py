"""What a probe gives back: `ProbeResult` (one row per block), the heads' scores on a
split (`score_heads`), what to save of the heads (`heads_state`,
`load_heads`), and the check that says when a probe underfits (`underfit`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nclayers.data import make_batches
from nclayers.probing.features import Backbone
from nclayers.probing.heads import ProbeHeads
from nclayers.runtime import all_sum, counter
from nclayers.runtime import world as world_of
from nclayers.table import Table
from nclayers.taps import Block

# A probe more than this below NCC accuracy on the same split has not found the linear
# classifier NCC shows exists (NCC is itself one): it underfits.
UNDERFIT_MARGIN = 0.02
UNDERFIT = "probe below NCC: underfit; raise probe.epochs or widen probe.lrs"


@torch.no_grad()
def score_heads(
    model: nn.Module,
    heads: ProbeHeads,
    blocks: Sequence[Block],
    split,
    view: str = "clean",
    batch_size: int = 500,
    amp: bool = True,
    channels_last: bool = False,
    progress: bool = False,
    next_token=None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every head's accuracy and mean cross-entropy on `split` (the `view` labels,
    unaugmented; with `next_token` the positions whose next token is a class), as
    (H x n_lr accuracy, H x n_lr loss, samples), summed over all torch.distributed ranks
    (each scores its disjoint shard). Heads of one lr per block (what `probe` returns and
    `load_heads` gives): `acc[:, 0]` is one accuracy per block."""
    rank, world = world_of()
    was_training = model.training
    model.eval()
    backbone = Backbone(model, list(blocks), amp, getattr(split, "cls_id", None))
    batches = make_batches(
        split, batch_size, backbone.device, views=[view], shard=(rank, world),
        channels_last=channels_last, next_token=next_token,
    )  # fmt: skip
    h, n_lr, k = len(heads.dims), heads.n_lr, heads.num_classes
    sums = torch.zeros(2 * h * n_lr + 1, dtype=torch.float64, device=backbone.device)
    bar = counter(len(batches), progress, "probe test", unit="batch")
    try:
        with backbone.taps:
            for x, y in batches:
                y = y.reshape(-1)  # next-token labels: one per position, -1 left out
                logits = heads(backbone.features(x))  # H x B x L x K
                hits = (logits.argmax(-1) == y[:, None]).sum(1)  # -1 is never a class
                losses = F.cross_entropy(
                    logits.reshape(-1, k), y[None, :, None].expand(h, -1, n_lr).reshape(-1),
                    ignore_index=-1, reduction="none",
                ).view(h, -1, n_lr).sum(1)  # fmt: skip
                sums[: h * n_lr] += hits.flatten()
                sums[h * n_lr : -1] += losses.flatten()
                sums[-1] += (y >= 0).sum()
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    sums = all_sum(sums).cpu()
    n = int(sums[-1].item())
    acc = (sums[: h * n_lr] / max(n, 1)).view(h, n_lr)
    loss = (sums[h * n_lr : -1] / max(n, 1)).view(h, n_lr)
    return acc, loss, n


def underfit(probe_acc: float | None, ncc_acc: float | None) -> bool | None:
    """True where the probe is more than UNDERFIT_MARGIN below NCC on the same split,
    None where either is missing."""
    if probe_acc is None or ncc_acc is None:
        return None
    return probe_acc < ncc_acc - UNDERFIT_MARGIN


def underfit_note(rows: Sequence[dict]) -> str | None:
    """One line naming the blocks whose probe underfits (their probe_acc and ncc_acc),
    or None. It applies `underfit` to the rows' values (a layers.csv written without the
    `probe_underfit` column reads the same)."""
    bad = [r for r in rows if underfit(r.get("probe_acc"), r.get("ncc_acc"))]
    if not bad:
        return None
    where = ", ".join(f"{r['block']} ({r['probe_acc']:.3f} vs NCC {r['ncc_acc']:.3f})" for r in bad)
    return f"{UNDERFIT}: {where}"


class ProbeResult(Table):
    """What `probe` returns: one row per block (split "test", view, layer, block, dim,
    n = test samples, probe_acc, probe_lr: the learning rate chosen on the held-out rows),
    and

    history: a Table, per epoch, block and learning rate of the grid: epoch, layer, block,
        probe_lr (the head's), lr (its scheduled rate that epoch), loss and train_acc
        (mean loss and accuracy on that epoch's training batches);
    selection: a Table, per block and lr: val_acc and val_loss on the held-out rows, and
        chosen (empty with a single lr: nothing is held out);
    heads: the chosen `ProbeHeads` (one per block; `heads.linear()`: nn.Linear per block);
    grid: every head of the grid (ProbeHeads with n_lr = len(lrs));
    state: the final state, as given to `on_epoch` (`heads_state(result)` is what to save);
    mode ("stream" or "cache"), epochs, resumed_from (epochs done before this call),
    train_samples (rows that trained the heads), val_samples (held out), test_samples,
    world (processes), seconds (all), train_seconds (the passes and epochs before
    testing), skipped (unreadable files left out, image folders with skip_bad).
    """

    def __init__(
        self, rows, *, history: Table, selection: Table, heads: ProbeHeads, grid: ProbeHeads,
        state: dict, mode: str, epochs: int, resumed_from: int, train_samples: int,
        val_samples: int, test_samples: int, world: int, seconds: float,
        train_seconds: float, skipped: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(rows)
        self.history, self.selection, self.heads, self.grid = history, selection, heads, grid
        self.state, self.mode, self.epochs, self.resumed_from = state, mode, epochs, resumed_from
        self.train_samples, self.val_samples = train_samples, val_samples
        self.test_samples, self.world = test_samples, world
        self.seconds, self.train_seconds, self.skipped = seconds, train_seconds, skipped

    def summary(self) -> dict:
        """The numbers of the run (no tensors), e.g. for summary.json."""
        keys = ("mode", "epochs", "resumed_from", "train_samples", "val_samples",
                "test_samples", "world", "seconds", "train_seconds", "skipped")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


def heads_state(result: ProbeResult) -> dict:
    """What to save of a probe result: blocks, dims, classes, the chosen heads (with the
    folded `nn.Linear` weights per block for use without nclayers), each block's chosen
    lr, accuracies and the run's numbers."""
    heads = result.heads
    linear = heads.linear()
    return {
        "blocks": [r["block"] for r in result],
        "dims": list(heads.dims),
        "num_classes": heads.num_classes,
        "heads": {k: v.detach().cpu() for k, v in heads.state_dict().items()},
        "linear": [{k: v.detach().cpu() for k, v in h.state_dict().items()} for h in linear],
        "probe_acc": [r["probe_acc"] for r in result],
        "probe_lr": [r["probe_lr"] for r in result],
        "meta": result.summary(),
    }


def load_heads(saved: dict, device: torch.device | str = "cpu") -> ProbeHeads:
    """`ProbeHeads` from `heads_state(...)`, e.g. to re-evaluate with `score_heads`."""
    heads = ProbeHeads(saved["dims"], saved["num_classes"])
    heads.load_state_dict(saved["heads"])
    return heads.to(device)


__all__ = ["UNDERFIT", "ProbeResult", "heads_state", "load_heads", "score_heads", "underfit",
           "underfit_note"]  # fmt: skip
