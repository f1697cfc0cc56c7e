"""Every stage of a run, declared once: its job, the settings that key its measurements,
the files it leaves, what it needs, whether it measures the weights, its figure.

The run folder (`RunFolder`: stage files, status, measurements), the sweep (its order,
what blocks what, the jobs it runs) and the report (stage status, figures) all read these
declarations; the columns a stage measures into layers.csv are declared with the column
schema (`nclayers.table.SCHEMA`, each column's `stage`). A new stage is its job module
plus one `Stage(...)` line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    job: "module:function", the plain job of its verb, `job(cfg, folder, *, progress)`.
    settings: config keys (or section prefixes) whose values change its numbers; its
      measurements are kept per their values.
    files: the files a finished stage leaves (one missing or damaged: out of date).
    needs: stages it runs after in a sweep and is blocked by when they fail.
    after: stages it runs after when they are in the sweep (it may read their results).
    depends_on: stages whose results its own are computed from: out of date when they
      run again.
    weights: it measures the run's weights (out of date when they change).
    measured: its results are kept per settings (measurements/<stage>-<key>.csv).
    figure: its own figure file.
    """

    name: str
    job: str
    settings: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    weights: bool = True
    measured: bool = False
    figure: str | None = None

    def load(self) -> Callable:
        module, function = self.job.split(":")
        return getattr(importlib.import_module(module), function)


# The files the stages leave in a run folder (`nclayers.jobs.folder` names the others).
CHECKPOINT = "checkpoint.pt"
TRAIN_SUMMARY = "train_summary.json"
SUMMARY = "summary.json"
PROBE = "probe.csv"
PROBE_HEADS = "probe_heads.pt"
PROBE_FIGURE = "probe_acc.png"
MEMORIZATION_LAYERS = "memorization_layers.csv"
MEMORIZATION_FIGURE = "memorization.png"
PRUNE = "prune.csv"
PRUNE_LAYERS = "prune_layers.csv"
PRUNE_FIGURE = "prune.png"

MEASURE = ("data", "model", "analyze.task", "analyze.top_k", "run")
STAGES: tuple[Stage, ...] = (
    Stage("train", "nclayers.jobs.train:train_job", files=(CHECKPOINT, TRAIN_SUMMARY),
          weights=False),
    Stage("analyze", "nclayers.jobs.analyze:analyze_job", measured=True, needs=("train",),
          settings=(*MEASURE, "analyze.split", "analyze.reference", "analyze.reference_subset",
                    "analyze.classic_nc1", "analyze.amp"), files=(SUMMARY,)),
    Stage("probe", "nclayers.jobs.probe:probe_job", measured=True, needs=("train",),
          settings=(*MEASURE, "probe"), figure=PROBE_FIGURE,
          files=(PROBE, PROBE_HEADS, SUMMARY)),
    Stage("memorization", "nclayers.jobs.memorization:memorization_job", measured=True,
          needs=("train",), settings=("data", "model", "analyze.amp", "run"),
          figure=MEMORIZATION_FIGURE, files=(MEMORIZATION_LAYERS, SUMMARY)),
    Stage("equality", "nclayers.jobs.equality:equality_job", needs=("analyze",),
          depends_on=("analyze",), settings=("equality", "run"), weights=False,
          figure="equality.png"),
    Stage("prune", "nclayers.jobs.prune:prune_job", needs=("train",), after=("equality",),
          settings=("data", "model", "prune", "equality", "train", "analyze.task",
                    "analyze.top_k", "run"), figure=PRUNE_FIGURE,
          files=(PRUNE, PRUNE_LAYERS)),
)  # fmt: skip
BY_NAME = {s.name: s for s in STAGES}


def stage_order(stages: tuple[Stage, ...] = STAGES) -> tuple[str, ...]:
    """The stages' names, each after those it needs or runs after (declaration order
    otherwise)."""
    done: list[str] = []

    def visit(stage: Stage, seen: tuple[str, ...] = ()) -> None:
        if stage.name in done:
            return
        if stage.name in seen:
            raise ValueError(f"stages: {stage.name} needs itself ({' -> '.join(seen)})")
        for before in (*stage.needs, *stage.after):
            visit(BY_NAME[before], (*seen, stage.name))
        done.append(stage.name)

    for stage in stages:
        visit(stage)
    return tuple(done)


ORDER = stage_order()

__all__ = ["BY_NAME", "ORDER", "STAGES", "Stage", "stage_order"]
