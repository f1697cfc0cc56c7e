"""The held-out rows that choose each block's learning rate.

`held_out(train, fraction, seed, view)` splits the training split's rows in two: per class,
`round(fraction * n_class)` rows (at least one where a class has two or more) drawn by a
seeded permutation are held out; the others train the heads. Next-token text (classes are
positions, not sequences) holds out whole sequences, the same share, seeded. The two parts
never share a row. `choose(acc, loss, lrs, by)` takes per block the lr whose heads score
best on the held-out rows: by default the lowest held-out cross-entropy (ties: the higher
accuracy, then the smaller lr); `by="accuracy"` the highest accuracy (ties: the lower loss,
then the smaller lr).

Why the loss: a held-out part of a few dozen rows ranks heads by accuracy in steps of one
row, so heads that generalise very differently tie or swap on a row or two; the
cross-entropy is continuous and charges a head for every confident mistake, which is what
a head that fitted individual training rows makes. On a model that memorised shuffled
labels this matters: its last blocks place the mislabelled training images in their noisy
class's cluster, a probe learning their clean labels with a large step size fits them, and
held-out accuracy preferred such a head (the demo's noisy run, last block: 0.09 below NCC
on the test split) where the held-out loss keeps the head that stays with the clusters.
"""

from __future__ import annotations

import torch

from nclayers.errors import NCLayersError


def held_out(
    train, fraction: float, seed: int, view: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows) of `train`, both sorted; `view` None: next-token
    text (sequences drawn without regard to class)."""
    n = len(train)
    gen = torch.Generator().manual_seed(seed)
    if view is None:
        k = min(n - 1, max(1, round(fraction * n)))
        val = torch.randperm(n, generator=gen)[:k]
    else:
        y = train.labels[view].cpu()
        parts = []
        for c in torch.unique(y).tolist():
            rows = (y == c).nonzero().flatten()
            if len(rows) < 2:
                continue
            k = min(len(rows) - 1, max(1, round(fraction * len(rows))))
            parts.append(rows[torch.randperm(len(rows), generator=gen)[:k]])
        val = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    if len(val) == 0 or len(val) == n:
        raise NCLayersError(
            f"val_fraction={fraction}: the {n} training rows leave no held-out rows to choose "
            "the learning rate by; use more training data or one lr (probe.lrs=[0.1])"
        )
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val.sort().values


def choose(acc: torch.Tensor, loss: torch.Tensor, lrs, by: str = "loss") -> list[int]:
    """Per block (rows of the H x L held-out accuracy and loss), the index of the lr to
    keep: `by="loss"`, the lowest loss (a NaN loss counts as infinite), ties broken by the
    higher accuracy; `by="accuracy"`, the highest accuracy, ties broken by the lower loss;
    then the smaller lr."""
    if by not in ("loss", "accuracy"):
        raise NCLayersError(f"by={by!r}: choose the lr by 'loss' or 'accuracy'")
    order = sorted(range(len(lrs)), key=lambda j: lrs[j])
    out = []
    for accs, losses in zip(acc.tolist(), loss.tolist(), strict=True):
        ce = [x if x == x else float("inf") for x in losses]  # NaN: a diverged head

        def rank(j: int, accs=accs, ce=ce) -> tuple[float, float]:
            return (ce[j], -accs[j]) if by == "loss" else (-accs[j], ce[j])

        out.append(min(order, key=rank))
    return out


__all__ = ["choose", "held_out"]
