"""NC dynamics: how every block's NC1 and NC2 move during training.

`plot_dynamics("RUN/nc_dynamics.csv", "RUN/nc_dynamics.png")` draws, against the epoch,
one line per block: NC1 on a log axis (left) and NC2 (right), coloured from the first
block (dark) to the last (light), so a run with 50 blocks stays readable.
"""

from __future__ import annotations

from pathlib import Path

from nclayers.errors import NCLayersError
from nclayers.report.figures import LABELS, LOG_SCALE, new_figure, save_figure
from nclayers.table import Table


def plot_dynamics(
    csv_or_table: str | Path | Table,
    out_png: str | Path,
    metrics: tuple[str, ...] = ("nc1", "nc2"),
    title: str | None = None,
) -> Path:
    """NC per block against epoch from the `nc_dynamics.csv` that `train` writes."""
    table = csv_or_table if isinstance(csv_or_table, Table) else Table.from_csv(csv_or_table)
    rows = [r for r in table if r.get("epoch") is not None and r.get("layer") is not None]
    if not rows:
        raise NCLayersError(
            f"{csv_or_table if not isinstance(csv_or_table, Table) else 'table'}: no rows with "
            "'epoch' and 'layer'; pass the nc_dynamics.csv of a run trained with "
            "train.track_nc_every=N"
        )
    missing = [m for m in metrics if all(r.get(m) is None for r in rows)]
    if missing:
        raise NCLayersError(f"metrics {missing}: not in the table; columns are {table.columns}")
    from matplotlib import cm
    from matplotlib.colors import Normalize

    layers = sorted({r["layer"] for r in rows})
    names = {r["layer"]: r.get("block") for r in rows}
    colours = cm.viridis
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    fig, axes = new_figure(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for layer in layers:
            pts = sorted((r["epoch"], r[metric]) for r in rows if r["layer"] == layer)
            pts = [(e, float(v)) for e, v in pts if v is not None]
            label = f"{layer}: {names[layer]}" if len(layers) <= 12 else None
            ax.plot(*zip(*pts, strict=True), "o-", ms=3, color=colours(norm(layer)), label=label)
        if metric in LOG_SCALE:  # NC1 spans orders of magnitude
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
    if len(layers) <= 12:
        axes[0][-1].legend(fontsize=7, title="block", title_fontsize=7)
    else:
        bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=colours), ax=axes[0].tolist())
        bar.set_label("block index")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png, layout=len(layers) <= 12)
