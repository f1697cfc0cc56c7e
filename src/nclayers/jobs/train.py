"""The `nclayers train` job: a run folder around the training loop.

`train_run(cfg)` builds the data and model a config describes, runs `nclayers.train.fit`
and, between epochs, logs, tracks NC and checkpoints into `cfg.out`:

- checkpoints every `train.checkpoint_every` epochs and at the end, atomically;
- `resume=True` continues exactly from checkpoint.pt (model, optimiser, epoch, history,
  every rank's RNG state): on CPU the final weights equal an uninterrupted run's bit for bit;
- under torchrun every rank calls it; only rank 0 prints and writes files;
- `train.track_nc_every=N` measures NC1 and NC2 of every block on a fixed class-balanced
  test subset before training and every N epochs, into nc_dynamics.csv.

Files: config.yaml, train.log, checkpoint.pt, train_summary.json, nc_dynamics.csv,
tb/ (when tensorboard is installed); stages.json records "train" once all epochs ran.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nclayers.config import Config
from nclayers.data import DeviceBatches, balanced_subset, load_dataset
from nclayers.errors import NCLayersError
from nclayers.jobs.common import load_model
from nclayers.jobs.folder import (
    CHECKPOINT,
    DYNAMICS,
    TRAIN_LOG,
    TRAIN_SUMMARY,
    RunFolder,
)
from nclayers.memorization import memorized_fraction
from nclayers.models import find_blocks
from nclayers.runtime import setup_distributed
from nclayers.table import Table
from nclayers.train import (
    EVAL_BATCH,
    check_recipe,
    fit,
    gather_rng_states,
    is_convnet,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    track_nc,
    train_labels_view,
)


def train_run(
    cfg: Config,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train per `cfg` into `cfg.out`; returns the summary (also in train_summary.json)
    with the trained (unwrapped) model under "model".

    resume: continue from `cfg.out/checkpoint.pt` exactly. stop_after: stop after this
    many epochs in total (tests, time-boxed runs); the checkpoint then allows `resume`.
    """
    proc, device = setup_distributed(cfg.device)
    try:
        return _train(cfg, RunFolder(cfg.out), proc, device, resume, stop_after, progress)
    finally:
        if proc.owned:
            dist.destroy_process_group()


def _train(cfg, folder, proc, device, resume, stop_after, progress) -> dict:
    tc = cfg.train
    progress = progress and proc.main
    check_recipe(tc, proc.world)
    if proc.main:
        folder.mkdir()
    seed_everything(tc.seed)  # the same on every rank: DDP starts from equal weights anyway

    train_ds = load_dataset(cfg.data, "train")
    test_ds = load_dataset(cfg.data, "test")
    num_classes = train_ds.num_classes
    model = load_model(cfg, num_classes).to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:  # fixed input shapes: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True
    channels_last = tc.channels_last and on_cuda and is_convnet(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, tc)
    view = train_labels_view(train_ds)
    rank_batch = tc.batch_size // proc.world
    shard = (proc.rank, proc.world)
    train_batches = DeviceBatches(
        train_ds, rank_batch, device, train=tc.augment, shuffle=True, seed=tc.seed,
        views=[view], shard=shard, channels_last=channels_last,
    )  # fmt: skip
    test_batches = DeviceBatches(
        test_ds, EVAL_BATCH, device, views=["clean"], shard=shard, channels_last=channels_last
    )
    tracker = None
    if tc.track_nc_every:
        keep = balanced_subset(test_ds.labels["clean"], tc.track_nc_samples, num_classes, tc.seed)
        batches = DeviceBatches(
            test_ds.subset(keep), EVAL_BATCH, device, views=["clean"], shard=shard,
            channels_last=channels_last,
        )  # fmt: skip
        blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)

        def tracker(epoch: int, board) -> None:
            table = track_nc(model, blocks, batches, num_classes, tc.amp, run=cfg.run, epoch=epoch)
            if proc.main:
                path = folder.file(DYNAMICS)
                Table([*(Table.from_csv(path) if path.is_file() else ()), *table]).to_csv(path)
                if board is not None:
                    for row in table:
                        board.add_scalar(f"nc1/layer{row['layer']:02d}", row["nc1"], epoch)
                        board.add_scalar(f"nc2/layer{row['layer']:02d}", row["nc2"], epoch)

    start_epoch, history = 0, []
    if resume:
        if not folder.exists(CHECKPOINT):
            raise NCLayersError(
                f"--resume: no {CHECKPOINT} in {str(folder.path)!r}; start without --resume"
            )
        state = load_checkpoint(folder.file(CHECKPOINT))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        states = state["rng"]
        set_rng_state(states[proc.rank] if len(states) == proc.world else states[0])
        if proc.main:
            _trim_dynamics(folder.file(DYNAMICS), start_epoch)
    elif proc.main:
        folder.file(DYNAMICS).unlink(missing_ok=True)
    if proc.main:  # on resume too: e.g. train.epochs may have grown
        folder.save_config(cfg)
        folder.forget("train")

    train_model: nn.Module = model
    if proc.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if on_cuda else None
        )
    if tc.compile and on_cuda:
        # Static shapes: train_epoch runs the epoch's last, smaller batch eagerly, so one
        # graph serves every step (a dynamic-shape recompile made compiled runs slower).
        train_model = torch.compile(train_model, dynamic=False)

    end_epoch = tc.epochs if stop_after is None else min(tc.epochs, stop_after)
    log = open(folder.file(TRAIN_LOG), "a" if resume else "w") if proc.main else None
    board = _tensorboard(folder, tc.tensorboard and proc.main, start_epoch + 1 if resume else None)
    say = _printer(log, progress)
    say(
        f"{cfg.model.name} on {cfg.data.name} ({len(train_ds)} train / {len(test_ds)} test), "
        f"{device}, {proc.world} process(es), per-process batch {rank_batch} "
        f"(train.batch_size={tc.batch_size} // {proc.world}), epochs {start_epoch + 1}.."
        f"{end_epoch} of {tc.epochs}"
    )
    t0 = time.perf_counter()
    try:
        if tracker is not None and not resume:
            tracker(0, board)
        epochs = range(start_epoch, end_epoch)
        for record in fit(
            model, optimizer, train_batches, test_batches, tc, epochs, proc, train_model,
            progress,
        ):  # fmt: skip
            epoch = record["epoch"]
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            eta = record["seconds"] / (epoch - start_epoch) * (end_epoch - epoch)
            say(
                f"epoch {epoch:>3}/{tc.epochs}  loss {record['train_loss']:.4f}  "
                f"train {record['train_acc']:.4f}  test {record['test_acc']:.4f}  "
                f"lr {record['lr']:.3g}  {record['img_per_s']:.0f} img/s  "
                f"{record['epoch_seconds']:.1f} s  eta {_duration(eta)}"
            )
            if board is not None:
                for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "img_per_s"):
                    board.add_scalar(key, record[key], epoch)
            if tracker is not None and (epoch % tc.track_nc_every == 0 or epoch == tc.epochs):
                tracker(epoch, board)
            if epoch == end_epoch or (tc.checkpoint_every and epoch % tc.checkpoint_every == 0):
                states = gather_rng_states(proc)  # every rank takes part
                if proc.main:
                    save_checkpoint(
                        folder.file(CHECKPOINT),
                        model=model.state_dict(),
                        optimizer=optimizer.state_dict(),
                        epoch=epoch,
                        history=history,
                        rng=states,
                        world=proc.world,
                        config=cfg.to_dict(),
                    )
    finally:
        if log is not None:
            log.close()
        if board is not None:
            board.close()

    summary = {
        "config": cfg.to_dict(),
        "epochs_done": len(history),
        "train_labels": view,
        "final": history[-1] if history else None,
        "best_test_acc": max((h["test_acc"] for h in history), default=None),
        "train_seconds": time.perf_counter() - t0,
        "device": str(device),
        "world_size": proc.world,
        "per_process_batch": rank_batch,
        "history": history,
    }
    if proc.main and "noisy" in train_ds.labels:
        # Whether the model fitted its noisy labels decides whether Δ can be judged at all.
        meta = train_ds.meta
        summary["label_noise"] = {
            "source": meta.get("noise_source"),
            "changed": meta.get("noise_changed"),
            "rate": meta.get("noise_rate"),
            **memorized_fraction(model, train_ds, amp=tc.amp),
        }
        if progress:
            noise = summary["label_noise"]
            rate, fitted = noise["rate"], noise["memorized"]
            print(f"{rate:.2%} of the training labels changed; the model fits {fitted:.2%} of them")
    if proc.main:
        folder.write_json(TRAIN_SUMMARY, summary)
        if len(history) == tc.epochs:
            folder.mark_done("train", epochs=tc.epochs, test_acc=summary["final"]["test_acc"])
    summary["model"] = model
    return summary


def _trim_dynamics(path: Path, epoch: int) -> None:
    """Drop rows measured after the checkpoint's epoch: the resumed run measures them
    again (a crash between measuring and checkpointing would otherwise leave twins)."""
    if not path.is_file():
        return
    rows = Table(
        r for r in Table.from_csv(path) if r.get("epoch") is not None and r["epoch"] <= epoch
    )
    if rows:
        rows.to_csv(path)
    else:
        path.unlink()


def _tensorboard(folder: RunFolder, enabled: bool, purge_step: int | None):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (pip install nclayers[tensorboard])
        return None
    return SummaryWriter(str(folder.file("tb")), purge_step=purge_step)


def _printer(log, progress: bool):
    def say(line: str) -> None:
        if log is not None:
            print(line, file=log, flush=True)
        if progress:
            print(line, flush=True)

    return say


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
