"""The `nclayers memorization RUN` job: memorization ratio per block of a trained run.

It measures the run's training split (the images the model was trained on) with its
trained model, with the settings it is given (so a sweep's `data.dir` or `device` reach
it like every other stage):

- label noise (`data.noise`): one pass with the views clean, noisy, changed_clean,
  changed_noisy and unchanged; Δ = nc1(clean) / nc1(noisy), and the same ratio on the
  changed samples alone; the memorized fraction (train accuracy of the changed samples
  under their training labels) from the same pass. When some class has no changed (or
  no unchanged) sample, NC1 of those views is undefined: they are left out
  (summary: changed_views false) and the memorized fraction takes a pass of its own;
- corrupted inputs (`data.corruption`): two passes, the clean images and the corrupted
  images (column input = clean / corrupted), true labels; Δ = nc1(clean) /
  nc1(corrupted).

Writes memorization.csv (per block both NC1 values, Δ, memorizing),
memorization_layers.csv (every view's per-block rows), memorization.png (the line at
1) and a "memorization" entry in summary.json. Under torchrun each rank measures its shard,
the statistics are reduced exactly, rank 0 writes and the other ranks wait for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nclayers.analysis import AnalysisResult, analyze
from nclayers.config import Config
from nclayers.data import (
    CHANGED_CLEAN,
    CHANGED_NOISY,
    UNCHANGED,
    has_label_noise,
    load_dataset,
    make_batches,
    with_changed_views,
)
from nclayers.errors import NCLayersError
from nclayers.jobs.common import load_model, number_blocks, run_folder, sample_inputs
from nclayers.jobs.folder import (
    MEASURED,
    MEMORIZATION,
    MEMORIZATION_LAYERS,
    STAGES,
    SUMMARY,
    RunFolder,
)
from nclayers.jobs.stages import MEMORIZATION_FIGURE as FIGURE
from nclayers.memorization import (
    CLEAN_INPUT,
    CORRUPTED_INPUT,
    corruption_ratio,
    memorization_layers,
    memorization_ratio,
    memorized_fraction,
)
from nclayers.models import find_blocks
from nclayers.report.figures import plot_metric
from nclayers.runtime import barrier, setup_distributed
from nclayers.table import Table


@dataclass
class MemorizationResult:
    """What `memorization_job` returns: the ratios (memorization.csv), every view's rows
    (memorization_layers.csv) and the summary entry (kind, memorized fraction, layers)."""

    ratios: Table
    rows: Table
    info: dict


def memorization_applies(cfg: Config) -> bool:
    """Whether a run has a memorization ratio to measure: trained with label noise or with
    corrupted inputs (one kind at a time). A clean baseline run of a sweep has none."""
    return bool(cfg.data.corruption) != has_label_noise(cfg.data.noise)


def memorization_job(
    cfg: Config,
    folder: RunFolder | str | Path,
    *,
    progress: bool = True,
    model: nn.Module | None = None,
) -> MemorizationResult:
    """Measure the memorization ratio of the run in `folder` (see the module doc)."""
    folder = run_folder(folder)
    corrupted, noisy = bool(cfg.data.corruption), has_label_noise(cfg.data.noise)
    if not memorization_applies(cfg):
        what = "both data.noise and data.corruption" if noisy else "neither data.noise nor "
        raise NCLayersError(
            f"run {str(folder.path)!r} was trained with {what}"
            + ("" if noisy else "data.corruption: there is nothing to compare")
            + ("; the ratio compares one kind of noise at a time" if noisy else "")
        )
    proc, device = setup_distributed(cfg.device)  # under torchrun: this rank's shard
    try:
        result = _measure(cfg, folder, model, corrupted, proc, device, progress and proc.main)
        barrier()  # the other ranks return once rank 0 has written
    finally:
        proc.close()
    return result


def _measure(
    cfg, folder: RunFolder, model, corrupted: bool, proc, device, progress: bool
) -> MemorizationResult:
    with folder.lock():
        folder.check_run(cfg)
        folder.check_inputs(SUMMARY, STAGES, MEASURED)
        ds = load_dataset(cfg.data, "train", cfg.model.name)
        clean_ds = ds.clean_twin() if corrupted else None  # fails here, before any pass
        weights = folder.weights(cfg)
        model = (model if model is not None else load_model(cfg, folder, ds.num_classes)).to(device)
        blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)
        layers: list = []  # the measured layers: forward order, a shared block's calls apart

        def measure(data, extra: dict | None = None) -> AnalysisResult:
            batches = make_batches(data, cfg.analyze.batch_size, device,
                                   shard=(proc.rank, proc.world))  # fmt: skip
            result = analyze(
                model, batches, ds.num_classes, blocks, split="train", amp=cfg.analyze.amp,
                progress=progress, run=cfg.run, extra=extra,
            )  # fmt: skip
            layers[:] = result.blocks
            numbered = number_blocks(
                model, result, cfg.model.pool, lambda: sample_inputs(data, device)
            )
            for row, number in zip(result, numbered, strict=True):
                row["layer"] = number["layer"]  # the block's position in forward order
            return result

        t0 = time.perf_counter()
        if corrupted:
            rows, ratios, info = _corrupted(measure, ds, clean_ds)
        else:
            rows, ratios, info = _label_noise(measure, ds, model, cfg)
        info.update(samples=len(ds), blocks=[b.name for b in layers], weights=weights,
                    memorization_layers=memorization_layers(ratios),
                    seconds=time.perf_counter() - t0)  # fmt: skip
        summary = folder.read_json(SUMMARY)  # read before any write: a damaged one stops here
        folder.save_measurement("memorization", cfg, ratios)
        folder.write_table(MEMORIZATION, ratios)
        folder.write_table(MEMORIZATION_LAYERS, rows)
        kind = "corrupted" if corrupted else "noisy"
        folder.draw(FIGURE, lambda path: plot_metric(
            ratios, "ratio", path, group=("run",),
            title=f"memorization ratio Δ = NC1(clean) / NC1({kind})"))  # fmt: skip
        folder.write_json(SUMMARY, {**summary, "memorization": info})
        folder.adopt(cfg)
        folder.mark_done("memorization", cfg, seconds=info["seconds"])
    return MemorizationResult(ratios, rows, info)


def _corrupted(measure, ds, clean_ds) -> tuple[Table, Table, dict]:
    passes = [measure(clean_ds, {"input": CLEAN_INPUT}), measure(ds, {"input": CORRUPTED_INPUT})]
    rows = Table(r for t in passes for r in t)
    info = {
        "kind": "corruption",
        "corruption": ds.meta["corruption"],
        "severity": ds.meta["corruption_severity"],
        "train_acc": {
            CLEAN_INPUT: passes[0].accuracy["clean"],
            CORRUPTED_INPUT: passes[1].accuracy["clean"],
        },
    }
    return rows, corruption_ratio(rows), info


def _label_noise(measure, ds, model, cfg) -> tuple[Table, Table, dict]:
    full = with_changed_views(ds)
    # NC1 needs every class in a view: with few changed samples, skip those views.
    complete = all(
        bool((torch.bincount(y[y >= 0], minlength=ds.num_classes) > 0).all())
        for v, y in full.labels.items()
        if v in (CHANGED_CLEAN, CHANGED_NOISY, UNCHANGED)
    )
    ds = full if complete else ds
    rows = measure(ds)
    acc = rows.accuracy
    if complete:  # the accuracy of a view counts only its samples (label != -1)
        memorized = acc[CHANGED_NOISY]
    else:
        memorized = memorized_fraction(model, ds, cfg.analyze.batch_size, cfg.analyze.amp)
        memorized = memorized["memorized"]
    info = {
        "kind": "label_noise",
        "changed_views": complete,
        "noise": cfg.data.noise,
        "noise_rate": ds.meta["noise_rate"],
        "changed": ds.meta["noise_changed"],
        "memorized": memorized,
        "train_acc": {v: acc[v] for v in ("clean", "noisy")},
    }
    return rows, memorization_ratio(rows), info


def memorization_from_csv(
    csv: str | Path, out: str | Path | None = None, **options
) -> tuple[Table, list[Path]]:
    """Δ per layer from a layers.csv's clean and noisy views (`memorization_ratio`'s
    options). Written beside it through the folder's store; in a run or sweep folder as
    memorization-from-layers.csv/.png, never over the memorization stage's own files."""
    csv = Path(csv)
    ratios = memorization_ratio(Table.from_csv(csv), **options)
    folder = RunFolder(Path(out) if out else csv.parent)
    stem = "memorization" if out or not _holds_results(folder) else "memorization-from-layers"
    written = [folder.write_table(f"{stem}.csv", ratios)]
    drawn = folder.draw(f"{stem}.png", lambda path: plot_metric(ratios, "ratio", path,
                                                               group=("run",)))  # fmt: skip
    return ratios, written + ([drawn] if drawn else [])


def _holds_results(folder: RunFolder) -> bool:
    """A run folder or a sweep's output folder (whose memorization.csv is a stage's)."""
    return any(folder.exists(n) for n in ("config.yaml", "stages.json", "sweep.json",
                                          "manifest.json"))  # fmt: skip


__all__ = ["FIGURE", "MemorizationResult", "memorization_applies", "memorization_from_csv",
           "memorization_job"]  # fmt: skip
