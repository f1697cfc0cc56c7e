"""Are all layers equal? Per-block enhancement, the law-of-separation fit, plateaus.

Pure functions on layers tables and arrays (no model, no folder):

- `enhancement(table)` adds, per block l, `e_nc1 = log(NC1_{l-1} / NC1_l)` (how much block
  l compresses the classes; positive = better), `e_nc2` the same for NC2, and
  `probe_gain = probe_acc_l - probe_acc_{l-1}` where probes exist. Block 1 is compared
  with a stem row (layer 0) when the table has one, and is left blank otherwise.
- `fit_geometric(nc1)` is He & Su's "law of data separation": a least-squares line through
  log NC1 against block index (equivalently relative depth l/L), i.e. NC1 shrinking by
  a constant ratio per block; `fit_plateau(nc1)` a continuous piecewise line that decays,
  stays flat, then decays again, with both breakpoints searched exhaustively;
  `compare_fits` weighs the two by BIC and says which the data support.
- `find_plateau(layers, e)` applies the written-out rule: the blocks whose enhancement is
  below `fraction` x the model's mean enhancement, in runs of at least `min_run`
  consecutive blocks, are the candidate redundant blocks.
- `analyze_equality(table)` does all of it for every curve (run, split, view) of a
  layers table; `format_equality` renders the result for the terminal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nclayers.errors import NCLayersError
from nclayers.table import Table

# Columns that tell one curve (one model measured one way) from another in layers.csv.
CURVE_KEYS = ("run", "epoch", "split", "view", "input", "variant", "finetune_epochs")

# Below this difference of BIC the two models are not told apart (Kass & Raftery: 2).
BIC_MARGIN = 2.0

MIN_GEOMETRIC = 3  # a line through log NC1 needs a residual degree of freedom
MIN_PLATEAU = 6  # 3 coefficients + 2 breakpoints: at least one point more


# ----------------------------------------------------------------------------- enhancement
def _log_ratio(prev, cur) -> float | None:
    if prev is None or cur is None:
        return None
    prev, cur = float(prev), float(cur)
    if not (prev > 0 and cur > 0) or not (math.isfinite(prev) and math.isfinite(cur)):
        return None
    return math.log(prev / cur)


def curve_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in CURVE_KEYS)


def _curves(table: Sequence[dict]) -> dict[tuple, list[dict]]:
    curves: dict[tuple, list[dict]] = {}
    for row in table:
        curves.setdefault(curve_key(row), []).append(row)
    for rows in curves.values():
        rows.sort(key=lambda r: int(r["layer"]))
    return curves


def enhancement(table: Sequence[dict]) -> Table:
    """A copy of a layers table with `e_nc1`, `e_nc2` and `probe_gain` per row.

    e_nc1 at layer l = log(nc1 at l-1 / nc1 at l), within the same curve (run, split, view,
    ...); blank when layer l-1 is absent (layer 1 without a stem row at layer 0) or a value
    is missing or not positive. probe_gain = probe_acc_l - probe_acc_{l-1}.
    """
    for row in table:
        if "layer" not in row or "nc1" not in row:
            raise NCLayersError(
                "table: rows need 'layer' and 'nc1' columns; pass a layers.csv written by "
                f"`nclayers analyze` (got columns {sorted(row)})"
            )
    out = []
    for rows in _curves(table).values():
        by_layer = {int(r["layer"]): r for r in rows}
        for r in rows:
            prev = by_layer.get(int(r["layer"]) - 1)
            new = dict(r)
            new["e_nc1"] = _log_ratio(prev and prev.get("nc1"), r.get("nc1"))
            new["e_nc2"] = _log_ratio(prev and prev.get("nc2"), r.get("nc2"))
            gain = None
            if prev is not None and r.get("probe_acc") is not None:
                if prev.get("probe_acc") is not None:
                    gain = float(r["probe_acc"]) - float(prev["probe_acc"])
            new["probe_gain"] = gain
            out.append(new)
    return Table(out, **getattr(table, "meta", {}))


# ----------------------------------------------------------------------------- fits
def _bic(rss: float, n: int, k: int, scale: float) -> float:
    # A floor on RSS keeps noise-free curves finite: both models then fit "perfectly" and
    # the penalty alone decides, in favour of the simpler one.
    floor = 1e-12 * n * max(scale, 1e-12)
    return n * math.log(max(rss, floor) / n) + k * math.log(n)


def _r2(y: np.ndarray, rss: float) -> float:
    tss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - rss / tss if tss > 0 else float("nan")


def _prepare(nc1, x) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(nc1, dtype=np.float64)
    if y.ndim != 1:
        raise NCLayersError(
            f"nc1: expected a 1-D sequence of per-block values, got shape {y.shape}"
        )
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise NCLayersError(
            f"nc1: every value must be finite and positive to take its log; got {y.tolist()}"
        )
    xs = np.arange(1, len(y) + 1, dtype=np.float64) if x is None else np.asarray(x, np.float64)
    if xs.shape != y.shape:
        raise NCLayersError(
            f"x: {len(xs)} block indices for {len(y)} nc1 values; pass one per value"
        )
    if np.any(np.diff(xs) <= 0):
        raise NCLayersError(f"x: block indices must increase strictly, got {xs.tolist()}")
    return xs, np.log(y)


@dataclass(frozen=True)
class GeometricFit:
    """log NC1_l = intercept + slope * l: a constant ratio exp(slope) per block."""

    x: np.ndarray
    log_nc1: np.ndarray
    intercept: float
    slope: float
    rss: float
    r2: float
    bic: float
    n_params: int = 2

    @property
    def ratio(self) -> float:
        """NC1_l / NC1_{l-1} of the fitted line: below 1 when blocks compress."""
        return math.exp(self.slope)

    @property
    def slope_per_depth(self) -> float:
        """The slope against relative depth l/L (log NC1 change over the whole depth):
        comparable between models of different depth."""
        return self.slope * float(self.x[-1])

    @property
    def fitted(self) -> np.ndarray:
        return self.intercept + self.slope * self.x

    @property
    def residuals(self) -> np.ndarray:
        return self.log_nc1 - self.fitted


def fit_geometric(nc1: Sequence[float], x: Sequence[float] | None = None) -> GeometricFit:
    """Least-squares line through log NC1 against block index `x` (1..L by default)."""
    xs, y = _prepare(nc1, x)
    n = len(y)
    if n < MIN_GEOMETRIC:
        raise NCLayersError(
            f"nc1: {n} blocks are too few to fit a decay (need at least {MIN_GEOMETRIC})"
        )
    design = np.stack([np.ones(n), xs], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rss = float(((y - design @ coef) ** 2).sum())
    return GeometricFit(
        x=xs, log_nc1=y, intercept=float(coef[0]), slope=float(coef[1]), rss=rss,
        r2=_r2(y, rss), bic=_bic(rss, n, 2, float(y.var())),
    )  # fmt: skip


@dataclass(frozen=True)
class PlateauFit:
    """Decay, flat, decay: log NC1 = level + slope_in * min(x - start, 0)
    + slope_out * max(x - end, 0), continuous, flat for start <= x <= end."""

    x: np.ndarray
    log_nc1: np.ndarray
    level: float
    slope_in: float
    slope_out: float
    start: float  # last block of the first decay (the plateau's left edge)
    end: float  # last block of the plateau
    rss: float
    r2: float
    bic: float
    n_params: int = 5  # level, two slopes, two breakpoints

    @property
    def plateau_layers(self) -> list[int]:
        """Blocks that bring no change in the fit: start < l <= end."""
        return [int(v) for v in self.x if self.start < v <= self.end]

    @property
    def is_decay_flat_decay(self) -> bool:
        return self.slope_in < 0 and self.slope_out < 0

    @property
    def fitted(self) -> np.ndarray:
        return _plateau_design(self.x, self.start, self.end) @ np.array(
            [self.level, self.slope_in, self.slope_out]
        )

    @property
    def residuals(self) -> np.ndarray:
        return self.log_nc1 - self.fitted


def _plateau_design(x: np.ndarray, start: float, end: float) -> np.ndarray:
    return np.stack([np.ones_like(x), np.minimum(x - start, 0), np.maximum(x - end, 0)], axis=1)


def fit_plateau(nc1: Sequence[float], x: Sequence[float] | None = None) -> PlateauFit:
    """Best decay-flat-decay fit of log NC1, breakpoints searched over every pair of blocks
    (start < end, at least one block before start and one after end)."""
    xs, y = _prepare(nc1, x)
    n = len(y)
    if n < MIN_PLATEAU:
        raise NCLayersError(
            f"nc1: {n} blocks are too few to fit a plateau (need at least {MIN_PLATEAU})"
        )
    best = None
    for i in range(1, n - 2):
        for j in range(i + 1, n - 1):
            design = _plateau_design(xs, xs[i], xs[j])
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)
            rss = float(((y - design @ coef) ** 2).sum())
            if best is None or rss < best[0] - 1e-15:
                best = (rss, i, j, coef)
    rss, i, j, coef = best
    return PlateauFit(
        x=xs, log_nc1=y, level=float(coef[0]), slope_in=float(coef[1]),
        slope_out=float(coef[2]), start=float(xs[i]), end=float(xs[j]), rss=rss,
        r2=_r2(y, rss), bic=_bic(rss, n, 5, float(y.var())),
    )  # fmt: skip


@dataclass(frozen=True)
class LawComparison:
    geometric: GeometricFit
    plateau: PlateauFit | None
    preferred: str  # "geometric" | "plateau"
    delta_bic: float | None  # BIC(geometric) - BIC(plateau): > 0 favours the plateau
    verdict: str


def compare_fits(
    nc1: Sequence[float], x: Sequence[float] | None = None, margin: float = BIC_MARGIN
) -> LawComparison:
    """Fit both models and say which the data support: the plateau only when its BIC is
    lower by more than `margin` and its shape is decay-flat-decay; otherwise the simpler
    geometric decay stands."""
    geo = fit_geometric(nc1, x)
    n = len(geo.x)
    if n < MIN_PLATEAU:
        return LawComparison(
            geo, None, "geometric", None,
            f"geometric decay (only {n} blocks: a plateau fit needs at least {MIN_PLATEAU})",
        )  # fmt: skip
    plat = fit_plateau(nc1, x)
    delta = geo.bic - plat.bic
    strength = "very strong" if delta > 10 else "strong" if delta > 6 else "positive"
    if delta > margin and plat.is_decay_flat_decay:
        preferred = "plateau"
        verdict = (
            f"plateau: decay, flat over blocks {_span(plat.plateau_layers)}, decay "
            f"(BIC lower by {delta:.1f}, {strength} evidence)"
        )
    elif delta > margin:
        preferred = "geometric"
        verdict = (
            f"neither: the better piecewise fit (BIC lower by {delta:.1f}) is not "
            f"decay-flat-decay (slopes {plat.slope_in:.3g}, {plat.slope_out:.3g}); "
            "geometric decay is kept as the reference"
        )
    elif delta < -margin:
        preferred = "geometric"
        verdict = f"geometric decay (BIC lower by {-delta:.1f} than the plateau fit)"
    else:
        preferred = "geometric"
        verdict = (
            f"geometric decay: the plateau fit is not better by more than {margin:g} in BIC "
            f"(difference {delta:.1f}); the simpler model stands"
        )
    return LawComparison(geo, plat, preferred, delta, verdict)


def _span(layers: Sequence[int]) -> str:
    if not layers:
        return "none"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


# ----------------------------------------------------------------------------- plateau
@dataclass(frozen=True)
class Plateau:
    layers: list[int]  # the candidate redundant blocks, 1-based
    runs: list[list[int]]  # the same, as runs of consecutive blocks
    mean_enhancement: float
    threshold: float
    fraction: float
    min_run: int
    rule: str  # the rule with its numbers, for a reader to check


def find_plateau(
    layers: Sequence[int],
    enhancements: Sequence[float | None],
    fraction: float = 0.5,
    min_run: int = 2,
) -> Plateau:
    """Blocks l with e_l < fraction * mean(e), in runs of >= `min_run` consecutive blocks.

    The mean is over the blocks whose enhancement is defined (for NC1 it equals
    log(NC1_first / NC1_last) / (number of steps): the average rate of the whole model).
    A model whose mean enhancement is not positive compresses nothing overall: no plateau.
    """
    if not 0 < fraction <= 1:
        raise NCLayersError(
            f"fraction={fraction}: the plateau threshold is a fraction of the mean "
            "enhancement in (0, 1], e.g. 0.5"
        )
    if min_run < 1:
        raise NCLayersError(f"min_run={min_run}: a run holds at least 1 block, e.g. 2")
    if len(layers) != len(enhancements):
        raise NCLayersError(f"layers: {len(layers)} for {len(enhancements)} enhancement values")
    pairs = [(int(l), float(e)) for l, e in zip(layers, enhancements, strict=True) if e is not None]
    if len(pairs) < 2:
        raise NCLayersError(
            f"enhancements: {len(pairs)} defined values are too few to find a plateau "
            "(need at least 2 blocks after the first)"
        )
    mean = float(np.mean([e for _, e in pairs]))
    threshold = fraction * mean
    rule = (
        f"block l is redundant when e_l = log(NC1_(l-1)/NC1_l) < {fraction:g} x mean(e) "
        f"= {fraction:g} x {mean:.4g} = {threshold:.4g}, in runs of >= {min_run} "
        "consecutive blocks"
    )
    if mean <= 0:
        rule += "; the mean is not positive (no overall compression): no plateau"
        return Plateau([], [], mean, threshold, fraction, min_run, rule)
    runs: list[list[int]] = []
    current: list[int] = []
    for layer, e in pairs:
        if e < threshold and (not current or layer == current[-1] + 1):
            current.append(layer)
            continue
        if len(current) >= min_run:
            runs.append(current)
        current = [layer] if e < threshold else []
    if len(current) >= min_run:
        runs.append(current)
    flat = [layer for run in runs for layer in run]
    return Plateau(flat, runs, mean, threshold, fraction, min_run, rule)


# ----------------------------------------------------------------------------- per curve
@dataclass
class CurveReport:
    """Everything `equality` says about one curve of a layers table."""

    key: dict  # run, split, view, ... of the curve
    rows: Table  # its rows with e_nc1, e_nc2, probe_gain, fits and residuals
    fit: LawComparison
    plateau: Plateau
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " / ".join(f"{k}={v}" for k, v in self.key.items() if v not in (None, ""))


def analyze_equality(
    table: Sequence[dict],
    split: str | None = "test",
    view: str | None = "clean",
    fraction: float = 0.5,
    min_run: int = 2,
    margin: float = BIC_MARGIN,
) -> list[CurveReport]:
    """Enhancement, both fits and the plateau rule for every curve of a layers table.

    split/view: keep only these rows (None keeps all); clean-data NC is measured on the
    test split (paper A.1). Rows at layer 0 (a stem) only serve block 1's enhancement.
    """
    rows = [r for r in table if (split is None or r.get("split") == split)]
    rows = [r for r in rows if (view is None or r.get("view") == view)]
    if not rows:
        have = sorted({(r.get("split"), r.get("view")) for r in table}, key=str)
        raise NCLayersError(
            f"table: no rows with split={split!r} and view={view!r}; it holds (split, view) "
            f"{have}; choose one of those"
        )
    reports = []
    for key, curve in _curves(enhancement(rows)).items():
        blocks = [r for r in curve if int(r["layer"]) >= 1]
        nc1 = [r["nc1"] for r in blocks]
        layers = [int(r["layer"]) for r in blocks]
        fit = compare_fits(nc1, layers, margin)
        plateau = find_plateau(layers, [r["e_nc1"] for r in blocks], fraction, min_run)
        geo, plat = fit.geometric, fit.plateau
        out = []
        for i, r in enumerate(blocks):
            new = dict(r)
            new.update(
                log_nc1=float(geo.log_nc1[i]), fit_geometric=float(geo.fitted[i]),
                resid_geometric=float(geo.residuals[i]),
                fit_plateau=None if plat is None else float(plat.fitted[i]),
                resid_plateau=None if plat is None else float(plat.residuals[i]),
                redundant=layers[i] in plateau.layers,
            )  # fmt: skip
            out.append(new)
        names = dict(zip(CURVE_KEYS, key, strict=True))
        reports.append(CurveReport(names, Table(out), fit, plateau))
    return reports


def format_equality(report: CurveReport) -> str:
    """A terminal rendering: the fit, the plateau rule and blocks, the per-block table."""
    geo, plat, p = report.fit.geometric, report.fit.plateau, report.plateau
    lines = [f"== {report.name or 'curve'}: {len(geo.x)} blocks"]
    lines.append(
        f"geometric decay (law of separation): NC1 ratio per block {geo.ratio:.4f} "
        f"(log slope {geo.slope:.4f} per block, {geo.slope_per_depth:.3f} per unit of "
        f"relative depth), R^2 {geo.r2:.4f}, BIC {geo.bic:.2f}"
    )
    if plat is not None:
        lines.append(
            f"plateau fit: decay to block {plat.start:g} (slope {plat.slope_in:.4f}), flat "
            f"over blocks {_span(plat.plateau_layers)}, decay after block {plat.end:g} "
            f"(slope {plat.slope_out:.4f}); R^2 {plat.r2:.4f}, BIC {plat.bic:.2f}"
        )
    lines.append(f"the data support: {report.fit.verdict}")
    lines.append(f"plateau rule: {p.rule}")
    runs = ", ".join(_span(r) for r in p.runs) or "none"
    lines.append(f"candidate redundant blocks: {runs}")
    cols = ["layer", "block", "nc1", "e_nc1", "nc2", "e_nc2"]
    if any(r.get("probe_gain") is not None for r in report.rows):
        cols += ["probe_acc", "probe_gain"]
    cols += ["resid_geometric", "resid_plateau", "redundant"]
    lines.append(report.rows.format([c for c in cols if c in report.rows.columns]))
    lines.extend(report.notes)
    return "\n".join(lines)


def equality_table(reports: Sequence[CurveReport]) -> Table:
    """All curves' per-block rows in one table (equality.csv)."""
    return Table(row for rep in reports for row in rep.rows)


def summary_row(report: CurveReport) -> dict:
    geo, plat, p = report.fit.geometric, report.fit.plateau, report.plateau
    return {
        **{k: v for k, v in report.key.items() if v is not None},
        "blocks": len(geo.x),
        "ratio_per_block": geo.ratio,
        "slope_per_depth": geo.slope_per_depth,
        "r2_geometric": geo.r2,
        "bic_geometric": geo.bic,
        "bic_plateau": None if plat is None else plat.bic,
        "r2_plateau": None if plat is None else plat.r2,
        "fit_plateau_blocks": None if plat is None else _span(plat.plateau_layers),
        "preferred": report.fit.preferred,
        "verdict": report.fit.verdict,
        "mean_e_nc1": p.mean_enhancement,
        "threshold": p.threshold,
        "redundant_blocks": p.layers,
        "rule": p.rule,
    }
