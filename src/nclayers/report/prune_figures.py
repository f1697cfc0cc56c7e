"""The pruning figure: what removing blocks each way costs, and NC1 per block after it.

Drawn on a `matplotlib.figure.Figure` (no pyplot state), written by `save_figure`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from nclayers.prune import NONE, variant_kinds
from nclayers.report.figures import new_figure, save_figure

LABELS = {"test_acc": "test accuracy", "perplexity": "perplexity (held out)"}


def plot_prune(
    table: Sequence[dict],
    path: str | Path,
    layers: Sequence[dict] | None = None,
    metric: str | None = None,
) -> Path:
    """Test accuracy (or `metric`, by default perplexity where every row has one) of each
    kind of removal, without and with the fine-tune; random baselines as mean with their
    seeds' range. Given the per-block rows (`layers`), a second panel draws NC1 per block
    of the unpruned, chosen and deterministic variants."""
    table = list(table)
    if metric is None:
        has_ppl = table and all(r.get("perplexity") is not None for r in table)
        metric = "perplexity" if has_ppl else "test_acc"
    kinds = [NONE, *variant_kinds(table)]
    rounds = sorted({r["finetune_epochs"] for r in table})
    if layers:
        fig, (ax, ax2) = new_figure(1, 2, figsize=(12, 4))
        _plot_nc1(ax2, layers, [k for k in kinds if not k.startswith("random")], rounds)
    else:
        fig, ax = new_figure(figsize=(6.5, 4))
    width = 0.8 / max(len(rounds), 1)
    for j, epochs in enumerate(rounds):
        means, lows, highs = [], [], []
        for kind in kinds:
            vals = [
                r[metric] for r in table if r["kind"] == kind and r["finetune_epochs"] == epochs
            ]
            m = statistics.mean(vals) if vals else float("nan")
            means.append(m)
            lows.append(m - min(vals) if vals else 0.0)
            highs.append(max(vals) - m if vals else 0.0)
        xs = [i + (j - (len(rounds) - 1) / 2) * width for i in range(len(kinds))]
        label = "no fine-tune" if epochs == 0 else f"{epochs}-epoch fine-tune"
        ax.bar(xs, means, width, yerr=[lows, highs], capsize=3, label=label)
    k = max((r["n_removed"] for r in table), default=0)
    ax.set_xticks(range(len(kinds)))
    long = len(kinds) > 4  # e.g. every criterion of a transformer: slanted, readable labels
    ax.set_xticklabels(kinds, rotation=25 if long else 0, ha="right" if long else "center")
    ax.set_ylabel(LABELS.get(metric, metric))
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"removing {k} blocks (each passes its input on)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def _plot_nc1(ax, layers: Sequence[dict], variants: Sequence[str], rounds: Sequence[int]) -> None:
    for variant in variants:
        for epochs in rounds:
            pts = sorted(
                (r["layer"], r["nc1"])
                for r in layers
                if r.get("variant") == variant and r.get("finetune_epochs") == epochs
            )
            if pts:
                style = "o-" if epochs == 0 else "x--"
                label = variant + ("" if epochs == 0 else f" +{epochs} ep")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("block index (a removed block shows its input)")
    ax.set_ylabel("NC1 (sum of CDNV)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


__all__ = ["plot_prune"]
