"""The `nclayers analyze` job: measure every block of a run's model on its data splits.

It measures the reference split (train by default, every labels view of it: clean, and
noisy under label noise; or its class-balanced `analyze.reference_subset`), whose clean
class means define the NCC accuracy, then the measured split (test), both under the same
`analyze.amp`. The rows replace the analyze
columns of the folder's layers.csv (other stages' columns, e.g. probe_acc, stay); an
"analyze" entry goes into summary.json; stages.json records the weights and settings
measured. A run without trained weights is refused (see `RunFolder.weights`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from nclayers.analysis import analyze
from nclayers.config import Config
from nclayers.data import balanced_subset, load_dataset, make_batches
from nclayers.errors import NCLayersError
from nclayers.jobs.common import load_model, run_folder
from nclayers.jobs.folder import SUMMARY, RunFolder, stage_settings
from nclayers.models import find_blocks
from nclayers.runtime import barrier, resolve_device
from nclayers.table import Table
from nclayers.train import is_convnet


def analyze_job(
    cfg: Config,
    folder: RunFolder | str | Path,
    *,
    progress: bool = True,
    model: nn.Module | None = None,
) -> Table:
    """Measure `cfg.analyze.split` (and the reference split) with the run's model (or
    `model`, already holding the run's weights) and write the results into `folder`."""
    folder = run_folder(folder)
    with folder.lock():
        ac = cfg.analyze
        splits = [s for s in dict.fromkeys([ac.reference, ac.split]) if s]
        data = {s: load_dataset(cfg.data, s) for s in splits}
        num_classes = data[ac.split].num_classes
        device = resolve_device(cfg.device)
        folder.check_run(cfg)  # before any work: another run's folder, no weights
        weights = folder.weights(cfg)
        model = (model or load_model(cfg, folder, num_classes)).to(device)
        blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)
        channels_last = ac.channels_last and device.type == "cuda" and is_convnet(model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)

        ref_data = reference_set(cfg, data.get(ac.reference))

        def batches(ds):
            return make_batches(ds, ac.batch_size, device, channels_last=channels_last)

        tables: dict[str, Table] = {}
        t0 = time.perf_counter()
        for s in splits:
            ref = tables.get(ac.reference) if s == ac.split else None
            if s == ac.split and ac.reference == ac.split:
                # NCC needs the class means before the pass that classifies: a first pass,
                # under the same autocast as the measured one.
                ref = analyze(model, batches(ref_data), num_classes, blocks, split=s,
                              amp=ac.amp, progress=progress)  # fmt: skip
            ds = ref_data if s == ac.reference and s != ac.split else data[s]
            tables[s] = analyze(
                model, batches(ds), num_classes, blocks, reference=ref, split=s,
                classic_nc1=ac.classic_nc1, amp=ac.amp, progress=progress, run=cfg.run,
            )  # fmt: skip
        table = Table(row for s in splits for row in tables[s])
        entry = {
            "settings": stage_settings("analyze", cfg),
            "weights": weights,
            "blocks": [b.name for b in blocks],
            "accuracy": {s: tables[s].meta["accuracy"] for s in splits},
            "samples": {s: tables[s].meta["samples"] for s in splits},
            "seconds": {s: tables[s].meta["seconds"] for s in splits},
            "device": str(device),
        }
        folder.merge_layers("analyze", table)
        folder.write_json(SUMMARY, {**folder.read_json(SUMMARY), "analyze": entry})
        folder.adopt(cfg)  # the run's config.yaml, once the stage succeeded
        folder.mark_done("analyze", cfg, seconds=time.perf_counter() - t0)
    barrier()  # the other ranks return once rank 0 has written
    table.meta.update(entry)
    return table


def reference_set(cfg: Config, ds):
    """The reference split's samples whose class means define NCC: all of them, or the
    class-balanced `analyze.reference_subset` (seeded by `data.subset_seed`)."""
    size = cfg.analyze.reference_subset
    if ds is None or size is None or size >= len(ds):
        return ds
    if size < ds.num_classes:
        raise NCLayersError(
            f"analyze.reference_subset={size}: fewer samples than the {ds.num_classes} classes; "
            f"every class needs its mean (e.g. {100 * ds.num_classes}: 100 per class), or null "
            "for the whole reference split"
        )
    return ds.subset(balanced_subset(ds.labels["clean"], size, ds.num_classes,
                                     cfg.data.subset_seed))  # fmt: skip


__all__ = ["analyze_job", "reference_set"]
