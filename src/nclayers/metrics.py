"""Exact per-class feature statistics and the neural-collapse metrics built on them.

`ClassStats` keeps, per class, the sample count, the mean and the sum of squared
deviations from that mean (a scalar: the trace of the class scatter), all in float64.
States merge with Chan et al.'s pairwise combination, so batches, devices and processes
merge exactly in any order; the one-pass `E[h^2] - E[h]^2` shortcut is never used because
it cancels catastrophically for collapsed features far from the origin.

The streaming path that `analyze` uses measures every labels view of a block with a
handful of fused tensor operations per batch and no host synchronisation:

- `LabelViews` stacks the V labels views of a pass into one index space of V x (K + 3)
  rows; its `plan(labels)`, built once per batch and shared by every block, holds the
  row of each (view, sample) and counts the samples per row.
- `BlockStats` keeps, per row, float64 sums of `h - s` and `(h - s)^2` around a shift `s`
  fixed from the first batch (that batch's class mean), so the variance is a difference
  of numbers of the size of the class spread, not of `||h||^2`. One `index_add_` per
  sum serves all views; `class_stats()` turns the sums into `ClassStats` at the end.
- A label of -1 means "this sample is not part of this view": it lands in a spare row
  and counts nowhere. Labels below -1 or >= K land in other spare rows and are reported,
  with non-finite features, when a metric is computed (`ClassStats.check`).

Conventions follow DESIGN.md / paper Eqs. 4-5:
    var_k = (1/n_k) sum_i ||h_ki - mu_k||^2
    nc1   = sum_{k != k'} (var_k + var_k') / (2 ||mu_k - mu_k'||^2)   (ordered pairs)
    nc2   = || G/||G||_F - (I - 11^T/K)/sqrt(K-1) ||_F,  G = M^T M,  M = [mu_k - mu_G]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from nclayers.errors import NCLayersError

__all__ = [
    "BlockNCC",
    "BlockStats",
    "ClassStats",
    "LabelPlan",
    "LabelViews",
    "NCCAccuracy",
    "cdnv_mean",
    "collapse_metrics",
    "gram_distances",
    "nc1",
    "nc1_classic",
    "nc2",
    "ncc_accuracy",
    "square_distances",
]

# Spare rows per view in the stacked index space: labels < -1, label -1, labels >= K.
_LOW, _SKIP, _SPARE = 0, 1, 3
SKIP_LABEL = -1


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x))
        except Exception as err:  # pragma: no cover - exotic inputs
            raise NCLayersError(
                f"{name}: expected an array or tensor, got {type(x).__name__}"
            ) from err
    return x


# ---------------------------------------------------------------------- streaming path
def _scratch(buffer: torch.Tensor | None, rows: int, cols: int, device):
    """(`buffer`, grown to at least `rows` x `cols` float64, and its first `rows` rows):
    scratch that a pass reuses batch after batch instead of allocating (on the CPU every
    fresh allocation costs fresh pages); sliced only for a shorter batch."""
    if buffer is None or buffer.shape[0] < rows:
        buffer = torch.empty(rows, cols, dtype=torch.float64, device=device)
    return buffer, (buffer if buffer.shape[0] == rows else buffer[:rows])


class LabelPlan:
    """The label work of one batch, built once by `LabelViews.plan` and shared by every
    block's update. `labels` is V x B (int64, as given); `index` the V*B rows of the
    stacked index space, view-major."""

    def __init__(
        self, views: LabelViews, labels: torch.Tensor, index: torch.Tensor, sparse: bool = False
    ) -> None:
        self.views = views
        self.sparse = sparse  # worth leaving out the samples of no class (`compact`)
        self.labels = labels
        self.index = index
        self.batch = labels.shape[1]
        self._counts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._weight: torch.Tensor | None = None
        self._compact: tuple[torch.Tensor, LabelPlan] | None = None
        self._to_compact = sparse  # `compact` not built yet

    @property
    def compact(self) -> tuple[torch.Tensor, LabelPlan] | None:
        """(the samples that belong to a class of some view, as int64 positions; the plan
        of those samples alone), or None where every sample does, or where choosing them
        would wait for the device. The other samples add only to rows that no statistic
        reads (label -1, invalid labels: their counts are in `views.counts` already), so
        leaving them out changes no value: every class row gets the same terms in the
        same order. Next-token batches keep about half their positions (padding, the
        last token and tokens outside the top K are -1).

        Built for `sparse` plans (`LabelViews.plan(..., sparse=True)`: token labels) on
        the CPU only: elsewhere the number of kept samples (`nonzero`) is a read of the
        device, which the pass never waits for."""
        if self._to_compact:
            self._to_compact = False
            if self.index.device.type == "cpu":
                y = self.labels
                keep = ((y >= 0) & (y < self.views.num_classes)).any(0)
                rows = keep.nonzero().squeeze(1)  # its size is known on the host
                if rows.shape[0] < self.batch:
                    index = self.index.view(y.shape[0], -1).index_select(1, rows).reshape(-1)
                    self._compact = (rows, LabelPlan(self.views, y.index_select(1, rows), index))
        return self._compact

    def first_shift_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows with a sample in this batch, their counts clamped to >= 1), both rows x 1:
        what every block's first update needs, computed once."""
        if self._counts is None:
            counts = torch.zeros(self.views.rows, dtype=torch.float64, device=self.index.device)
            counts.index_add_(0, self.index, self.views.ones(self.index.shape[0]))
            counts = counts.unsqueeze(1)
            self._counts = (counts > 0, counts.clamp_min(1.0))
        return self._counts

    @property
    def weight(self) -> torch.Tensor:
        """V*B x 1 float64: 1 where the sample belongs to a class of its view, else 0."""
        if self._weight is None:
            y = self.labels
            keep = (y >= 0) & (y < self.views.num_classes)
            self._weight = keep.to(torch.float64).view(-1, 1)
        return self._weight


class LabelViews:
    """The labels views of one pass, stacked into one index space.

    View v owns rows v*(K+3) .. v*(K+3)+K+2: row 0 takes labels below -1 (invalid), row 1
    label -1 (the sample is not part of this view), rows 2..K+1 the classes and row K+2
    labels >= K (invalid). `plan(labels)`, once per batch, maps a batch's labels to rows
    and adds them to `counts`, the samples per row over the pass so far.
    """

    def __init__(
        self, names: Sequence[str], num_classes: int, device: torch.device | str = "cpu"
    ) -> None:
        if int(num_classes) < 2:
            raise NCLayersError(
                f"num_classes={num_classes}: neural-collapse metrics need at least two classes"
            )
        self.names = tuple(names)
        if not self.names:
            raise NCLayersError("labels: no labels view given")
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.width = self.num_classes + _SPARE
        self.rows = len(self.names) * self.width
        # label y of view v -> row v*width + clamp(y, -2, K) + 2
        base = torch.arange(len(self.names), device=self.device) * self.width + 2
        self._base = base.view(-1, 1)
        self.counts = torch.zeros(self.rows, dtype=torch.float64, device=self.device)
        self._ones: torch.Tensor | None = None

    def plan(self, labels: Sequence[torch.Tensor], sparse: bool = False) -> LabelPlan:
        """Map one batch's labels (one tensor per view, in `names` order) to rows.
        `sparse`: many samples belong to no class (-1), e.g. the positions of next-token
        labels: the updates may then leave them out (`LabelPlan.compact`)."""
        if len(labels) != len(self.names):
            raise NCLayersError(
                f"labels: expected {len(self.names)} views {list(self.names)}, got {len(labels)}"
            )
        size = None
        for name, y in zip(self.names, labels, strict=True):
            if y.ndim != 1 or (size is not None and y.shape[0] != size):
                raise NCLayersError(
                    f"labels of view {name!r}: expected one label per sample, shape "
                    f"({size if size is not None else 'N'},), got {tuple(y.shape)}"
                )
            if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
                raise NCLayersError(
                    f"labels of view {name!r}: expected integer class indices, got {y.dtype}"
                )
            size = y.shape[0]
        # Asynchronous copies are safe only towards an accelerator, never back to the host.
        async_copy = self.device.type != "cpu"
        y = torch.stack(labels) if len(labels) > 1 else labels[0].unsqueeze(0)
        y = y.to(self.device, torch.int64, non_blocking=async_copy)
        index = (y.clamp(-2, self.num_classes) + self._base).view(-1)
        self.counts.index_add_(0, index, self.ones(index.shape[0]))
        return LabelPlan(self, y, index, sparse)

    def ones(self, n: int) -> torch.Tensor:
        """n float64 ones, kept for the next batch of the same size."""
        if self._ones is None or self._ones.shape[0] != n:
            self._ones = torch.ones(n, dtype=torch.float64, device=self.device)
        return self._ones

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """The per-row tensor `t` as V x (K+3) x ..."""
        return t.view(len(self.names), self.width, *t.shape[1:])

    def class_counts(self) -> torch.Tensor:
        """V x K float64 samples per (view, class)."""
        return self._rows(self.counts)[:, 2 : 2 + self.num_classes]

    def kept(self) -> torch.Tensor:
        """Samples per view that belong to one of its classes (V, float64)."""
        return self.class_counts().sum(1)

    def invalid(self) -> torch.Tensor:
        """Labels per view below -1 or >= K (V, int64)."""
        rows = self._rows(self.counts)
        return (rows[:, _LOW] + rows[:, -1]).to(torch.int64)


class BlockStats:
    """One block's class statistics for every labels view of a pass.

    Per row of the `LabelViews` index space: float64 sums of `h - s` and, per dimension,
    of `(h - s)^2`, with the shift `s` the class mean of the first batch (for a class
    absent from it: that batch's mean). One update is five tensor operations for all
    views together, none of which waits for the device.
    """

    def __init__(self, views: LabelViews, dim: int, scatter: bool = False) -> None:
        if int(dim) < 1:
            raise NCLayersError(f"dim={dim}: the feature dimension must be a positive integer")
        self.views = views
        self.dim = int(dim)
        f64 = dict(dtype=torch.float64, device=views.device)
        self.shift: torch.Tensor | None = None
        self.s1 = torch.zeros(views.rows, self.dim, **f64)
        self.s2 = torch.zeros(views.rows, self.dim, **f64)
        nv = len(views.names)
        self.scatter = torch.zeros(nv, self.dim, self.dim, **f64) if scatter else None
        self._work: torch.Tensor | None = None  # the centred batch, reused

    def update(self, features: torch.Tensor, plan: LabelPlan) -> BlockStats:
        """Add one batch: `features` B x D (any float dtype, on the views' device)."""
        if features.ndim != 2 or features.shape != (plan.batch, self.dim):
            raise NCLayersError(
                f"features: expected shape ({plan.batch}, {self.dim}) (one pooled vector per "
                f"sample), got {tuple(features.shape)}"
            )
        if self.shift is not None and plan.compact is not None:  # the first batch: all
            rows, plan = plan.compact  # samples, for the shift of classes absent from it
            features = features.index_select(0, rows)
        nv = len(self.views.names)
        x = features.repeat(nv, 1) if nv > 1 else features
        if self.shift is None:
            self.shift = self._first_shift(x, plan)
        c = self._centred(x, plan.index)
        self.s1.index_add_(0, plan.index, c)
        if self.scatter is not None:
            cw = (c * plan.weight).view(nv, plan.batch, self.dim)
            self.scatter.baddbmm_(cw.transpose(1, 2), cw)
        self.s2.index_add_(0, plan.index, c.square_())
        return self

    def _centred(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`x - shift[index]` in float64 (float32 - float64 promotes: the float32 values
        are exact in it), written into scratch kept for the next batch."""
        self._work, work = _scratch(self._work, x.shape[0], self.dim, x.device)
        torch.index_select(self.shift, 0, index, out=work)
        return torch.sub(x, work, out=work)

    def _first_shift(self, x: torch.Tensor, plan: LabelPlan) -> torch.Tensor:
        x = x.to(torch.float64)
        present, n = plan.first_shift_parts()
        sums = torch.zeros_like(self.s1).index_add_(0, plan.index, x)
        # A row without a sample in this batch is shifted by the batch mean instead.
        return torch.where(present, sums / n, x.mean(0))

    def class_stats(self) -> dict[str, ClassStats]:
        """The statistics of each view as exact `ClassStats` (count, mean, M2)."""
        views = self.views
        k = views.num_classes
        out: dict[str, ClassStats] = {}
        if self.shift is None:
            raise NCLayersError("BlockStats: no batch was added")
        counts = views.class_counts()
        invalid = views.invalid()
        cls = slice(2, 2 + k)
        s1 = views._rows(self.s1)[:, cls]
        s2 = views._rows(self.s2)[:, cls]
        shift = views._rows(self.shift)[:, cls]
        n = counts.unsqueeze(2)
        delta = s1 / n.clamp_min(1.0)  # class mean - shift
        means = torch.where(n > 0, shift + delta, torch.zeros_like(shift))
        # sum (h - s)^2 - n delta^2 = sum (h - mu)^2, per dimension
        m2 = (s2 - s1 * delta).sum(2).clamp_min(0.0)
        scatter = None
        if self.scatter is not None:  # sum (h-s)(h-s)^T - n delta delta^T, per view
            scatter = self.scatter - (delta * n).transpose(1, 2) @ delta
        for v, name in enumerate(views.names):
            out[name] = ClassStats._of(
                counts[v].clone(), means[v], m2[v], None if scatter is None else scatter[v],
                invalid[v].clone(),
            )  # fmt: skip
        return out


class BlockNCC:
    """Nearest-class-centre accuracy of one block for every labels view at once.

    The prediction depends on the features only, so it is made once per batch; each
    view then counts its hits (a label of -1 never matches). Distances are taken after
    subtracting the reference's global mean, in float64.
    """

    def __init__(self, reference: ClassStats, device=None) -> None:
        reference.check()
        self.device = torch.device(device) if device is not None else reference.device
        self.num_classes = reference.num_classes
        centre = reference.global_mean.to(self.device)
        means = reference.means.to(self.device) - centre
        self.centre = centre
        self.weight = means.T.contiguous()  # D x K
        # argmin ||x - mu||^2 = argmax (x . mu - ||mu||^2 / 2)
        self.bias = -0.5 * means.square().sum(1)
        self.correct: torch.Tensor | None = None
        self._features: torch.Tensor | None = None  # scratch, reused per batch
        self._scores: torch.Tensor | None = None

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        rows, (dim, k) = features.shape[0], self.weight.shape
        self._features, centred = _scratch(self._features, rows, dim, self.device)
        self._scores, scores = _scratch(self._scores, rows, k, self.device)
        torch.sub(features.to(self.device), self.centre, out=centred)
        return torch.addmm(self.bias, centred, self.weight, out=scores).argmax(1)

    def update(self, features: torch.Tensor, plan: LabelPlan) -> BlockNCC:
        if plan.compact is not None:  # samples of no class never count
            rows, plan = plan.compact
            features = features.index_select(0, rows)
        hits = (plan.labels == self.predict(features)).sum(1)
        self.correct = hits if self.correct is None else self.correct.add_(hits)
        return self


class ClassStats:
    """Per-class count, mean and scalar sum of squared deviations, in float64.

    `update(features, labels)` takes an N x D float tensor (float32, float64 or bfloat16,
    any device) and N integer labels in [0, num_classes); a label of -1 marks a sample
    that is not part of this labels view and is skipped. `merge(other)` combines two
    states exactly; `reduce()` sums the states of all torch.distributed processes.
    With `scatter=True` it also keeps the D x D within-class scatter needed by the classic
    `trace(Sigma_W Sigma_B^+)/K` metric (off by default: it costs D^2 memory per layer).
    On the CPU bad input raises at `update`; on an accelerator it is counted on the device
    and raised when a metric is computed, so updates never wait for the device.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: torch.device | str | None = None,
        scatter: bool = False,
    ) -> None:
        if int(num_classes) < 2:
            raise NCLayersError(
                f"num_classes={num_classes}: neural-collapse metrics need at least two classes"
            )
        if int(dim) < 1:
            raise NCLayersError(f"dim={dim}: the feature dimension must be a positive integer")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        f64 = dict(dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(self.num_classes, **f64)
        self.means = torch.zeros(self.num_classes, self.dim, **f64)
        self.m2 = torch.zeros(self.num_classes, **f64)
        self.scatter = torch.zeros(self.dim, self.dim, **f64) if scatter else None
        # Labels outside [0, K) and not -1, counted on the device (reported by `check`).
        self._invalid = torch.zeros((), dtype=torch.int64, device=self.device)

    @classmethod
    def _of(cls, counts, means, m2, scatter, invalid) -> ClassStats:
        """A state from its tensors (float64, on one device), without allocating zeros."""
        out = cls.__new__(cls)
        out.num_classes, out.dim = means.shape
        out.device = means.device
        out.counts, out.means, out.m2 = counts, means.contiguous(), m2.contiguous()
        out.scatter = None if scatter is None else scatter.contiguous()
        out._invalid = invalid
        return out

    # ------------------------------------------------------------------ updates
    def _check_batch(self, features: torch.Tensor, labels: torch.Tensor):
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise NCLayersError(
                f"features: expected shape (N, {self.dim}), got {tuple(features.shape)}; "
                "pool block outputs to one vector per sample and build ClassStats with "
                "that dimension"
            )
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise NCLayersError(
                f"labels: expected shape ({features.shape[0]},) to match features, "
                f"got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise NCLayersError(f"labels: expected integer class indices, got dtype {labels.dtype}")
        if not features.dtype.is_floating_point:
            features = features.float()
        async_copy = self.device.type != "cpu"
        features = features.to(self.device, non_blocking=async_copy)
        labels = labels.to(self.device, non_blocking=async_copy).long()
        if self.device.type == "cpu":  # checking costs no device wait here: raise at once
            if not torch.isfinite(features).all():
                raise NCLayersError(
                    "features contain NaN or inf; check the model for overflow (try float32 "
                    "instead of float16) or the input normalisation"
                )
            bad_label = ((labels < SKIP_LABEL) | (labels >= self.num_classes)).nonzero()
            if len(bad_label):
                bad = labels[bad_label[0, 0]].item()
                raise NCLayersError(
                    f"labels: value {bad} is outside [0, {self.num_classes}); pass "
                    "num_classes large enough or fix the labels (-1 marks a sample that "
                    "is not part of this labels view)"
                )
        return features, labels

    def update(self, features, labels) -> ClassStats:
        """Add a batch. Exact: the batch's own per-class moments, then Chan's combination."""
        features = _as_tensor(features, "features")
        labels = _as_tensor(labels, "labels")
        features, labels = self._check_batch(features, labels)
        if features.shape[0] == 0:
            return self
        views = LabelViews(("batch",), self.num_classes, self.device)
        block = BlockStats(views, self.dim, scatter=self.scatter is not None)
        batch = block.update(features, views.plan([labels])).class_stats()["batch"]
        self._invalid += batch._invalid
        self._combine(batch.counts, batch.means, batch.m2, batch.scatter)
        return self

    def _combine(self, n_b, mean_b, m2_b, scatter_b) -> None:
        n_a = self.counts
        n = n_a + n_b
        delta = mean_b - self.means
        w_b = torch.where(n > 0, n_b / n.clamp_min(1.0), torch.zeros_like(n))
        # Chan et al.: M2 = M2_a + M2_b + ||delta||^2 n_a n_b / n
        cross = n_a * w_b  # n_a n_b / n
        self.m2 += m2_b + delta.square().sum(dim=1) * cross
        if self.scatter is not None:
            self.scatter += scatter_b + (delta * cross.unsqueeze(1)).T @ delta
        self.means += delta * w_b.unsqueeze(1)
        self.counts = n

    def merge(self, other: ClassStats) -> ClassStats:
        """Fold another state into this one (exact, order-independent up to rounding)."""
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise NCLayersError(
                f"merge: states differ in shape, (num_classes, dim) = "
                f"{(self.num_classes, self.dim)} vs {(other.num_classes, other.dim)}"
            )
        if (self.scatter is None) != (other.scatter is None):
            raise NCLayersError("merge: one state keeps the within-class scatter and the other not")
        dev = self.device
        self._invalid += other._invalid.to(dev)
        self._combine(
            other.counts.to(dev),
            other.means.to(dev),
            other.m2.to(dev),
            other.scatter.to(dev) if other.scatter is not None else None,
        )
        return self

    def reduce(self, group=None) -> ClassStats:
        """Combine the states of all processes in place (torch.distributed, any backend).

        Every rank ends with the same, exact result: sums (count, count*mean) and the
        scatter about the global per-class means are all-reduced, which is Chan's formula
        applied to all ranks at once.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        counts = self.counts.clone()
        sums = self.means * self.counts.unsqueeze(1)
        dist.all_reduce(counts, group=group)
        dist.all_reduce(sums, group=group)
        means = sums / counts.clamp_min(1.0).unsqueeze(1)
        delta = self.means - means
        m2 = self.m2 + self.counts * delta.square().sum(dim=1)
        dist.all_reduce(m2, group=group)
        if self.scatter is not None:
            scatter = self.scatter + (delta * self.counts.unsqueeze(1)).T @ delta
            dist.all_reduce(scatter, group=group)
            self.scatter = scatter
        dist.all_reduce(self._invalid, group=group)
        self.counts, self.means, self.m2 = counts, means, m2
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        # `invalid` too: a state that saw bad labels or non-finite features stays refused.
        state = {"counts": self.counts, "means": self.means, "m2": self.m2,
                 "invalid": self._invalid}  # fmt: skip
        if self.scatter is not None:
            state["scatter"] = self.scatter
        return {k: v.detach().cpu() for k, v in state.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device=None) -> ClassStats:
        k, d = state["means"].shape
        out = cls(k, d, device=device, scatter="scatter" in state)
        out.counts = state["counts"].to(out.device, torch.float64)
        out.means = state["means"].to(out.device, torch.float64)
        out.m2 = state["m2"].to(out.device, torch.float64)
        if out.scatter is not None:
            out.scatter = state["scatter"].to(out.device, torch.float64)
        if "invalid" in state:
            out._invalid = state["invalid"].to(out.device, torch.int64)
        return out

    # ------------------------------------------------------------------ metrics
    @property
    def variances(self) -> torch.Tensor:
        """var_k = (1/n_k) sum_i ||h_ki - mu_k||^2 (a variance, not its square)."""
        return self.m2 / self.counts.clamp_min(1.0)

    @property
    def global_mean(self) -> torch.Tensor:
        """Mean over all samples (class means weighted by their counts)."""
        return (self.counts.unsqueeze(1) * self.means).sum(0) / self.counts.sum()

    def check(self) -> None:
        """Raise ValueError if the accumulated state cannot yield the metrics."""
        # One read of the device for everything that was counted there during the pass.
        invalid, finite = torch.stack(
            [self._invalid.double(), (torch.isfinite(self.means).all() & self.m2.isfinite().all())]
        ).tolist()
        if invalid:
            raise NCLayersError(
                f"labels: {int(invalid)} values are outside [0, {self.num_classes}) and not -1 "
                "(which marks a sample that is not part of a labels view); pass num_classes "
                "large enough or fix the labels"
            )
        if not finite:
            raise NCLayersError(
                "features contain NaN or inf; check the model for overflow (try float32 "
                "instead of float16) or the input normalisation"
            )
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise NCLayersError(_empty_classes_advice(empty, self.counts))

    def nc1(self) -> float:
        """Paper Eq. 4: sum of the CDNV over ordered pairs of distinct classes."""
        self.check()
        value = float(collapse_metrics([self])[0, 1])
        if not math.isfinite(value):
            raise _identical_means_error(self.means)
        return value

    def cdnv_mean(self) -> float:
        """Average CDNV over ordered pairs, nc1 / (K (K - 1))."""
        k = self.num_classes
        return self.nc1() / (k * (k - 1))

    def nc2(self) -> float:
        """Paper Eq. 5: Frobenius distance of the normalised Gram of centred means to an ETF."""
        self.check()
        value = float(collapse_metrics([self])[0, 2])
        if not math.isfinite(value):
            raise NCLayersError("all class means coincide: nc2 is undefined")
        return value

    def nc1_classic(self) -> float:
        """trace(Sigma_W Sigma_B^+) / K (Papyan et al.); needs `scatter=True`."""
        if self.scatter is None:
            raise NCLayersError(
                "nc1_classic needs the within-class scatter: build ClassStats(..., scatter=True)"
            )
        self.check()
        sigma_w = self.scatter / self.counts.sum()
        centred = self.means - self.global_mean
        sigma_b = centred.T @ centred / self.num_classes
        return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True))) / (
            self.num_classes
        )

    def __repr__(self) -> str:
        return (
            f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, "
            f"samples={int(self.counts.sum().item())}, device={self.device})"
        )


def _empty_classes_advice(empty: list[int], counts: torch.Tensor) -> str:
    """What to do about classes without a sample, naming the settings that help."""
    shown = f"{empty[:10]}{'...' if len(empty) > 10 else ''}"
    present = (counts > 0).nonzero().flatten().tolist()
    text = f"class(es) {shown} have no sample; every class needs at least one"
    if present and min(empty) < max(present):  # labels that skip numbers, e.g. {0, 2, 4}
        text += (
            f": the labels skip these numbers (classes with samples: {present[:10]}"
            f"{'...' if len(present) > 10 else ''}); number the classes 0..K-1 in the data "
            "(e.g. a ClassLabel column, or class names instead of numbers)"
        )
    return text + (
        "; or measure more samples (data.test_subset, data.train_subset, "
        "analyze.reference_subset: larger or null), or keep the first N classes "
        "(data.classes=N); from Python, pass num_classes=the number of classes"
    )


def _identical_means_error(means: torch.Tensor) -> ValueError:
    """Name two classes whose means coincide (their CDNV is infinite); the error path only."""
    for i in range(means.shape[0]):
        same = (means[i] - means).square().sum(1) == 0
        same[i] = False
        if same.any():
            j = int(same.nonzero()[0])
            return NCLayersError(
                f"classes {i} and {j} have identical feature means, so their CDNV is infinite; "
                "check that the features depend on the input"
            )
    return NCLayersError("nc1 is not finite; check the features for overflow")


def collapse_metrics(states: Sequence[ClassStats]) -> torch.Tensor:
    """[samples, nc1, nc2] of several states of one shape (e.g. one block's labels views)
    as a len(states) x 3 float64 tensor on their device, computed together and without
    reading the device: NaN or inf marks a state whose metrics are undefined (bad labels
    or features, an empty class, coinciding means); its `nc1()`/`nc2()` say why."""
    k = states[0].num_classes
    counts = torch.stack([s.counts for s in states])  # V x K
    means = torch.stack([s.means for s in states])  # V x K x D
    m2 = torch.stack([s.m2 for s in states])
    invalid = torch.stack([s._invalid for s in states])
    variances = m2 / counts.clamp_min(1.0)
    samples = counts.sum(1)
    centre = (counts[:, :, None] * means).sum(1) / samples[:, None]
    centred = means - centre[:, None]
    gram = centred @ centred.transpose(1, 2)  # nc2's Gram; on the CPU nc1's distances too
    # nc1: every squared distance between class means at once (K = 1000: 999,000 ordered
    # pairs), each within a relative DIST_RTOL of the exact differences' value
    dists = square_distances(means, gram)
    eye = torch.eye(k, dtype=torch.bool, device=means.device)
    ratio = (variances[:, :, None] + variances[:, None, :]) / (2.0 * dists)
    nc1_ = ratio.masked_fill(eye, 0.0).sum((1, 2))
    # nc2
    norm = torch.linalg.matrix_norm(gram)
    etf = (eye.to(gram.dtype) - 1.0 / k) / math.sqrt(k - 1)
    nc2_ = torch.linalg.matrix_norm(gram / norm[:, None, None] - etf)
    valid = (invalid == 0) & (counts > 0).all(1)
    nan = float("nan")
    return torch.stack([samples, nc1_.where(valid, nan), nc2_.where(valid, nan)], dim=1)


# The relative error allowed in a squared distance between class means taken from the Gram
# matrix; pairs whose error bound exceeds it are recomputed from exact differences.
DIST_RTOL = 1e-11
_UNIT_ROUNDOFF = 2.0**-53
_PAIR_CHUNK = 1 << 22  # elements of the differences recomputed at a time (32 MB)
_DENSE_REDO = 0.05  # above this share of pairs to recompute, recompute them all at once


def square_distances(means: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||mu_i - mu_j||^2 of every pair of class means (V x K x K float64, the diagonal 0).

    On an accelerator: exact differences (torch.cdist without matrix products), cheap there,
    and no read of the device. On the CPU those K^2 D differences are the end-of-pass cost
    (K = 1000, D = 2048: 2.0 s of CPU time per labels view and block against 0.02 s from
    the Gram, benchmarks/nc1_distances.py), so
    the distances come from the Gram matrix G of the centred means c_i that nc2 computes
    anyway: d_ij = n_i + n_j - 2 g_ij with n_i = g_ii, except where that cancels.

    Error bound (Higham, Accuracy and Stability of Numerical Algorithms, 3.1, any order of
    summation, FMA or not): each computed Gram entry has |g^_ij - g_ij| <= gamma_D
    sum_k |c_ik c_jk| <= gamma_D ||c_i|| ||c_j|| <= gamma_D (n_i + n_j) / 2, where
    gamma_D = D u / (1 - D u) and u = 2^-53. The two additions and the doubling add at most
    2 u (n_i + n_j + 2 |g_ij|) <= 4 u (n_i + n_j). So

        |d^_ij - d_ij| <= (2 gamma_D + 4 u) (n_i + n_j) + O(u^2)  =: bound_ij

    (the centring itself perturbs each c_i by at most u |c_i| per component, the same
    rounding the exact path's mu_i - mu_j makes). A pair with bound_ij > DIST_RTOL d^_ij
    (close means, relative to their distance from the centre: cancellation) is recomputed
    from exact differences; every other pair is within a relative DIST_RTOL (1e-11; in
    practice the error is about sqrt(D) u, near 1e-15). Identical means always go the exact
    way (d^ ~ 0 <= bound), so their exact zero still marks an undefined CDNV.
    """
    if means.device.type != "cpu":
        return _exact_distances(means)
    dists, redo = gram_distances(gram, means.shape[-1])
    pairs = means.shape[0] * means.shape[1] * (means.shape[1] - 1) // 2
    if redo.shape[0] > pairs * _DENSE_REDO:
        # Most pairs cancel (means close together far from the centre): one pass of exact
        # differences over every pair costs less than gathering them pair by pair.
        return _exact_distances(means)
    step = max(1, _PAIR_CHUNK // max(means.shape[-1], 1))
    for part in redo.split(step):
        v, i, j = part.unbind(1)
        exact = (means[v, i] - means[v, j]).square().sum(1)
        dists[v, i, j] = exact
        dists[v, j, i] = exact
    dists.diagonal(dim1=1, dim2=2).zero_()
    return dists


def _exact_distances(means: torch.Tensor) -> torch.Tensor:
    """||mu_i - mu_j||^2 from exact differences (no matrix-product shortcut)."""
    return torch.cdist(means, means, compute_mode="donot_use_mm_for_euclid_dist").square()


def gram_distances(gram: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d^, pairs): the squared distances n_i + n_j - 2 g_ij from a V x K x K float64 Gram
    of D = `dim` wide vectors, and the (view, i, j) pairs, i < j, whose error bound (see
    `square_distances`) exceeds DIST_RTOL d^_ij, which need exact differences."""
    k = gram.shape[-1]
    gamma = dim * _UNIT_ROUNDOFF / (1.0 - dim * _UNIT_ROUNDOFF)
    sq = gram.diagonal(dim1=1, dim2=2)
    norms = sq[:, :, None] + sq[:, None, :]
    dists = (norms - 2.0 * gram).clamp_min_(0.0)
    bound = (2.0 * gamma + 4.0 * _UNIT_ROUNDOFF) * 1.0001 * norms  # 1.0001: n^ for n
    upper = torch.ones(k, k, dtype=torch.bool, device=gram.device).triu_(1)
    return dists, ((bound > DIST_RTOL * dists) & upper).nonzero()


# ---------------------------------------------------------------------- functional
def _stats_from_arrays(features, labels, num_classes: int | None, scatter: bool = False):
    feats = _as_tensor(features, "features")
    labs = _as_tensor(labels, "labels")
    if feats.ndim != 2:
        raise NCLayersError(
            f"features: expected a 2-D array (N samples x D dims), got shape {tuple(feats.shape)}"
        )
    if labs.ndim != 1 or labs.shape[0] != feats.shape[0]:
        raise NCLayersError(
            f"labels: expected shape ({feats.shape[0]},) to match features, got {tuple(labs.shape)}"
        )
    if labs.numel() and (labs.dtype.is_floating_point or labs.dtype == torch.bool):
        raise NCLayersError(f"labels: expected integer class indices, got dtype {labs.dtype}")
    if labs.numel() and int(labs.min()) < 0:
        raise NCLayersError(
            f"labels: value {int(labs.min())} is outside [0, {num_classes or 'K'}); these "
            "functions measure every sample they are given: drop the samples a labels view "
            "leaves out rather than marking them -1"
        )
    if num_classes is None:
        if labs.numel() == 0:
            raise NCLayersError("labels: empty; pass at least one sample per class")
        num_classes = int(labs.max().item()) + 1
    stats = ClassStats(num_classes, feats.shape[1], device="cpu", scatter=scatter)
    stats.update(feats.cpu(), labs.cpu())
    return stats


def nc1(features, labels, num_classes: int | None = None) -> float:
    """NC1 (paper Eq. 4, ordered pairs) of in-memory features (N x D) and labels (N)."""
    return _stats_from_arrays(features, labels, num_classes).nc1()


def cdnv_mean(features, labels, num_classes: int | None = None) -> float:
    """Average CDNV over ordered class pairs, nc1 / (K (K - 1))."""
    return _stats_from_arrays(features, labels, num_classes).cdnv_mean()


def nc2(features, labels, num_classes: int | None = None) -> float:
    """NC2 (paper Eq. 5) of in-memory features (N x D) and labels (N)."""
    return _stats_from_arrays(features, labels, num_classes).nc2()


def nc1_classic(features, labels, num_classes: int | None = None) -> float:
    """Classic NC1, trace(Sigma_W Sigma_B^+)/K, of in-memory features and labels."""
    return _stats_from_arrays(features, labels, num_classes, scatter=True).nc1_classic()


# ---------------------------------------------------------------------- NCC accuracy
class NCCAccuracy:
    """Nearest-class-centre accuracy over a stream of batches, means from a `ClassStats`.

    Distances are taken after subtracting the reference's global mean, in float64, so
    features far from the origin do not lose the small differences that decide the class.
    Labels of -1 (samples outside this labels view) are not counted.
    """

    def __init__(self, reference: ClassStats, device=None) -> None:
        self._ncc = BlockNCC(reference, device)
        self.device = self._ncc.device
        self.num_classes = reference.num_classes
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.total = torch.zeros((), dtype=torch.int64, device=self.device)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self._ncc.predict(features)

    def update(self, features, labels) -> NCCAccuracy:
        features = _as_tensor(features, "features")
        labels = _as_tensor(labels, "labels").to(self.device)
        self.correct += (self.predict(features) == labels).sum()
        self.total += (labels != SKIP_LABEL).sum()
        return self

    def merge(self, other: NCCAccuracy) -> NCCAccuracy:
        self.correct += other.correct.to(self.device)
        self.total += other.total.to(self.device)
        return self

    def reduce(self, group=None) -> NCCAccuracy:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.correct, group=group)
            dist.all_reduce(self.total, group=group)
        return self

    def compute(self) -> float:
        total = int(self.total.item())
        return float("nan") if total == 0 else int(self.correct.item()) / total


def ncc_accuracy(
    features,
    labels,
    reference_features=None,
    reference_labels=None,
    num_classes: int | None = None,
) -> float:
    """NCC accuracy of (features, labels); class means from the reference arrays if given."""
    feats = _as_tensor(features, "features")
    labs = _as_tensor(labels, "labels")
    if reference_features is None:
        reference_features, reference_labels = feats, labs
    ref = _stats_from_arrays(reference_features, reference_labels, num_classes)
    return NCCAccuracy(ref).update(feats.cpu(), labs.cpu()).compute()


def merge_all(states: Iterable[ClassStats]) -> ClassStats:
    """Merge an iterable of states into a new one (the inputs are left unchanged)."""
    states = list(states)
    if not states:
        raise NCLayersError("merge_all: no states given")
    first = states[0]
    out = ClassStats(first.num_classes, first.dim, first.device, scatter=first.scatter is not None)
    for s in states:
        out.merge(s)
    return out
