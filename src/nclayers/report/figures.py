"""The per-layer figures: NC1 (log axis), NC2, NCC and probe accuracy, memorization."""

from __future__ import annotations

from pathlib import Path

from nclayers.report.table import Table

LABELS = {
    "nc1": "NC1 (sum of CDNV)",
    "cdnv_mean": "mean CDNV",
    "nc2": "NC2 (distance to ETF)",
    "ncc_acc": "NCC accuracy",
    "probe_acc": "linear-probe accuracy",
    "ratio": "memorization ratio Δ = NC1 clean / NC1 noisy",
}
LOG_SCALE = {"nc1", "cdnv_mean"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layers(table: Table, out: str | Path, prefix: str = "") -> list[Path]:
    """The standard per-layer figures of a layers table, as PNG files in `out`."""
    out = Path(out)
    written = []
    for metric in ("nc1", "nc2", "ncc_acc", "probe_acc"):
        p = plot_metric(table, metric, out / f"{prefix}{metric}.png")
        if p:
            written.append(p)
    return written
