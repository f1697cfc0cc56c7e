"""The per-layer figures: NC1 (log axis), NC2, NCC and probe accuracy, memorization."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from nclayers.errors import NCLayersError
from nclayers.table import LABELS, LOG_SCALE, Table, shown_columns


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """(figure, axes) on a `matplotlib.figure.Figure`: no pyplot, so drawing never switches
    a notebook's backend nor keeps figures alive in pyplot's registry."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


@contextlib.contextmanager
def text_style(mathtext: bool = False):
    """Labels are plain text ("cost $5") unless mathtext is asked for."""
    import matplotlib

    with matplotlib.rc_context({"text.parse_math": mathtext}):
        yield


def _plain_log_ticks(fig) -> None:
    """Log axes label their ticks in plain text ("9000", "1e+04"): their default labels
    are mathtext ($10^{3}$), which reads as raw markup with mathtext off."""
    from matplotlib.ticker import LogFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_major_formatter(LogFormatter())
                axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def save_figure(fig, path: str | Path, layout: bool = True, dpi: int = 120) -> Path:
    """Lay out and write a figure atomically, in the format its suffix names."""
    import io

    from nclayers.files import atomic_write

    path = Path(path)
    buf = io.BytesIO()
    _plain_log_ticks(fig)
    with text_style(False):
        if layout:
            fig.tight_layout()
        fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return atomic_write(path, buf.getvalue())


def plot_metric(
    table: Table,
    metric: str,
    path: str | Path,
    group: tuple[str, ...] = ("run", "split", "view"),
    title: str | None = None,
) -> Path | None:
    """One line per group (e.g. run/split/view) of `metric` against block index."""
    rows = [r for r in table if r.get(metric) not in (None, "")]
    if not rows:
        return None
    fig, ax = new_figure(figsize=(6, 4))
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault(tuple(r.get(g) for g in group), []).append(r)
    varying = [i for i, _ in enumerate(group) if len({k[i] for k in lines}) > 1]
    for key, pts in lines.items():
        pts.sort(key=lambda r: r["layer"])
        label = " / ".join(str(key[i]) for i in varying) or None
        ax.plot([r["layer"] for r in pts], [float(r[metric]) for r in pts], "o-", label=label)
    if metric in LOG_SCALE:
        ax.set_yscale("log")
    if metric == "ratio":
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("block index")
    ax.set_ylabel(LABELS.get(metric, metric))
    if title:
        ax.set_title(title)
    if varying:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_layers(table: Table, out: str | Path, prefix: str = "") -> list[Path]:
    """The standard per-layer figures of a layers table, as PNG files in `out`."""
    out = Path(out)
    written = []
    for metric in shown_columns():
        p = plot_metric(table, metric, out / f"{prefix}{metric}.png")
        if p:
            written.append(p)
    return written


# ----------------------------------------------------------------------------- layouts
# The paper's multi-panel figures. A layout is a tuple of panels (columns); rows are the
# values of one table column (e.g. the model), curves the values of another (e.g. the
# noise level). Curves differ in marker and line style as well as in colour, and the
# colours run along one sequential map, so a greyscale print still tells them apart.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
LINESTYLES = ("-", "--", "-.", ":")
TRAIN_LABELS = "train"  # panel view: the labels the model was trained on (noisy if any)


@dataclass(frozen=True)
class Panel:
    """One column of a layout: `metric` from the rows of `split` and labels `view`.

    view "train" means the labels the run was trained on: its "noisy" view when it has
    one, else "clean". Metric "ratio" comes from the memorization table.
    """

    metric: str
    split: str = "test"
    view: str = "clean"
    note: str = ""  # shown in an empty panel: how to get its data
    against: str | None = None  # x is this metric of the same row (a scatter) not the block


PROBE_NOTE = "no probe_acc yet:\nrun the probe stage"
LAYOUTS: dict[str, tuple[Panel, ...]] = {
    # Figures 1, 2: NC1 (test split) and linear-probe accuracy, clean data.
    "clean": (Panel("nc1"), Panel("probe_acc", note=PROBE_NOTE)),
    # Figures 5, 6, 13, 14: NC1 (CDNV) and NC2 on the test split.
    "clean-nc": (Panel("nc1"), Panel("nc2")),
    # Figures 3, 4, 8-12: NC1 and NC2 on the training images under the training labels,
    # the memorization ratio, and the linear probe on the clean test split.
    "noisy": (
        Panel("nc1", "train", TRAIN_LABELS),
        Panel("nc2", "train", TRAIN_LABELS),
        Panel("ratio", "train", note="no memorization ratio:\nno run has a noisy view"),
        Panel("probe_acc", note=PROBE_NOTE),
    ),
    # Figure 7: every block as a point, linear-probe accuracy against NC1 (test split).
    "nc-vs-probe": (Panel("probe_acc", note=PROBE_NOTE, against="nc1"),),
}
X_AXES = {"block": "block index", "depth": "relative depth (block / blocks)"}


def curve_styles(n: int) -> list[dict]:
    """Matplotlib line keywords for `n` curves: marker, line style and a colour of one
    sequential map (dark to light), so curves stay distinct in greyscale."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [
        {
            "color": cmap(0.9 * i / max(1, n - 1)),
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
        }
        for i in range(n)
    ]


def _ordered(values) -> list:
    """Distinct values in first-seen order (the sweep writes rows in axis order)."""
    return list(dict.fromkeys(values))


def _panel_rows(layers: Table, memo: Table | None, panel: Panel) -> list[dict]:
    if panel.metric == "ratio":
        return [r for r in (memo or []) if r.get("ratio") is not None]
    rows = [r for r in layers if r.get("split") == panel.split and r.get(panel.metric) is not None]
    if panel.view != TRAIN_LABELS:
        return _one_input(
            [r for r in rows if r.get("view") == panel.view], (None, "clean", "corrupted")
        )
    noisy_runs = {r.get("run") for r in rows if r.get("view") == "noisy"}
    rows = [
        r for r in rows if r.get("view") == ("noisy" if r.get("run") in noisy_runs else "clean")
    ]
    # The training images as the model saw them: corrupted, where a run has both inputs.
    return _one_input(rows, ("corrupted", None, "clean"))


def _one_input(rows: list[dict], prefer: tuple) -> list[dict]:
    """One row per (run, layer) where rows also differ in their `input` column (a run
    measured on clean and corrupted images): the first kind in `prefer`."""
    if all(r.get("input") is None for r in rows):
        return rows
    best: dict[tuple, tuple[int, dict]] = {}
    for r in rows:
        key = (r.get("run"), r["layer"])
        rank = prefer.index(r.get("input")) if r.get("input") in prefer else len(prefer)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, r)
    return [r for _, r in best.values()]


def _curve(rows: list[dict], metric: str, x: str) -> tuple[list, list, list, list]:
    """Mean over runs (e.g. seeds) per x, with the min and max for a band. x: "block",
    "depth", or a metric column (a scatter: one point per row)."""
    if x not in X_AXES:
        pts = sorted((float(r[x]), float(r[metric])) for r in rows if r.get(x) is not None)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return xs, ys, ys, ys
    depth = {}
    for r in rows:
        depth[r.get("run")] = max(depth.get(r.get("run"), 0), r["layer"])
    points: dict[float, list[float]] = {}
    for r in rows:
        key = r["layer"] / depth[r.get("run")] if x == "depth" else r["layer"]
        points.setdefault(key, []).append(float(r[metric]))
    xs = sorted(points)
    ys = [sum(points[k]) / len(points[k]) for k in xs]
    return xs, ys, [min(points[k]) for k in xs], [max(points[k]) for k in xs]


@dataclass
class Layout:
    """What a layout draws: `curves[(row_index, panel_index)]` maps a curve's value to
    its (xs, ys, lows, highs): the mean over the runs that share it, and their range."""

    panels: tuple[Panel, ...]
    row_values: list
    curve_values: list
    curves: dict[tuple[int, int], dict]
    x: str


def layout_curves(
    layers: Table,
    layout: str | tuple[Panel, ...] = "noisy",
    rows: str | None = None,
    curves: str | None = None,
    x: str = "block",
    memorization: Table | None = None,
) -> Layout:
    """The numbers behind `plot_layout` (see there), without drawing them."""
    panels = LAYOUTS.get(layout) if isinstance(layout, str) else layout
    if panels is None:
        raise NCLayersError(f"layout={layout!r}: expected one of {sorted(LAYOUTS)}")
    if x not in X_AXES:
        raise NCLayersError(f"x={x!r}: expected one of {sorted(X_AXES)}")
    if not layers:
        raise NCLayersError("plot_layout: the layers table is empty; run the analyze stage first")
    for name, col in (("rows", rows), ("curves", curves)):
        if col is not None and col not in layers.columns:
            raise NCLayersError(
                f"{name}={col!r}: no such column in the table; columns are {layers.columns}"
            )
    if memorization is None and any(p.metric == "ratio" for p in panels):
        memorization = _ratios_by_run(layers)
    if memorization is not None and (rows or curves):  # give the ratios the runs' labels
        labels = {r.get("run"): r for r in layers}
        memorization = Table(
            {**{k: labels.get(m.get("run"), {}).get(k) for k in (rows, curves) if k}, **m}
            for m in memorization
        )
    row_values = _ordered(r.get(rows) for r in layers) if rows else [None]
    curve_values = _ordered(r.get(curves) for r in layers) if curves else [None]
    drawn: dict[tuple[int, int], dict] = {}
    for j, panel in enumerate(panels):
        source = _panel_rows(layers, memorization, panel)
        for i, row_value in enumerate(row_values):
            mine = [r for r in source if rows is None or r.get(rows) == row_value]
            cell = drawn[(i, j)] = {}
            for cv in curve_values:
                pts = [r for r in mine if curves is None or r.get(curves) == cv]
                if pts:
                    cell[cv] = _curve(pts, panel.metric, panel.against or x)
    return Layout(tuple(panels), row_values, curve_values, drawn, x)


def plot_layout(
    layers: Table,
    out: str | Path,
    layout: str | tuple[Panel, ...] = "noisy",
    rows: str | None = None,
    curves: str | None = None,
    x: str = "block",
    memorization: Table | None = None,
    title: str | None = None,
    formats: tuple[str, ...] = ("png", "pdf"),
    mathtext: bool = False,
    notes: list[str] | tuple[str, ...] = (),
) -> list[Path]:
    """Draw one of the paper's layouts from tidy tables; returns the files written.

    layers: rows of layers.csv (several runs: a `run` column tells them apart, and the
        `rows` and `curves` columns, e.g. "model" and "noise", label them).
    layout: "clean" (NC1, probe accuracy), "clean-nc" (NC1, NC2), "noisy" (NC1, NC2,
        memorization ratio, probe accuracy), "nc-vs-probe", or a tuple of `Panel`s.
    x: "block" (block index) or "depth" (block index / number of blocks of the run).
    memorization: per-run ratios (memorization.csv); None: computed from the layers'
        clean and noisy views of the training split.
    out: the file name without suffix; one file per format ("png", "pdf").
    A panel without data is drawn empty with a note, so a sweep whose probe stage has
    not run yet still gets its figure. `notes` (e.g. "Δ not interpretable: ...") are
    printed under the figure. Labels are plain text unless `mathtext`.
    """
    with text_style(mathtext):
        fig = _draw_layout(layers, layout, rows, curves, x, memorization, title, notes)
    out = Path(out)
    return [save_figure(fig, out.with_name(f"{out.name}.{fmt}"), False, 130) for fmt in formats]


def _draw_layout(layers, layout, rows, curves, x, memorization, title, notes):
    lay = layout_curves(layers, layout, rows, curves, x, memorization)
    styles = dict(zip(lay.curve_values, curve_styles(len(lay.curve_values)), strict=True))
    n_rows, panels = len(lay.row_values), lay.panels
    fig, axes = new_figure(
        n_rows, len(panels), figsize=(3.6 * len(panels), 2.9 * n_rows + 0.6), squeeze=False
    )
    handles: dict = {}
    for (i, j), cell in lay.curves.items():
        ax, panel = axes[i][j], panels[j]
        for cv, (xs, ys, lo, hi) in cell.items():
            style = dict(styles[cv], linestyle="none") if panel.against else styles[cv]
            (line,) = ax.plot(xs, ys, ms=4, lw=1.3, label=str(cv), **style)
            if lo != hi:
                ax.fill_between(xs, lo, hi, color=styles[cv]["color"], alpha=0.15, lw=0)
            handles.setdefault(str(cv), line)
        if not cell:
            ax.text(0.5, 0.5, panel.note or f"no {panel.metric}", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.35")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            if panel.metric in LOG_SCALE:
                ax.set_yscale("log")
            if panel.against in LOG_SCALE:
                ax.set_xscale("log")
            if panel.metric == "ratio":
                ax.axhline(1.0, color="black", lw=0.9, ls=(0, (4, 2)))
                values = [y for c in cell.values() for y in c[1] if y > 0]
                if values and max(values) / min(values) > 10:  # Δ below and far above 1
                    ax.set_yscale("log")
            if x == "block" and not panel.against:
                from matplotlib.ticker import MaxNLocator

                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        if i == 0:
            ax.set_title(_panel_title(panel), fontsize=10)
        if i == n_rows - 1:
            ax.set_xlabel(LABELS.get(panel.against, panel.against) if panel.against
                          else X_AXES[x])  # fmt: skip
        if j == 0 and rows:
            ax.set_ylabel(str(lay.row_values[i]), fontsize=11, fontweight="bold")
    if curves and handles:
        fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(8, len(handles)),
                   frameon=False, title=curves, fontsize=9)  # fmt: skip
    caption = "\n".join([*([title] if title else []), *notes])
    if caption:  # a text, not a suptitle: tight_layout reserves a suptitle's room at the top
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=9 if notes else 10)
    top = 1 - 0.6 / fig.get_figheight() if curves and handles else 0.98
    bottom = (0.3 + 0.2 * caption.count("\n") + 0.15) / fig.get_figheight() if caption else 0.0
    _plain_log_ticks(fig)  # before the layout: raw mathtext tick labels are wide
    fig.tight_layout(rect=(0, bottom, 1, top))
    return fig


def _panel_title(panel: Panel) -> str:
    if panel.metric == "ratio":
        return "memorization ratio Δ (train)"
    where = f"{panel.split}"
    if panel.view == TRAIN_LABELS:
        where += ", training labels"
    elif panel.view != "clean":
        where += f", {panel.view} labels"
    return f"{LABELS.get(panel.metric, panel.metric)}\n({where})"


def _ratios_by_run(layers: Table) -> Table:
    from nclayers.memorization import memorization_ratio

    try:
        return memorization_ratio(layers, split="train")
    except ValueError:  # no run with a noisy view: the ratio panel stays empty
        return Table()
