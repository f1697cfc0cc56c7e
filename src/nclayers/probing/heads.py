"""The probe heads: one linear classifier per (block, learning rate), stored together, and
the SGD step that gives each learning rate of the grid its own step size.

`ProbeHeads(dims, num_classes, n_lr)`: the blocks' pooled features, concatenated, go
into a zero-padded H x B x max(dims) tensor and one batched matmul against the stacked
weights H x max(dims) x (n_lr * K) gives every head's logits, H x B x n_lr x K. The heads
of one block share its features; only their weights differ. Padded weight entries see zero
inputs, so their gradient is zero and (zero-initialised) they stay zero.

Zero initialisation: the probe is a convex problem, so the start does not matter for the
optimum, and zero makes the result independent of random state and of the rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nclayers.errors import NCLayersError

_EPS = 1e-8  # added to each feature's variance before standardising (constant features)


class ProbeHeads(nn.Module):
    """One linear classifier per block and learning rate (`n_lr` heads per block).

    Input: the blocks' pooled features concatenated, B x sum(dims) (float32); output
    H x B x n_lr x K. With `standardize`, features are first shifted and scaled per
    feature by `mean`/`scale` (training statistics); `linear()` folds this into plain
    `nn.Linear` heads. The weights and biases are one flat parameter `theta` (one gradient
    to all_reduce), laid out so that `theta.view(-1, n_lr, K)` has the learning rate in
    its middle dimension (what `GridSGD` scales).
    """

    def __init__(self, dims: Sequence[int], num_classes: int, n_lr: int = 1) -> None:
        super().__init__()
        self.dims = [int(d) for d in dims]
        self.num_classes, self.n_lr = int(num_classes), int(n_lr)
        h, dmax, k = len(self.dims), max(self.dims), self.num_classes
        self._split = h * dmax * self.n_lr * k
        self.theta = nn.Parameter(torch.zeros(self._split + h * self.n_lr * k))
        pos = torch.cat([i * dmax + torch.arange(d) for i, d in enumerate(self.dims)])
        self.register_buffer("pos", pos, persistent=False)
        self.register_buffer("mean", torch.zeros(sum(self.dims)))
        self.register_buffer("scale", torch.ones(sum(self.dims)))

    @property
    def weight(self) -> torch.Tensor:
        """H x max(dims) x n_lr x K (a view of `theta`)."""
        h, k = len(self.dims), self.num_classes
        return self.theta[: self._split].view(h, -1, self.n_lr, k)

    @property
    def bias(self) -> torch.Tensor:
        """H x 1 x n_lr x K (a view of `theta`)."""
        return self.theta[self._split :].view(len(self.dims), 1, self.n_lr, self.num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, h, k = features.shape[0], len(self.dims), self.num_classes
        x = (features - self.mean) * self.scale
        padded = x.new_zeros(n, h * max(self.dims)).index_copy_(1, self.pos, x)
        padded = padded.view(n, h, -1).transpose(0, 1)
        weight = self.theta[: self._split].view(h, -1, self.n_lr * k)
        bias = self.theta[self._split :].view(h, 1, self.n_lr * k)
        return torch.baddbmm(bias, padded, weight).view(h, n, self.n_lr, k)

    def set_standardization(
        self, mean: torch.Tensor, var: torch.Tensor, per: str = "feature"
    ) -> None:
        """Shift every feature by its mean; scale it by 1/sd, its own ("feature") or, with
        `per="block"`, one per block: 1/sqrt of the mean variance of the block's features
        (the block's scale is set, its geometry kept)."""
        if per not in ("feature", "block"):
            raise NCLayersError(f"per={per!r}: standardise per 'feature' or per 'block'")
        var = var.to(self.scale)
        if per == "block":
            var = torch.cat([part.mean().expand(len(part)) for part in var.split(self.dims)])
        self.mean.copy_(mean.to(self.mean))
        self.scale.copy_(torch.rsqrt(var + _EPS))

    def select(self, choice: Sequence[int]) -> ProbeHeads:
        """The heads of one learning rate per block (`choice[i]`: an index into the grid
        for block i), as ProbeHeads with n_lr 1 and the same standardisation."""
        if len(choice) != len(self.dims):
            raise NCLayersError(f"choice: {len(choice)} indices for {len(self.dims)} blocks")
        out = ProbeHeads(self.dims, self.num_classes).to(self.theta.device)
        index = torch.as_tensor(list(choice), device=self.theta.device)
        rows = torch.arange(len(self.dims), device=self.theta.device)
        with torch.no_grad():
            out.weight.copy_(self.weight[rows, :, index].unsqueeze(2))
            out.bias.copy_(self.bias[rows, :, index].unsqueeze(2))
            out.mean.copy_(self.mean)
            out.scale.copy_(self.scale)
        return out

    def linear(self) -> list[nn.Linear]:
        """The heads as `nn.Linear` on each block's raw pooled feature (standardisation
        folded in): `linear()[l](pooled_l)` equals `forward(features)[l, :, 0]`."""
        if self.n_lr != 1:
            raise NCLayersError(
                f"heads: {self.n_lr} learning rates per block; take one per block first "
                "(heads.select(choice), as `probe` does) to get nn.Linear heads"
            )
        heads, start = [], 0
        for i, d in enumerate(self.dims):
            w = self.weight[i, :d, 0].detach().T * self.scale[start : start + d]
            b = self.bias[i, 0, 0].detach() - w @ self.mean[start : start + d]
            layer = nn.Linear(d, self.num_classes).to(w)
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            heads.append(layer)
            start += d
        return heads


class GridSGD:
    """SGD with heavy-ball momentum and weight decay on `heads.theta` (torch.optim.SGD's
    update with dampening 0: buf = momentum * buf + grad + wd * theta; theta -= lr * buf),
    where lr is `lrs[j] * factor` for the heads of the j-th learning rate. Momentum and
    weight decay act element-wise, so every head has its own optimiser state; the
    per-head rates cost one broadcast multiply per step."""

    def __init__(
        self, heads: ProbeHeads, lrs: Sequence[float], momentum: float, weight_decay: float
    ) -> None:
        if len(lrs) != heads.n_lr:
            raise NCLayersError(f"lrs: {len(lrs)} values for heads of {heads.n_lr} lrs")
        self.heads, self.momentum, self.weight_decay = heads, momentum, weight_decay
        theta = heads.theta
        self.lrs = torch.tensor(list(lrs), dtype=theta.dtype, device=theta.device)
        self.buf = torch.zeros_like(theta)

    def zero_grad(self) -> None:
        if self.heads.theta.grad is not None:
            self.heads.theta.grad.zero_()

    @torch.no_grad()
    def step(self, factor: float) -> None:
        theta = self.heads.theta
        grad = theta.grad
        if self.weight_decay:
            grad = grad.add(theta, alpha=self.weight_decay)
        self.buf.mul_(self.momentum).add_(grad)
        shape = (-1, self.heads.n_lr, self.heads.num_classes)
        rate = (self.lrs * factor).view(1, -1, 1)
        theta.view(shape).sub_(self.buf.view(shape) * rate)

    def state_dict(self) -> dict:
        return {"momentum_buffer": self.buf.detach().clone(), "lrs": self.lrs.tolist(),
                "momentum": self.momentum, "weight_decay": self.weight_decay}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.buf.copy_(state["momentum_buffer"])


__all__ = ["GridSGD", "ProbeHeads"]
