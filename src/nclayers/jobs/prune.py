"""The `nclayers prune` job: remove a run's plateau (or listed) blocks and measure it.

Loads the run's trained model, picks the blocks (`prune.blocks`: "plateau" reads the
run's layers.csv, analysing the run first when it has none, and applies the plateau
rule of `equality.*`; or a list of indices / module names), and compares removing them
with removing as many blocks at random (`prune.seeds`) and the last ones, before and
after a fine-tune of `prune.finetune_epochs`. Writes prune.csv (one row per variant and
fine-tune), prune_layers.csv (per-block NC of every variant), prune.png, and marks the
stage done.
"""

from __future__ import annotations

from pathlib import Path

from nclayers.data import DeviceBatches, load_dataset
from nclayers.equality import analyze_equality
from nclayers.errors import NCLayersError
from nclayers.jobs.common import load_model
from nclayers.jobs.folder import LAYERS, PRUNE, RunFolder
from nclayers.models import find_blocks
from nclayers.prune import (
    check_prunable,
    prunable_layers,
    prune_experiment,
    prune_summary,
    resolve_blocks,
)
from nclayers.report.prune_figures import plot_prune
from nclayers.runtime import resolve_device
from nclayers.table import Table
from nclayers.train import train_labels_view

PRUNE_LAYERS_CSV = "prune_layers.csv"
PRUNE_PNG = "prune.png"
EVAL_BATCH = 500


def plateau_blocks(table: Table, cfg) -> tuple[list[int], str]:
    """The plateau rule's candidate blocks of the run's curve, and the rule as text."""
    reports = analyze_equality(
        table, split=cfg.equality.split, view=cfg.equality.view,
        fraction=cfg.equality.plateau_fraction, min_run=cfg.equality.plateau_min_run,
        margin=cfg.equality.bic_margin,
    )  # fmt: skip
    mine = [r for r in reports if r.key.get("run") in (cfg.run, None, "")] or reports
    if len(mine) != 1:
        runs = sorted(str(r.key.get("run")) for r in reports)
        raise NCLayersError(
            f"layers.csv holds {len(mine)} curves ({runs}); set run=NAME to pick this run's"
        )
    return mine[0].plateau.layers, mine[0].plateau.rule


def prune_run(cfg, run_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Prune the model of the run in `run_dir` (default `cfg.out`) and write the results
    to `cfg.out`. Returns {"summary": Table, "layers": Table, "text": str, "notes": [...]}.
    """
    run = RunFolder(run_dir or cfg.out)
    out = RunFolder(cfg.out)
    pc = cfg.prune
    device = resolve_device(cfg.device)
    test = load_dataset(cfg.data, "test")
    num_classes = test.num_classes
    model = load_model(cfg, num_classes, folder=run).to(device).eval()
    blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)
    test_batches = DeviceBatches(test, EVAL_BATCH, device, views=["clean"])
    sample = next(iter(test_batches))[0][:2]

    notes: list[str] = []
    if pc.blocks == "plateau":
        label = "plateau"
        if run.exists(LAYERS):
            table = run.layers()
        else:
            from nclayers.jobs.analyze import analyze_run

            notes.append(f"no layers.csv in {run.path}: analysed the run first")
            table = analyze_run(cfg, model=model, progress=progress)
        wanted, rule = plateau_blocks(table, cfg)
        notes.append(f"plateau rule: {rule}")
        keep = set(prunable_layers(model, blocks, sample))
        chosen = [l for l in wanted if l in keep]
        skipped = [l for l in wanted if l not in keep]
        if skipped:
            names = ", ".join(f"{l} ({blocks[l - 1].name})" for l in skipped)
            notes.append(f"plateau blocks that change shape, kept: {names}")
        if not wanted:
            notes.append("no plateau: the rule finds no redundant block, nothing is removed")
    else:
        label = "list"
        chosen = resolve_blocks(pc.blocks, blocks)
        check_prunable(model, blocks, chosen, sample)

    train_batches = None
    if pc.finetune_epochs:
        train_ds = load_dataset(cfg.data, "train")
        view = train_labels_view(train_ds)  # the labels the run was trained on
        train_batches = DeviceBatches(
            train_ds, cfg.train.batch_size, device, train=cfg.train.augment, shuffle=True,
            seed=cfg.train.seed, views=[view],
        )  # fmt: skip
    reference = None
    if pc.reference:
        reference = DeviceBatches(load_dataset(cfg.data, pc.reference), EVAL_BATCH, device)
    summary, layers = prune_experiment(
        model, blocks, chosen, test_batches, num_classes, label=label, seeds=pc.seeds,
        baselines=pc.baselines, train_batches=train_batches, train_cfg=cfg.train,
        finetune_epochs=pc.finetune_epochs, finetune_lr=pc.finetune_lr, reference=reference,
        amp=cfg.train.amp, run=cfg.run, progress=progress,
    )  # fmt: skip
    out.mkdir()
    summary.to_csv(out.file(PRUNE))
    layers.to_csv(out.file(PRUNE_LAYERS_CSV))
    plot_prune(summary, out.file(PRUNE_PNG), layers)
    text = prune_summary(summary)
    out.mark_done("prune", blocks=[blocks[l - 1].name for l in chosen], label=label)
    return {"summary": summary, "layers": layers, "text": text, "notes": notes}


def prune_section(folder: str | Path) -> tuple[Table, str] | None:
    """For the HTML report: the run's prune.csv and a short text, or None if not measured."""
    folder = RunFolder(folder)
    if not folder.exists(PRUNE):
        return None
    table = Table.from_csv(folder.file(PRUNE))
    return table, prune_summary(table)
