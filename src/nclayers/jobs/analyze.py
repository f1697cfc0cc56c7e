"""The `nclayers analyze` job: measure every block of a run's model on its data splits.

It first measures the reference split (train by default, every labels view of it: clean,
and noisy under label noise), whose clean class means define the NCC accuracy, then the
measured split (test). Rows go into the run folder's layers.csv (merged with what other
stages wrote there, e.g. probe_acc); accuracies and timings into summary.json.
"""

from __future__ import annotations

import time

from torch import nn

from nclayers.analysis import analyze
from nclayers.config import Config
from nclayers.data import DeviceBatches, load_dataset
from nclayers.jobs.common import load_model
from nclayers.jobs.folder import SUMMARY, RunFolder
from nclayers.models import find_blocks
from nclayers.runtime import resolve_device
from nclayers.table import Table


def analyze_run(cfg: Config, model: nn.Module | None = None, progress: bool = True) -> Table:
    """Measure `cfg.analyze.split` (and the reference split) of the configured data set
    with `model` (default: the configured model, with the run folder's checkpoint), and
    write layers.csv and summary.json to `cfg.out`."""
    ac = cfg.analyze
    folder = RunFolder(cfg.out).mkdir()
    device = resolve_device(cfg.device)
    splits = [ac.split]
    if ac.reference and ac.reference != ac.split:
        splits.insert(0, ac.reference)
    data = {s: load_dataset(cfg.data, s) for s in splits}
    num_classes = data[ac.split].num_classes
    if model is None:
        model = load_model(cfg, num_classes, folder)
    model = model.to(device)
    blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)

    t0 = time.perf_counter()
    tables: dict[str, Table] = {}
    for s in splits:
        batches = DeviceBatches(data[s], ac.batch_size, device)
        ref = tables.get(ac.reference) if s == ac.split else None
        if s == ac.split and ac.reference == ac.split:
            # NCC needs the class means before the pass that classifies: a first pass.
            ref = analyze(model, batches, num_classes, blocks, split=s, progress=progress)
        tables[s] = analyze(
            model, batches, num_classes, blocks, reference=ref, split=s,
            classic_nc1=ac.classic_nc1, amp=cfg.train.amp, progress=progress, run=cfg.run,
        )  # fmt: skip
    table = Table(row for s in splits for row in tables[s])
    folder.upsert_layers(table)
    folder.save_config(cfg)
    summary = {
        "config": cfg.to_dict(),
        "blocks": [b.name for b in blocks],
        "accuracy": {s: tables[s].accuracy for s in splits},
        "samples": {s: tables[s].samples for s in splits},
        "seconds": {s: tables[s].seconds for s in splits},
        "device": str(device),
    }
    folder.update_json(SUMMARY, **summary)
    folder.mark_done("analyze", seconds=time.perf_counter() - t0)
    table.meta.update(summary)
    return table
