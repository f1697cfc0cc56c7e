"""The pruning figure: test accuracy of each kind of block removal, before and after the
fine-tune, and NC1 per block of the unpruned, chosen and last variants."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from nclayers.prune import NONE, removal_kinds
from nclayers.report.figures import new_figure, save_figure


def plot_prune(
    table: Sequence[dict], path: str | Path, layers: Sequence[dict] | None = None
) -> Path:
    """Test accuracy of each kind of removal, without and with the fine-tune; random
    baselines as mean with their seeds' range. Given the per-block rows (`layers`), a
    second panel draws NC1 per block of the unpruned, chosen and last variants."""
    table = list(table)
    kinds = [NONE, *removal_kinds(table)]
    rounds = sorted({r["finetune_epochs"] for r in table})
    if layers:
        fig, (ax, ax2) = new_figure(1, 2, figsize=(12, 4))
        _plot_nc1(ax2, layers, [k for k in kinds if not k.startswith("random")], rounds)
    else:
        fig, ax = new_figure(figsize=(6.5, 4))
    width = 0.8 / len(rounds)
    for j, epochs in enumerate(rounds):
        means, lows, highs = [], [], []
        for kind in kinds:
            accs = [
                r["test_acc"] for r in table if r["kind"] == kind and r["finetune_epochs"] == epochs
            ]
            m = statistics.mean(accs) if accs else float("nan")
            means.append(m)
            lows.append(m - min(accs) if accs else 0.0)
            highs.append(max(accs) - m if accs else 0.0)
        xs = [i + (j - (len(rounds) - 1) / 2) * width for i in range(len(kinds))]
        label = "no fine-tune" if epochs == 0 else f"{epochs}-epoch fine-tune"
        ax.bar(xs, means, width, yerr=[lows, highs], capsize=3, label=label)
    k = max((r["n_removed"] for r in table), default=0)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels([f"{kd}" for kd in kinds])
    ax.set_ylabel("test accuracy")
    ax.set_title(f"removing {k} blocks by identity", fontsize=10)
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
