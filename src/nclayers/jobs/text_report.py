"""The text demo's figures, report.html and the story it prints (`nclayers demo --text`).

`write_text_report(folder, layers, prune, summary)` draws text_demo.png (per layer, the
language model's token-level NC1, NC2 and NCC / probe accuracy beside the classifier's)
and prune.png (held-out perplexity after removing the same number of layers each way),
and writes report.html: the overview with timings, the figures, the per-layer tables, the
pruning comparison with the layer scores behind it, and the full layers.csv.
"""

from __future__ import annotations

from pathlib import Path

from nclayers.jobs.folder import REPORT, RunFolder
from nclayers.jobs.prune import PRUNE_PNG
from nclayers.probing.result import underfit_note
from nclayers.prune import prune_summary
from nclayers.report.figures import new_figure, save_figure
from nclayers.report.html import Figure, Section, render_html
from nclayers.report.prune_figures import plot_prune
from nclayers.table import Table, shown_columns

FIGURE = "text_demo.png"
LAYER_COLUMNS = ["layer", "block", "dim", "n", *shown_columns(), "probe_underfit"]
PRUNE_COLUMNS = ["variant", "n_removed", "layers", "blocks", "perplexity", "test_acc",
                 "nc1_last"]  # fmt: skip
RUN_TITLES = {"lm": "language model (next-token classes, every position)",
              "classifier": "classifier (planted class words, mean over tokens)"}  # fmt: skip


def split_rows(layers: Table, run: str) -> Table:
    """The test split's rows of one run."""
    return Table(r for r in layers if r.get("run") == run and r.get("split") == "test")


def draw_layers(folder: RunFolder, layers: Table) -> Path | None:
    """Per run (row): NC1 (log), NC2, and NCC / probe accuracy against the layer."""
    runs = [r for r in RUN_TITLES if split_rows(layers, r)]
    fig, axes = new_figure(len(runs), 3, figsize=(12, 3.4 * len(runs)), squeeze=False)
    for row, run in enumerate(runs):
        rows = sorted(split_rows(layers, run), key=lambda r: r["layer"])
        x = [r["layer"] for r in rows]
        nc1, nc2, acc = axes[row]
        nc1.plot(x, [r["nc1"] for r in rows], "o-")
        nc1.set_yscale("log")
        nc1.set_ylabel(f"{run}\nNC1 (sum of CDNV)")
        nc2.plot(x, [r["nc2"] for r in rows], "s-")
        nc2.set_ylabel("NC2 (distance to ETF)")
        for key, style in (("ncc_acc", "o-"), ("probe_acc", "^--")):
            values = [r.get(key) for r in rows]
            if all(v is not None for v in values):
                acc.plot(x, values, style, label=key)
        acc.set_ylabel("accuracy (test)")
        acc.legend(fontsize=8)
        nc1.set_title(RUN_TITLES[run], fontsize=9, loc="left")
        for ax in axes[row]:
            ax.set_xticks(x)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
    # laid out, written atomically and checksummed in the folder's manifest
    return folder.draw(FIGURE, lambda path: save_figure(fig, path))


def draw_figures(folder: RunFolder, layers: Table, prune) -> list[Path]:
    """text_demo.png and prune.png in `folder` (None on the ranks that do not write)."""
    pruned = folder.draw(PRUNE_PNG, lambda path: plot_prune(prune.summary, path, prune.layers))
    return [p for p in (draw_layers(folder, layers), pruned) if p is not None]


def write_text_report(
    folder: RunFolder, layers: Table, prune, summary: dict, figures: list[Path]
) -> Path:
    """report.html: the overview, `figures`, the tables (see the module doc)."""
    lm, cls = summary["language_model"], summary["classifier"]
    seconds = summary.get("seconds", {})
    overview = {
        "language model": f"test perplexity {lm['test_perplexity']:.2f}, next-token accuracy "
        f"{lm['next_token_accuracy']:.3f} (top-{summary['size']['top_k']} classes)",
        "classifier": f"test accuracy {cls['test_acc']:.3f}",
        "wall time": f"{seconds['total']:.0f} s" if "total" in seconds else "–",
        "CPU time": f"{summary['cpu_seconds']:.0f} s" if "cpu_seconds" in summary else "–",
        "steps (s)": {k: round(v, 1) for k, v in seconds.items()},
    }
    prune_table = prune.summary
    sections = [
        Section("Overview", items=overview),
        Section("Figures", figures=[Figure(p, p.name) for p in figures]),
        Section("Language model: token-level collapse per layer (test split)",
                table=split_rows(layers, "lm"), columns=LAYER_COLUMNS),
        Section("Which layers can go (held-out perplexity)",
                text=" ".join([prune_summary(prune_table), *prune.notes]), table=prune_table,
                columns=[c for c in PRUNE_COLUMNS if c in prune_table.columns]),
        Section("Classifier: collapse per layer (test split)",
                table=split_rows(layers, "classifier"), columns=LAYER_COLUMNS),
        Section("layers.csv", table=layers, collapsed=True),
    ]  # fmt: skip
    if prune.scores is not None:
        sections.insert(4, Section("Layer scores (training text)", table=prune.scores))
    return folder.write(REPORT, render_html("nclayers text demo: every layer of two transformers",
                                            sections, subtitle=f"{folder.path}"))  # fmt: skip


def story(layers: Table, prune, summary: dict, out: Path) -> str:
    """What the demo found, for the terminal: both per-layer tables and the pruning."""
    lm, cls = summary["language_model"], summary["classifier"]
    cols = ["layer", "block", "nc1", "nc2", "ncc_acc", "probe_acc", "probe_lr", "probe_underfit"]
    notes = {
        k: [n] if (n := underfit_note(split_rows(layers, k))) else [] for k in ("lm", "classifier")
    }
    prune_cols = [c for c in PRUNE_COLUMNS if c in prune.summary.columns and c != "nc1_last"]
    lines = [
        "", f"Language model, test split, per layer (top-{summary['size']['top_k']} next tokens):",
        split_rows(layers, "lm").format(cols), *notes["lm"], "",
        "Removing layers (each passes its input on), held-out perplexity:",
        prune.summary.format(prune_cols), prune_summary(prune.summary), *prune.notes, "",
        "Classifier (planted class words), test split, per layer:",
        split_rows(layers, "classifier").format(cols), *notes["classifier"], "",
        f"language model: test perplexity {lm['test_perplexity']:.2f}, next-token accuracy "
        f"{lm['next_token_accuracy']:.3f}; classifier: test accuracy {cls['test_acc']:.3f}",
        f"Results in {out}/: layers.csv, prune.csv, layer_scores.csv, summary.json, "
        f"{FIGURE}, prune.png, report.html  ({summary['seconds']['total']:.0f} s wall, "
        f"{summary['cpu_seconds']:.0f} s CPU)",
    ]  # fmt: skip
    return "\n".join(lines)


__all__ = ["draw_figures", "draw_layers", "story", "write_text_report"]
