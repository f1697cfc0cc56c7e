"""The `nclayers prune` job: remove layers of a run's model and measure what it costs.

Loads the run's trained model and compares ways of choosing the blocks to remove, each
removing the same number of blocks (`prune.n`), side by side (`prune.criteria`):

- `plateau`: the NC rule. Without `prune.n`, the redundant blocks of the run's equality
  stage when it is up to date (so `equality RUN` and `prune RUN` agree), else the plateau
  rule of `equality.*` applied to the run's layers.csv (analysing the run first when it
  has none); with `prune.n`, the n blocks that rule removes first (`choose_layers`);
- `block_influence` (ShortGPT) and `angular` (Gromov et al., n consecutive layers, at
  `prune.angular_position`) from one pass of `layer_scores` over the first
  `prune.calibration_samples` sequences of the training split (sequence layers:
  transformers);
- `last` and `random` (one set per `prune.seeds`), and a list of indices / module names
  (`prune.blocks`, the variant "list").

Without `prune.criteria` the comparison is plateau (or the list) against prune.baselines,
and block_influence and angular for transformers. Each variant is judged on the test
split by accuracy (classifiers) or next-token accuracy and perplexity (causal language
models, `analyze.task=next_token`), before and after a fine-tune of
`prune.finetune_epochs`. Writes prune.csv (one row per variant and fine-tune),
prune_layers.csv (per-block NC of every variant), prune.png, and for transformers
layer_scores.csv (per layer: block influence, angular distance of n layers from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nclayers.config import Config
from nclayers.data import TextData, make_batches
from nclayers.equality import analyze_equality
from nclayers.errors import NCLayersError
from nclayers.jobs.common import check_causal, load_model, load_split, measure_setup, run_folder
from nclayers.jobs.equality import equality_stem
from nclayers.jobs.folder import LAYERS, PRUNE, PRUNE_LAYERS, STAGES, RunFolder
from nclayers.jobs.stages import PRUNE_FIGURE as PRUNE_PNG
from nclayers.layer_scores import choose_layers, layer_scores
from nclayers.models import find_blocks
from nclayers.models.hf import is_causal_lm, is_hf_model
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
from nclayers.taps import head
from nclayers.train import train_labels_view

LAYER_SCORES = "layer_scores.csv"
EVAL_BATCH = 500
BASELINES = ("last", "random")
SCORED = ("block_influence", "angular")  # criteria that need the layer scores


@dataclass
class PruneResult:
    summary: Table  # one row per variant and fine-tune (prune.csv)
    layers: Table  # per-block NC of every variant (prune_layers.csv)
    text: str  # the comparison in words
    notes: list[str] = field(default_factory=list)  # how the blocks were chosen
    scores: Table | None = None  # per layer: block influence, angular (layer_scores.csv)


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


@dataclass
class _Run:
    """The run's model, its blocks, and the data every variant is measured on."""

    model: torch.nn.Module
    blocks: list
    test: object  # the test split
    train: object | None  # the training split (scores, fine-tune, next-token classes)
    measure: object  # jobs.common.Measure
    test_batches: object
    sample: object  # two test inputs, to trace the layers' shapes
    device: torch.device
    language: bool  # a causal language model: judged by perplexity too
    eval_batch: int  # sequences (text: analyze.batch_size) or images per evaluation batch


def _load(cfg: Config, folder: RunFolder) -> _Run:
    pc = cfg.prune
    device = resolve_device(cfg.device)
    test = load_split(cfg, "test")
    text = isinstance(test, TextData)
    # Text: the training split defines next-token classes and calibrates the scores.
    needs_train = text or pc.finetune_epochs or pc.reference == "train"
    train = load_split(cfg, "train") if needs_train else None
    measure = measure_setup(cfg, train if train is not None else test, test)
    model = load_model(cfg, folder, measure.num_classes).to(device).eval()
    language = is_causal_lm(model)
    if measure.next_token is not None:
        check_causal(model, cfg)
    if language and measure.next_token is None:
        raise NCLayersError(
            f"model.name={cfg.model.name!r} is a causal language model: its layers are "
            "measured on next-token classes; set analyze.task=next_token (and analyze.top_k)"
        )
    batch = cfg.analyze.batch_size if text else EVAL_BATCH
    test_batches = make_batches(test, batch, device, views=["clean"] if test.labels else None,
                                next_token=measure.next_token)  # fmt: skip
    sample = head(next(iter(test_batches))[0], 2)
    blocks = find_blocks(model, cfg.model.blocks, pool=measure.pool, sample=sample)
    return _Run(model, blocks, test, train, measure, test_batches, sample, device, language,
                batch)  # fmt: skip


def _criteria(cfg: Config, model) -> list[str]:
    """The rules compared (see the module doc)."""
    pc = cfg.prune
    if pc.criteria is not None:
        return list(dict.fromkeys(pc.criteria))
    listed = pc.blocks != "plateau"
    scored = list(SCORED) if is_hf_model(model) else []
    return [*([] if listed else ["plateau"]), *scored, *pc.baselines]


def _prune(cfg: Config, folder: RunFolder, progress: bool) -> PruneResult:
    pc = cfg.prune
    run = _load(cfg, folder)
    criteria = _criteria(cfg, run.model)
    notes: list[str] = []
    chosen = _choices(cfg, folder, run, criteria, notes, progress)
    if not chosen:
        raise NCLayersError(
            f"prune.criteria={criteria}: name at least one rule that chooses blocks "
            "(plateau, block_influence, angular) or a list of blocks (prune.blocks=...)"
        )
    label, first = next(iter(chosen.items()))
    others = {k: v for k, v in chosen.items() if k != label}
    train_batches = _finetune_batches(cfg, run) if pc.finetune_epochs else None
    reference = None
    if pc.reference:
        ref = run.train if pc.reference == "train" and run.train is not None else (
            load_split(cfg, pc.reference))  # fmt: skip
        reference = make_batches(ref, run.eval_batch, run.device,
                                 next_token=run.measure.next_token)  # fmt: skip
    summary, layers = prune_experiment(
        run.model, run.blocks, first, run.test_batches, run.measure.num_classes, label=label,
        seeds=pc.seeds, baselines=[b for b in BASELINES if b in criteria], criteria=others,
        train_batches=train_batches, train_cfg=cfg.train, finetune_epochs=pc.finetune_epochs,
        finetune_lr=pc.finetune_lr, reference=reference, amp=pc.amp, run=cfg.run,
        progress=progress, perplexity=run.language,
    )  # fmt: skip
    folder.write_table(PRUNE, summary)
    folder.write_table(PRUNE_LAYERS, layers)
    if chosen.scores is not None:
        folder.write_table(LAYER_SCORES, chosen.scores)
    folder.draw(PRUNE_PNG, lambda path: plot_prune(summary, path, layers))
    folder.adopt(cfg)
    names = {k: [run.blocks[l - 1].name for l in v] for k, v in chosen.items()}
    folder.mark_done("prune", cfg, blocks=names[label], label=label, chosen=names)
    return PruneResult(summary, layers, prune_summary(summary), notes, chosen.scores)


class _Chosen(dict):
    """criterion -> 1-based layers, in the order they are compared; `scores` the layer
    scores behind block_influence and angular (a Table), when computed."""

    scores: Table | None = None


def _choices(cfg, folder, run: _Run, criteria, notes, progress) -> _Chosen:
    """The blocks each rule removes, all of them the same number."""
    pc = cfg.prune
    keep = prunable_layers(run.model, run.blocks, run.sample)
    chosen = _Chosen()
    if pc.blocks != "plateau":
        chosen["list"] = resolve_blocks(pc.blocks, run.blocks)
        check_prunable(run.model, run.blocks, chosen["list"], run.sample)
        if pc.n is not None and pc.n != len(chosen["list"]):
            raise NCLayersError(
                f"prune.n={pc.n} but prune.blocks lists {len(chosen['list'])} blocks; "
                "remove prune.n, or list that many"
            )
    n = pc.n if pc.n is not None else len(chosen["list"]) if "list" in chosen else None
    if "plateau" in criteria:
        chosen["plateau"] = _plateau(cfg, folder, run, keep, n, notes, progress)
        n = len(chosen["plateau"]) if n is None else n
    wanted = [c for c in criteria if c in SCORED]
    if wanted and n is None:
        raise NCLayersError(
            f"prune.criteria {wanted} remove prune.n layers: set prune.n (e.g. prune.n=2)"
        )
    if wanted and n:
        scores = _scores(cfg, run, progress)
        for c in wanted:
            chosen[c] = choose_layers(c, n, scores=scores, candidates=keep)
        chosen.scores = scores.table(n)
        notes.append(f"layer scores on {scores.sequences} training sequences "
                     f"(angular distance at the {scores.position} token)")  # fmt: skip
    elif wanted:
        notes.append("no block to remove: block_influence and angular are not compared")
    return chosen


def _plateau(cfg, folder, run: _Run, keep: list[int], n, notes, progress) -> list[int]:
    """The plateau rule's blocks: the equality stage's (n None), else the n it ranks first."""
    if cfg.prune.n is None and n is None:
        wanted = plateau_blocks(cfg, folder, notes, progress)
        skipped = [l for l in wanted if l not in keep]
        if skipped:
            names = ", ".join(f"{l} ({run.blocks[l - 1].name})" for l in skipped)
            notes.append(f"plateau blocks that change shape or are shared, kept: {names}")
        if not wanted:
            notes.append("no plateau: the rule finds no redundant block, nothing is removed")
        return [l for l in wanted if l in keep]
    ec = cfg.equality
    curve = _nc1_curve(cfg, folder, notes, progress)
    if len(curve) != len(run.blocks):
        raise NCLayersError(
            f"{folder.file(LAYERS)} holds NC1 of {len(curve)} layers, the model has "
            f"{len(run.blocks)} blocks; run `nclayers analyze {folder.path}` again"
        )
    notes.append(f"plateau rule: the {n} blocks of the least NC1 enhancement, plateau first "
                 f"(equality.plateau_fraction={ec.plateau_fraction}, "
                 f"plateau_min_run={ec.plateau_min_run})")  # fmt: skip
    return choose_layers("plateau", n, nc1=curve, candidates=keep,
                         fraction=ec.plateau_fraction, min_run=ec.plateau_min_run)  # fmt: skip


def _scores(cfg: Config, run: _Run, progress: bool):
    pc = cfg.prune
    calib = run.train if run.train is not None else run.test
    calib = calib.subset(torch.arange(min(pc.calibration_samples, len(calib))))
    views = ["clean"] if calib.labels else None
    batches = make_batches(calib, run.eval_batch, run.device, views=views)
    return layer_scores(run.model, batches, run.blocks, position=pc.angular_position,
                        amp=pc.amp, progress=progress)  # fmt: skip


def _finetune_batches(cfg: Config, run: _Run):
    train = run.train
    views = None
    if run.language:
        train = train.without_labels()  # the next token is the target
    elif train.labels:
        views = [train_labels_view(train)]
    text = isinstance(train, TextData)
    return make_batches(
        train, cfg.train.batch_size, run.device, train=cfg.train.augment or text, shuffle=True,
        seed=cfg.train.seed, views=views,
    )  # fmt: skip


def _nc1_curve(cfg: Config, folder: RunFolder, notes: list[str], progress: bool) -> list[float]:
    """NC1 per layer of the run's curve (equality.split, equality.view) in layers.csv."""
    ec = cfg.equality
    table = _run_layers(cfg, folder, notes, progress)
    rows = [r for r in table if r.get("split") == ec.split and r.get("view") == ec.view
            and r.get("run") in (cfg.run, None, "") and r.get("nc1") is not None]  # fmt: skip
    if not rows:
        raise NCLayersError(
            f"{folder.file(LAYERS)} holds no NC1 of split {ec.split!r}, view {ec.view!r} for "
            f"run {cfg.run!r}; run `nclayers analyze {folder.path}` (equality.split/view)"
        )
    return [r["nc1"] for r in sorted(rows, key=lambda r: r["layer"])]


def _run_layers(cfg: Config, folder: RunFolder, notes: list[str], progress: bool) -> Table:
    if folder.exists(LAYERS):
        return folder.layers()
    from nclayers.jobs.analyze import analyze_job

    notes.append(f"no layers.csv in {folder.path}: analysed the run first")
    return analyze_job(cfg, folder, progress=progress).table


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
    table = _run_layers(cfg, folder, notes, progress)
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


__all__ = ["LAYER_SCORES", "PRUNE_PNG", "PruneResult", "plateau_blocks", "prune_job"]
