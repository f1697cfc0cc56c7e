"""The `nclayers probe` job: linear probes on every block of a run's model.

`probe_job(cfg, folder)` loads the training split (the heads learn its clean labels) and
the test split of `cfg.data`, the run's model with its weights, and runs
`nclayers.probing.probe` with the `cfg.probe` settings. It writes into the folder:

    probe.csv        per epoch and block: lr, training loss and accuracy
    probe_heads.pt   the heads (`heads_state`): re-evaluate with `load_heads` +
                     `score_heads`, or use the plain nn.Linear weights under "linear"
    probe_acc.png    probe accuracy against block index
    measurements/probe-<key>.csv   its `probe_acc` and `probe_lr` (the lr chosen on the
                     held-out rows) per block (split "test", view "clean") at these settings,
                     shown in layers.csv joined on block, with `probe_underfit` (probe
                     accuracy more than 2 points below the analysis' ncc_acc)
    summary.json     a "probe" entry: accuracy and chosen lr per block, the held-out
                     scores of every lr, the underfit note, mode, epochs, timings

After every epoch the heads and optimiser go to probe_state.pt; a probe that is
interrupted continues from its last finished epoch when started again with the same
weights and settings (a damaged probe_state.pt is only a cache: the probe starts over).
Under torchrun each rank probes its shard; only rank 0 writes.

Hugging Face models probe their data's pooled hidden states (text: `model.pool`, the mean
over real tokens by default; no augmentation, so "auto" caches the features once) or,
with `analyze.task=next_token`, every position whose next token is among the top_k
classes of the training split (stream mode).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from nclayers.config import Config
from nclayers.jobs.common import (
    check_causal,
    load_model,
    load_split,
    measure_setup,
    number_blocks,
    run_folder,
    sample_inputs,
)
from nclayers.jobs.folder import (
    MEASURED,
    PROBE,
    PROBE_HEADS,
    PROBE_STATE,
    STAGES,
    SUMMARY,
    RunFolder,
    measurement_file,
    measurement_key,
    stage_settings,
)
from nclayers.jobs.stages import PROBE_FIGURE
from nclayers.models import find_blocks
from nclayers.probing import ProbeResult, heads_state, probe, underfit_note
from nclayers.report.figures import plot_metric
from nclayers.runtime import barrier, setup_distributed, speed_switches
from nclayers.table import Table
from nclayers.train import is_convnet

PROBE_CACHE = "probe_cache"  # memory-mapped features beyond probe.cache_budget_gb
log = logging.getLogger("nclayers.probe")


def probe_job(
    cfg: Config,
    folder: RunFolder | str | Path,
    *,
    progress: bool = True,
    model: nn.Module | None = None,
) -> ProbeResult:
    """Probe every block of the run's model (or `model`) per `cfg.probe` and write the
    files above. Returns the probe table (one row per block with `probe_acc`)."""
    proc, device = setup_distributed(cfg.device)
    folder = run_folder(folder)
    try:
        with folder.lock():
            folder.check_run(cfg)
            folder.check_inputs(SUMMARY, STAGES, MEASURED)
            table = _probe(cfg, folder, model, device, progress and proc.main)
        barrier()
        return table
    finally:
        proc.close()


def _probe(cfg: Config, folder: RunFolder, model, device, progress: bool) -> ProbeResult:
    pc = cfg.probe
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    measure = measure_setup(cfg, train, test)
    weights = folder.weights(cfg)
    model = model if model is not None else load_model(cfg, folder, measure.num_classes)
    model = model.to(device)
    if measure.next_token is not None:
        check_causal(model, cfg)
    channels_last = pc.channels_last and speed_switches(device) and is_convnet(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    blocks = find_blocks(model, cfg.model.blocks, pool=measure.pool)

    # Resume only a probe of the same weights and settings.
    fingerprint = {"settings": stage_settings("probe", cfg), "weights": weights}
    state = None
    saved = folder.load_torch(PROBE_STATE, cache=True) if folder.exists(PROBE_STATE) else None
    if saved is not None and saved.get("fingerprint") == fingerprint:
        state = saved["state"]
        log.info("probe: resuming after epoch %d from %s", state["epoch"], PROBE_STATE)
    elif saved is not None:
        log.info("probe: %s is from other settings or weights; starting over", PROBE_STATE)

    def checkpoint(snapshot: dict) -> None:
        folder.save_torch(PROBE_STATE, {"state": snapshot, "fingerprint": fingerprint})
        last = snapshot["history"][-1]["epoch"]  # one row per layer (a shared block's calls apart)
        rows = [r for r in snapshot["history"] if r["epoch"] == last]
        accs = [r["train_acc"] for r in rows]
        log.info("probe epoch %2d/%d  train acc per block and lr %.3f..%.3f",
                 rows[0]["epoch"], pc.epochs, min(accs), max(accs))  # fmt: skip

    folder.forget("probe")
    settings = (
        pc if pc.cache_dir else pc.model_copy(update={"cache_dir": str(folder.file(PROBE_CACHE))})
    )
    table = probe(
        model, train, test, measure.num_classes, blocks, settings, state=state,
        on_epoch=checkpoint, progress=progress, next_token=measure.next_token,
    )  # fmt: skip
    for row in table:
        row["run"] = cfg.run
    rows = number_blocks(
        model, table, measure.pool, lambda: sample_inputs(test, device, channels_last)
    )
    _write(cfg, folder, table, rows, weights, len(train), device)
    return table


def _write(
    cfg: Config,
    folder: RunFolder,
    table: ProbeResult,
    rows: list,
    weights,
    train_samples,
    device,
) -> None:
    pc = cfg.probe
    summary = folder.read_json(SUMMARY)  # read before any write: a damaged one stops here
    history = Table({"run": cfg.run, **r} for r in table.history)
    folder.write_table(PROBE, history)  # the latest probe's; each one's kept beside its rows
    folder.write_table(measurement_file("probe", measurement_key("probe", cfg), "history"), history)
    # the heads: tensors, numbers and strings only (loads with weights_only=True)
    folder.save_torch(PROBE_HEADS, {**heads_state(table), "config": cfg.to_dict()})
    # n belongs to the analysis rows (its own sample count); the probe fills its columns.
    folder.save_measurement("probe", cfg, [{k: v for k, v in r.items() if k != "n"} for r in rows])
    # The analysis' NCC accuracy beside the probe's (same split, view and block) and the
    # underfit flag, as the layers view joins them once this measurement is recorded.
    record = {"key": measurement_key("probe", cfg), "weights": weights}
    view = folder.layers_at(stages={**folder.stages(), "probe": record})
    joined = {(r.get("view"), r.get("block")): r for r in view.where(split="test")}
    for row in table:
        found = joined.get((row.get("view"), row["block"]), {})
        row["ncc_acc"], row["probe_underfit"] = found.get("ncc_acc"), found.get("probe_underfit")
    folder.draw(PROBE_FIGURE, lambda path: plot_metric(table, "probe_acc", path, group=("run",)))
    entry = {
        "settings": stage_settings("probe", cfg),
        "weights": weights,
        "accuracy": {r["block"]: r["probe_acc"] for r in table},
        "lr": {r["block"]: r["probe_lr"] for r in table},
        "underfit": underfit_note(table),
        "held_out": list(table.selection),
        "mode": table.mode,
        "epochs": pc.epochs,
        "resumed_from_epoch": table.resumed_from,
        "train_samples": train_samples,
        "val_samples": table.val_samples,
        "test_samples": table[0]["n"],
        "seconds": table.seconds,
        "device": str(device),
    }
    folder.write_json(SUMMARY, {**summary, "probe": entry})
    folder.adopt(cfg)
    folder.remove(PROBE_STATE)  # before the stage is done: a kill never leaves it behind
    folder.mark_done("probe", cfg, seconds=table.seconds, mode=table.mode)


__all__ = ["PROBE_FIGURE", "probe_job"]
