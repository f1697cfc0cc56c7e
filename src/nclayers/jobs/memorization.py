"""The `nclayers memorization RUN` job: memorization ratio per block of a trained run.

It measures the run's training split (the images the model was trained on) with its
trained model:

- label noise (`data.noise`): one pass with the views clean, noisy, changed_clean,
  changed_noisy and unchanged; Delta = nc1(clean) / nc1(noisy), and the same ratio on the
  changed samples alone; the memorized fraction (train accuracy of the changed samples
  under their training labels) from the same pass. When some class has no changed (or
  no unchanged) sample, NC1 of those views is undefined: they are left out
  (summary: changed_views false) and the memorized fraction takes a pass of its own;
- corrupted inputs (`data.corruption`): two passes, the clean images and the corrupted
  images (column input = clean / corrupted), true labels; Delta = nc1(clean) /
  nc1(corrupted).

Writes memorization.csv (per block both NC1 values, Delta, memorizing), memorization.png
(the line at 1), the rows into layers.csv, and a "memorization" entry in summary.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from nclayers.analysis import AnalysisResult, analyze
from nclayers.data import (
    CHANGED_CLEAN,
    CHANGED_NOISY,
    UNCHANGED,
    DeviceBatches,
    has_label_noise,
    load_dataset,
    with_changed_views,
)
from nclayers.errors import NCLayersError
from nclayers.jobs.common import load_model
from nclayers.jobs.folder import MEMORIZATION, SUMMARY, RunFolder
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
from nclayers.runtime import resolve_device
from nclayers.table import Table

FIGURE = "memorization.png"


def memorization_run(
    run: str | Path | RunFolder,
    overrides: list[str] | tuple[str, ...] = (),
    model: nn.Module | None = None,
    progress: bool = True,
) -> Table:
    """Measure the memorization ratio of the run in folder `run` (see the module doc).

    overrides: key=value changes to the run's saved config (e.g. device=cpu).
    model: the trained model (default: the run's model with its checkpoint.pt).
    Returns the per-block ratios; `table.meta` holds the summary entry.
    """
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    cfg = folder.load_config(list(overrides))
    corrupted = bool(cfg.data.corruption)
    noisy = has_label_noise(cfg.data.noise)
    if not corrupted and not noisy:
        raise NCLayersError(
            f"run {str(folder.path)!r} was trained without label noise (data.noise) or "
            "corrupted inputs (data.corruption): there is nothing to compare"
        )
    if corrupted and noisy:
        raise NCLayersError(
            f"run {str(folder.path)!r} has both data.noise and data.corruption; the "
            "memorization ratio compares one kind of noise at a time"
        )
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data, "train")
    if corrupted:
        clean_ds = ds.clean_twin()  # fails here, before any pass, when it is missing
    device = resolve_device(cfg.device)
    if model is None:
        if not folder.exists("checkpoint.pt") and not cfg.model.checkpoint:
            raise NCLayersError(
                f"run {str(folder.path)!r} has no checkpoint.pt; train it first "
                f"(nclayers train {folder.path / 'config.yaml'})"
            )
        model = load_model(cfg, ds.num_classes, folder)
    model = model.to(device)
    blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)

    def measure(data, extra: dict | None = None) -> AnalysisResult:
        batches = DeviceBatches(data, cfg.analyze.batch_size, device)
        return analyze(
            model, batches, ds.num_classes, blocks, split="train", amp=cfg.train.amp,
            progress=progress, run=cfg.run, extra=extra,
        )  # fmt: skip

    info: dict = {"samples": len(ds), "blocks": [b.name for b in blocks]}
    if corrupted:
        passes = [
            measure(clean_ds, {"input": CLEAN_INPUT}),
            measure(ds, {"input": CORRUPTED_INPUT}),
        ]
        rows = Table(r for t in passes for r in t)
        ratios = corruption_ratio(rows)
        info.update(
            kind="corruption",
            corruption=ds.meta["corruption"],
            severity=ds.meta["corruption_severity"],
            train_acc={
                CLEAN_INPUT: passes[0].accuracy["clean"],
                CORRUPTED_INPUT: passes[1].accuracy["clean"],
            },
        )
    else:
        full = with_changed_views(ds)
        # NC1 needs every class in a view: with few changed samples, skip those views.
        complete = all(
            bool((torch.bincount(y[y >= 0], minlength=ds.num_classes) > 0).all())
            for v, y in full.labels.items()
            if v in (CHANGED_CLEAN, CHANGED_NOISY, UNCHANGED)
        )
        info["changed_views"] = complete
        ds = full if complete else ds
        rows = measure(ds)
        ratios = memorization_ratio(rows)
        acc = rows.accuracy
        changed = ds.meta["noise_changed"]
        if complete:  # the accuracy of a view counts only its samples (label != -1)
            memorized = acc[CHANGED_NOISY]
        else:
            memorized = memorized_fraction(model, ds, cfg.analyze.batch_size, cfg.train.amp)
            memorized = memorized["memorized"]
        info.update(
            kind="label_noise",
            noise=cfg.data.noise,
            noise_rate=ds.meta["noise_rate"],
            changed=changed,
            memorized=memorized,
            train_acc={v: acc[v] for v in ("clean", "noisy")},
        )
    info["memorization_layers"] = memorization_layers(ratios)
    info["seconds"] = time.perf_counter() - t0

    ratios.to_csv(folder.file(MEMORIZATION))
    plot_metric(ratios, "ratio", folder.file(FIGURE), group=("run",),
                title="memorization ratio Δ = NC1(clean) / NC1(" +
                ("corrupted" if corrupted else "noisy") + ")")  # fmt: skip
    folder.upsert_layers(rows)
    folder.update_json(SUMMARY, memorization=info)
    folder.mark_done("memorization", seconds=info["seconds"])
    ratios.meta.update(info)
    return ratios
