"""The layer-equality figure: log NC1 with the geometric and plateau fits, and the
per-block enhancement against the plateau threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nclayers.equality import CurveReport
from nclayers.report.figures import new_figure, save_figure


def plot_equality(report: CurveReport, path: str | Path) -> Path:
    """Two panels: log NC1 with both fits (plateau blocks shaded), and the per-block
    enhancement against the plateau threshold."""
    rows = report.rows
    layers = [r["layer"] for r in rows]
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(11, 4))
    ax1.plot(layers, [r["nc1"] for r in rows], "o", label="NC1")
    geo, plat = report.fit.geometric, report.fit.plateau
    ax1.plot(layers, np.exp(geo.fitted), "-", label=f"geometric (ratio {geo.ratio:.3f})")
    if plat is not None:
        ax1.plot(layers, np.exp(plat.fitted), "--", label="decay-flat-decay")
    for run in report.plateau.runs:
        for ax in (ax1, ax2):
            ax.axvspan(run[0] - 0.5, run[-1] + 0.5, color="orange", alpha=0.15)
    ax1.set_yscale("log")
    ax1.set_xlabel("block index")
    ax1.set_ylabel("NC1 (sum of CDNV)")
    ax1.set_title(report.fit.preferred + " preferred", fontsize=9)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    e = [(r["layer"], r["e_nc1"]) for r in rows if r.get("e_nc1") is not None]
    ax2.bar([x for x, _ in e], [v for _, v in e], color="tab:blue", label="e_nc1")
    e2 = [(r["layer"], r["e_nc2"]) for r in rows if r.get("e_nc2") is not None]
    if e2:
        ax2.plot([x for x, _ in e2], [v for _, v in e2], "s", color="tab:green", ms=4,
                 label="e_nc2 = log(NC2_(l-1) / NC2_l)")  # fmt: skip
    ax2.axhline(report.plateau.threshold, color="red", ls="--", lw=1, label="plateau threshold")
    ax2.axhline(report.plateau.mean_enhancement, color="grey", ls=":", lw=1, label="mean")
    ax2.set_xlabel("block index")
    ax2.set_ylabel("enhancement e_l = log(NC_(l-1) / NC_l)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(report.name, fontsize=9)
    return save_figure(fig, path)
