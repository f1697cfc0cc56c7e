"""The `nclayers analyze` job: measure every block of a run's model on its data splits.

It measures the reference split (train by default, every labels view of it: clean, and
noisy under label noise; or its class-balanced `analyze.reference_subset`), whose clean
class means define the NCC accuracy, then the measured split (test), both under the same
`analyze.amp`. The rows are kept as the measurement at these settings
(measurements/analyze-<key>.csv, replacing one made with the same settings) and shown in
layers.csv joined on block with the other stages'; an "analyze" entry goes into summary.json;
stages.json records the weights and settings measured. A run without trained weights is
refused (see `RunFolder.weights`). Under torchrun each rank measures its shard of each
split, the statistics are reduced exactly, rank 0 writes and the other ranks wait for it.

Text data sets (data.name=hf:...) are tokenised with the model's tokenizer; a sequence
classifier's layers pool `model.pool` (mean over the real tokens by default). With
`analyze.task=next_token` (causal language models) every position of every layer is a
sample whose class is the token after it, among the `analyze.top_k` most frequent next
tokens of the reference split (else of the measured one), shared by both splits; the
model's accuracy is its next-token accuracy on the kept positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nclayers.analysis import AnalysisResult, analyze
from nclayers.config import Config
from nclayers.data import balanced_subset, make_batches
from nclayers.errors import NCLayersError
from nclayers.jobs.common import (
    check_causal,
    load_model,
    load_split,
    measure_setup,
    number_blocks,
    run_folder,
    sample_inputs,
)
from nclayers.jobs.folder import MEASURED, STAGES, SUMMARY, RunFolder, stage_settings
from nclayers.models import find_blocks
from nclayers.runtime import barrier, setup_distributed, speed_switches
from nclayers.table import Table
from nclayers.train import is_convnet


@dataclass
class AnalyzeResult:
    """What `analyze_job` returns: the rows it wrote into layers.csv, each split's
    `AnalysisResult` (statistics, accuracies), and its summary.json entry."""

    table: Table
    splits: dict[str, AnalysisResult]
    summary: dict


def analyze_job(
    cfg: Config,
    folder: RunFolder | str | Path,
    *,
    progress: bool = True,
    model: nn.Module | None = None,
) -> AnalyzeResult:
    """Measure `cfg.analyze.split` (and the reference split) with the run's model (or
    `model`, already holding the run's weights) and write the results into `folder`."""
    proc, device = setup_distributed(cfg.device)  # under torchrun: this rank's shard
    folder = run_folder(folder)
    try:
        result = _analyze(cfg, folder, model, proc, device, progress and proc.main)
        barrier()  # the other ranks return once rank 0 has written
    finally:
        proc.close()
    return result


def _analyze(cfg: Config, folder: RunFolder, model, proc, device, progress: bool) -> AnalyzeResult:
    with folder.lock():
        ac = cfg.analyze
        splits = [s for s in dict.fromkeys([ac.reference, ac.split]) if s]
        data = {s: load_split(cfg, s) for s in splits}
        measure = measure_setup(cfg, data[ac.reference or ac.split], data[ac.split])
        num_classes = measure.num_classes
        folder.check_run(cfg)  # before any work: another run's folder, no weights
        folder.check_inputs(SUMMARY, STAGES, MEASURED)
        weights = folder.weights(cfg)
        model = (model if model is not None else load_model(cfg, folder, num_classes)).to(device)
        if measure.next_token is not None:
            check_causal(model, cfg)
        blocks = find_blocks(model, cfg.model.blocks, pool=measure.pool)
        channels_last = ac.channels_last and speed_switches(device) and is_convnet(model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)

        ref_data = reference_set(cfg, data.get(ac.reference))

        def batches(ds):
            return make_batches(ds, ac.batch_size, device, channels_last=channels_last,
                                next_token=measure.next_token,
                                shard=(proc.rank, proc.world))  # fmt: skip

        tables: dict[str, AnalysisResult] = {}
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
        rows = (row for s in splits for row in tables[s])
        table = Table(
            number_blocks(
                model,
                rows,
                measure.pool,
                lambda: sample_inputs(data[ac.split], device, channels_last),
            )
        )
        entry = {
            "settings": stage_settings("analyze", cfg),
            "weights": weights,
            "blocks": [b.name for b in tables[ac.split].blocks],  # forward order, per call
            "task": ac.task,
            "accuracy": {s: tables[s].accuracy for s in splits},
            "samples": {s: tables[s].samples for s in splits},
            "seconds": {s: tables[s].seconds for s in splits},
            "device": str(device),
        }
        if measure.next_token is not None:  # the classes: vocabulary ids, most frequent first
            entry["next_token_classes"] = measure.next_token.tokens.tolist()
        summary = folder.read_json(SUMMARY)  # read before any write: a damaged one stops here
        folder.save_measurement("analyze", cfg, table)
        folder.write_json(SUMMARY, {**summary, "analyze": entry})
        folder.adopt(cfg)  # the run's config.yaml, once the stage succeeded
        folder.mark_done("analyze", cfg, seconds=time.perf_counter() - t0)
    return AnalyzeResult(table, tables, entry)


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


__all__ = ["AnalyzeResult", "analyze_job", "reference_set"]
