"""The `nclayers prune` job: remove a run's plateau (or listed) blocks and measure it.

Loads the run's trained model and picks the blocks (`prune.blocks`): "plateau" takes the
redundant blocks of the run's equality stage when it is up to date (so `equality RUN`
and `prune RUN --blocks plateau` agree), else applies the plateau rule of `equality.*`
to the run's layers.csv (analysing the run first when it has none); or a list of indices
/ module names. It compares removing them with removing as many blocks at random
(`prune.seeds`) and the last ones, before and after a fine-tune of
`prune.finetune_epochs`. Writes prune.csv (one row per variant and fine-tune),
prune_layers.csv (per-block NC of every variant), prune.png.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nclayers.config import Config
from nclayers.data import load_dataset, make_batches
from nclayers.equality import analyze_equality
from nclayers.errors import NCLayersError
from nclayers.jobs.common import load_model, run_folder
from nclayers.jobs.equality import equality_stem
from nclayers.jobs.folder import LAYERS, PRUNE, PRUNE_LAYERS, STAGES, RunFolder
from nclayers.models import find_blocks
from nclayers.prune import (
    check_prunable,
    prunable_layers,
    prune_experiment,
    prune_summary,
    resolve_blocks,
)
from nclayers.report.prune_figures import plot_prune
from nclayers.runtime import barrier, is_main, resolve_device, setup_distributed
from nclayers.table import Table
from nclayers.train import train_labels_view

PRUNE_PNG = "prune.png"
EVAL_BATCH = 500


@dataclass
class PruneResult:
    summary: Table  # one row per variant and fine-tune (prune.csv)
    layers: Table  # per-block NC of every variant (prune_layers.csv)
    text: str  # the comparison in words
    notes: list[str] = field(default_factory=list)  # how the blocks were chosen


def prune_job(cfg: Config, folder: RunFolder | str | Path, *, progress: bool = True) -> PruneResult:
    """Prune the run's model (see the module doc) and write the results into `folder`."""
    folder = run_folder(folder)
    with folder.lock():
        folder.check_run(cfg)
        folder.check_inputs(STAGES)
        result = _prune(cfg, folder, progress and is_main())
    _meet(cfg.device)
    return result


def _meet(device_name: str) -> None:
    """Under torchrun every rank runs the whole experiment (its fine-tune is not
    distributed) and rank 0 writes; the ranks then meet once, so that the others return
    only after rank 0 has written."""
    proc, _ = setup_distributed(device_name)
    try:
        barrier()
    finally:
        proc.close()


def _prune(cfg: Config, folder: RunFolder, progress: bool) -> PruneResult:
    pc = cfg.prune
    device = resolve_device(cfg.device)
    test = load_dataset(cfg.data, "test")
    model = load_model(cfg, folder, test.num_classes).to(device).eval()
    blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)
    test_batches = make_batches(test, EVAL_BATCH, device, views=["clean"])
    sample = next(iter(test_batches))[0][:2]
    notes: list[str] = []
    if pc.blocks == "plateau":
        label, wanted = "plateau", plateau_blocks(cfg, folder, notes, progress)
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
        train_batches = make_batches(
            train_ds, cfg.train.batch_size, device, train=cfg.train.augment, shuffle=True,
            seed=cfg.train.seed, views=[train_labels_view(train_ds)],
        )  # fmt: skip
    reference = None
    if pc.reference:
        reference = make_batches(load_dataset(cfg.data, pc.reference), EVAL_BATCH, device)
    summary, layers = prune_experiment(
        model, blocks, chosen, test_batches, test.num_classes, label=label, seeds=pc.seeds,
        baselines=pc.baselines, train_batches=train_batches, train_cfg=cfg.train,
        finetune_epochs=pc.finetune_epochs, finetune_lr=pc.finetune_lr, reference=reference,
        amp=pc.amp, run=cfg.run, progress=progress,
    )  # fmt: skip
    folder.write_table(PRUNE, summary)
    folder.write_table(PRUNE_LAYERS, layers)
    folder.draw(PRUNE_PNG, lambda path: plot_prune(summary, path, layers))
    folder.adopt(cfg)
    folder.mark_done("prune", cfg, blocks=[blocks[l - 1].name for l in chosen], label=label)
    return PruneResult(summary, layers, prune_summary(summary), notes)


def plateau_blocks(cfg: Config, folder: RunFolder, notes: list[str], progress: bool) -> list[int]:
    """The run's redundant blocks: from its up-to-date equality stage, else by the
    plateau rule of `cfg.equality` applied to its layers.csv."""
    stem = equality_stem(cfg.equality)
    if folder.done("equality", cfg) and folder.exists(f"{stem}.json"):
        curves = [c for c in folder.read_json(f"{stem}.json", default=[])
                  if c.get("run") in (cfg.run, None, "")]  # fmt: skip
        if len(curves) == 1:
            notes.append(f"plateau blocks from {stem}.json (rule: {curves[0].get('rule')})")
            return [int(b) for b in curves[0].get("redundant_blocks") or []]
    if folder.exists(LAYERS):
        table = folder.layers()
    else:
        from nclayers.jobs.analyze import analyze_job

        notes.append(f"no layers.csv in {folder.path}: analysed the run first")
        table = analyze_job(cfg, folder, progress=progress).table
    ec = cfg.equality
    reports = analyze_equality(
        table, split=ec.split, view=ec.view, fraction=ec.plateau_fraction,
        min_run=ec.plateau_min_run, margin=ec.bic_margin,
    )  # fmt: skip
    mine = [r for r in reports if r.key.get("run") in (cfg.run, None, "")] or reports
    if len(mine) != 1:
        runs = sorted(str(r.key.get("run")) for r in reports)
        raise NCLayersError(
            f"{folder.file(LAYERS)} holds {len(mine)} curves ({runs}); set run=NAME to pick "
            "this run's"
        )
    notes.append(f"plateau rule: {mine[0].plateau.rule}")
    return list(mine[0].plateau.layers)


__all__ = ["PRUNE_PNG", "PruneResult", "plateau_blocks", "prune_job"]
