"""The `nclayers probe` job: linear probes on every block of a run's model.

`probe_run(cfg)` loads the training split (the heads learn its clean labels) and the test
split of `cfg.data`, the model of `cfg.model` with the run folder's checkpoint, and runs
`nclayers.probing.probe` with the `cfg.probe` settings. It writes into the run folder:

    probe.csv        per epoch and block: lr, training loss and accuracy
    probe_heads.pt   the heads (`heads_state`): re-evaluate with `load_heads` +
                     `evaluate_heads`, or use the plain nn.Linear weights under "linear"
    probe_acc.png    probe accuracy against block index
    layers.csv       `probe_acc` filled into the rows of an earlier analysis of the same
                     run (split "test", view "clean"), or new rows when there are none
    summary.json     a "probe" entry: accuracy per block, mode, epochs, timings
    stages.json      "probe" once it finished

After every epoch the heads and optimiser go to probe_state.pt; a run that is
interrupted continues from its last finished epoch when started again with the same
settings (the file is removed once the probe finished). Under torchrun each rank probes
its shard; only rank 0 writes.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn

from nclayers.config import Config
from nclayers.data import load_dataset
from nclayers.jobs.common import load_model
from nclayers.jobs.folder import PROBE, PROBE_HEADS, SUMMARY, RunFolder
from nclayers.models import find_blocks
from nclayers.probing import heads_state, probe
from nclayers.report.figures import plot_metric
from nclayers.runtime import setup_distributed
from nclayers.table import Table
from nclayers.train import is_convnet, load_checkpoint, save_checkpoint

PROBE_STATE = "probe_state.pt"
PROBE_FIGURE = "probe_acc.png"
PROBE_CACHE = "probe_cache"  # memory-mapped features beyond probe.cache_budget_gb


def probe_run(cfg: Config, model: nn.Module | None = None, progress: bool = True) -> Table:
    """Probe every block of `model` (default: the configured model with the run folder's
    checkpoint) per `cfg.probe`; write the files above to `cfg.out`. Returns the probe
    Table (one row per block with `probe_acc`; `.history`, `.heads` as from `probe`)."""
    proc, device = setup_distributed(cfg.device)
    try:
        return _probe_run(cfg, model, progress and proc.main, proc, device)
    finally:
        if proc.owned:
            dist.destroy_process_group()


def _probe_run(cfg, model, progress, proc, device) -> Table:
    pc = cfg.probe
    folder = RunFolder(cfg.out)
    if proc.main:
        folder.mkdir()
    train = load_dataset(cfg.data, "train")
    test = load_dataset(cfg.data, "test")
    num_classes = test.num_classes
    if model is None:
        model = load_model(cfg, num_classes, folder)
    model = model.to(device)
    channels_last = cfg.train.channels_last and device.type == "cuda" and is_convnet(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)

    # Resume only a probe of the same model, data and settings.
    fingerprint = {
        "probe": asdict(pc),
        "data": asdict(cfg.data),
        "model": asdict(cfg.model),
        "weights": float(sum(p.detach().double().sum() for p in model.parameters())),
    }
    state = None
    if folder.exists(PROBE_STATE):
        saved = load_checkpoint(folder.file(PROBE_STATE))
        if saved.get("fingerprint") == fingerprint:
            state = saved["state"]
            if progress:
                print(f"probe: resuming after epoch {state['epoch']} from {PROBE_STATE}")
        elif progress:
            print(f"probe: {PROBE_STATE} is from other settings or weights; starting over")

    def checkpoint(snapshot: dict) -> None:
        if proc.main:
            save_checkpoint(folder.file(PROBE_STATE), state=snapshot, fingerprint=fingerprint)
        if progress:
            rows = snapshot["history"][-len(blocks) :]
            accs = [r["train_acc"] for r in rows]
            print(
                f"probe epoch {rows[0]['epoch']:>2}/{pc.epochs}  lr {rows[0]['lr']:.3g}  "
                f"train acc per block {min(accs):.3f}..{max(accs):.3f}"
            )

    if proc.main:
        folder.save_config(cfg)
        folder.forget("probe")
    table = probe(
        model, train, test, num_classes, blocks,
        epochs=pc.epochs, lr=pc.lr, momentum=pc.momentum, weight_decay=pc.weight_decay,
        milestones=tuple(pc.milestones), gamma=pc.gamma, batch_size=pc.batch_size,
        augment=pc.augment, standardize=pc.standardize, mode=pc.mode,
        cache_budget_gb=pc.cache_budget_gb, cache_dir=folder.file(PROBE_CACHE),
        eval_batch_size=pc.eval_batch_size, view="clean", seed=pc.seed, amp=cfg.train.amp,
        channels_last=channels_last, state=state, on_epoch=checkpoint, progress=progress,
        run=cfg.run,
    )  # fmt: skip
    if not proc.main:
        return table

    history = Table({"run": cfg.run, **r} for r in table.history)
    history.to_csv(folder.file(PROBE))
    torch.save(
        {**heads_state(table), "config": cfg.to_dict()}, folder.file(PROBE_HEADS)
    )  # the heads: tensors, numbers and strings only (loads with weights_only=True)
    # n belongs to the analysis rows (its own sample count); the probe fills its column.
    folder.upsert_layers([{k: v for k, v in r.items() if k != "n"} for r in table])
    plot_metric(table, "probe_acc", folder.file(PROBE_FIGURE), group=("run",))
    summary = {
        "accuracy": {r["block"]: r["probe_acc"] for r in table},
        "mode": table.mode,
        "epochs": pc.epochs,
        "resumed_from_epoch": table.resumed_from,
        "train_samples": len(train),
        "test_samples": table[0]["n"],
        "world_size": proc.world,
        "seconds": table.seconds,
        "device": str(device),
    }
    folder.update_json(SUMMARY, probe=summary)
    folder.mark_done("probe", seconds=table.seconds, mode=table.mode)
    folder.file(PROBE_STATE).unlink(missing_ok=True)
    return table


__all__ = ["PROBE_FIGURE", "PROBE_STATE", "probe_run"]
