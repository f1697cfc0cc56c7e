"""The held-out rows that choose each block's learning rate.

`held_out(train, fraction, seed, view)` splits the training split's rows in two: per class,
`round(fraction * n_class)` rows (at least one where a class has two or more) drawn by a
seeded permutation are held out; the others train the heads. Next-token text (classes are
positions, not sequences) holds out whole sequences, the same share, seeded. The two parts
never share a row. `choose(acc, loss)` takes per block the lr whose heads score best on
the held-out rows (ties: the lower held-out loss, then the smaller lr).
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


def choose(acc: torch.Tensor, loss: torch.Tensor, lrs) -> list[int]:
    """Per block (rows of the H x L held-out accuracy and loss), the index of the lr to
    keep: the best accuracy, ties broken by the lower loss, then the smaller lr."""
    order = sorted(range(len(lrs)), key=lambda j: lrs[j])
    out = []
    for a, l in zip(acc.tolist(), loss.tolist(), strict=True):
        out.append(min(order, key=lambda j: (-a[j], l[j] if l[j] == l[j] else float("inf"))))
    return out


__all__ = ["choose", "held_out"]
