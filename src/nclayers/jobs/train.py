"""The `nclayers train` job: a run folder around the training loop.

`train_job(cfg, folder)` builds the data and model `cfg` describes, runs
`nclayers.train.fit` and, between epochs, logs, tracks NC and checkpoints into `folder`:

- a folder that already holds a run is never retrained silently: `resume=True`
  continues it exactly (model, optimiser, epoch, history, every rank's RNG state; on CPU
  the final weights equal an uninterrupted run's bit for bit), `force=True` starts over,
  and `resume=None` (the sweep's way) continues an interrupted run of the same settings;
- checkpoints every `train.checkpoint_every` epochs and at the end, atomically;
- training that diverges (a non-finite loss, checked once per epoch) stops with an error
  and leaves the last good checkpoint; the stage is not marked done;
- under torchrun every rank calls it; only rank 0 writes;
- `train.track_nc_every=N` measures NC1 and NC2 of every block on a fixed class-balanced
  test subset before training and every N epochs, into nc_dynamics.csv;
- Hugging Face models (model.name=hf:...) train the same way on their data
  (data.name=hf:...): a sequence or image classifier is fine-tuned on its labels (from
  its pretrained weights, or from scratch with model.options.init=config), a causal
  language model learns the next token of its text (`lm.lm_loss`; from scratch when
  model.name is a folder holding only a config.json), its test metric the perplexity
  (`test_perplexity` in each epoch's record).

Files: config.yaml, train.log, checkpoint.pt, train_summary.json, nc_dynamics.csv,
tb/ (when tensorboard is installed); stages.json records "train" with the weights'
checksum once all epochs ran, so the stages measured on older weights are out of date.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nclayers.config import Config, weights_settings
from nclayers.data import TextData, balanced_subset, make_batches
from nclayers.errors import NCLayersError
from nclayers.jobs.common import (
    build_from_config,
    check_classifier,
    load_model,
    load_split,
    run_folder,
)
from nclayers.jobs.folder import (
    CHECKPOINT,
    DYNAMICS,
    STAGES,
    TRAIN_LOG,
    TRAIN_SUMMARY,
    RunFolder,
)
from nclayers.memorization import memorized_fraction
from nclayers.models import find_blocks
from nclayers.models.hf import config_only, is_causal_lm
from nclayers.runtime import (
    Distributed,
    barrier,
    cudnn_benchmark,
    seeded,
    setup_distributed,
    speed_switches,
)
from nclayers.table import Table
from nclayers.train import (
    EVAL_BATCH,
    fit,
    gather_rng_states,
    is_convnet,
    make_optimizer,
    set_rng_state,
    track_nc,
    train_labels_view,
)

log = logging.getLogger("nclayers.train")


@dataclass
class TrainResult:
    """What `train_job` returns: the summary (also in train_summary.json) and the model."""

    summary: dict
    model: nn.Module


@dataclass
class _Start:
    epoch: int = 0
    history: list | None = None
    state: dict | None = None  # the checkpoint resumed from


def train_job(
    cfg: Config,
    folder: RunFolder | str | Path,
    *,
    progress: bool = True,
    resume: bool | None = None,
    force: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train per `cfg` into `folder` (see the module doc for resume/force).

    stop_after: stop after this many epochs in total (tests, time-boxed runs); the
    checkpoint then allows a resume.
    """
    proc, device = setup_distributed(cfg.device)
    folder = run_folder(folder)
    try:
        # CUDA only: cuDNN's autotuner.
        with folder.lock(), seeded(cfg.train.seed), cudnn_benchmark(device.type == "cuda"):
            start = _start(cfg, folder, resume, force)
            result = _train(cfg, folder, proc, device, start, stop_after, progress and proc.main)
        barrier()  # the other ranks return once rank 0 has written the summary
        return result
    finally:
        proc.close()


# Train keys a resumed run cannot change: its checkpoint holds their state.
KEPT_ON_RESUME = ("train.optimizer", "train.seed")


def _start(cfg: Config, folder: RunFolder, resume: bool | None, force: bool) -> _Start:
    """Where training starts: a new run, or the folder's checkpoint. Refuses to overwrite
    a run unless asked (force), and to resume one with other data or model settings."""
    folder.check_inputs(STAGES)  # read after config.yaml is written: refuse before
    if force or not folder.exists(CHECKPOINT):
        if resume:
            raise NCLayersError(
                f"--resume: no {CHECKPOINT} in {str(folder.path)!r}; start without --resume"
            )
        return _Start()
    state = folder.load_torch(CHECKPOINT)
    folder.check_inputs(DYNAMICS)  # trimmed and appended to on resume
    saved = Config.model_validate(state["config"]) if "config" in state else folder.config()
    mine, theirs = weights_settings(saved), weights_settings(cfg)
    changed = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
    other_run = [k for k in changed if not k.startswith("train.")]
    if other_run:
        raise NCLayersError(
            f"{folder.path} holds a run with other settings ({', '.join(other_run[:4])}); "
            "pick another --out, or --force to train this config there from scratch"
        )
    finished = state["epoch"] >= saved.train.epochs
    # Every epoch ran, but the run's last files are not there (a kill after the last
    # checkpoint) or were damaged since: finish it from the checkpoint, without training.
    finish = finished and not changed and folder.status("train", cfg) != "done"
    if resume is None:  # the sweep's way: resume only an interrupted run of the same settings
        resume = finish or not (finished or changed)
    if not resume:
        what = f"a finished run ({state['epoch']} epochs)" if finished else (
            f"an interrupted run (checkpoint at epoch {state['epoch']} of "
            f"{saved.train.epochs})"
        )  # fmt: skip
        if finish:
            what = f"a run whose {state['epoch']} epochs ran but whose last files were not written"
        raise NCLayersError(
            f"{folder.path} holds {what}; --resume to continue it (train.epochs=N to train "
            "longer), or --force to start over"
        )
    kept = [k for k in KEPT_ON_RESUME if k in changed]
    if kept:
        key = kept[0]
        raise NCLayersError(
            f"{key}={theirs[key]!r}: --resume continues the checkpoint of {folder.path}, "
            f"trained with {key}={mine[key]!r} (its optimiser's state and random generators "
            "go on); drop the setting, or --force to train this config there from scratch"
        )
    if state["epoch"] >= cfg.train.epochs and not finish:
        raise NCLayersError(
            f"--resume: {folder.path} is already trained for {state['epoch']} epochs; "
            f"set train.epochs above {state['epoch']} to train longer"
        )
    if changed:
        log.warning("resuming with changed settings: %s", ", ".join(changed))
    return _Start(state["epoch"], state["history"], state)


@dataclass
class _Setup:
    model: nn.Module
    train_model: nn.Module  # what the steps call: the DDP wrapper or the compiled model
    optimizer: torch.optim.Optimizer
    train_batches: Iterable  # make_batches: DeviceBatches or FolderBatches
    test_batches: Iterable
    train_ds: object
    test_ds: object
    view: str | None  # the labels learnt (None: a language model's next tokens)
    tracker: object


def _model_and_data(cfg: Config, folder: RunFolder):
    """(model, train split, test split): a causal language model's splits as text
    without labels (it learns the next token, whatever label column they have)."""
    train_ds, test_ds = load_split(cfg, "train"), load_split(cfg, "test")
    num_classes = train_ds.num_classes
    if cfg.model.checkpoint:  # fine-tune from given weights
        model = load_model(cfg, folder, num_classes)
    else:  # a config folder (config_only) is a model trained from scratch
        model = build_from_config(cfg.model, num_classes, fresh=config_only(cfg.model.name))
    if is_causal_lm(model):
        if not isinstance(train_ds, TextData):
            raise NCLayersError(f"model.name={cfg.model.name!r} is a language model: give it text")
        if cfg.train.track_nc_every:
            raise NCLayersError(
                "train.track_nc_every: NC during training is tracked for classifiers; set it "
                "to 0 for a language model (measure it after training: nclayers analyze RUN "
                "analyze.task=next_token)"
            )
        train_ds, test_ds = train_ds.without_labels(), test_ds.without_labels()
    elif isinstance(train_ds, TextData) and not train_ds.labels:
        raise NCLayersError(
            f"{cfg.data.name} has no labels (data.label_column={cfg.data.label_column!r}) to "
            f"train the classifier {cfg.model.name} on; name the label column, or train a "
            "causal language model on it"
        )
    return model, train_ds, test_ds


def _setup(cfg: Config, proc: Distributed, device: torch.device, folder: RunFolder) -> _Setup:
    tc = cfg.train
    if tc.batch_size < proc.world:
        raise NCLayersError(
            f"train.batch_size={tc.batch_size} is smaller than the {proc.world} processes; each "
            f"needs at least one sample per batch: set train.batch_size >= {proc.world}"
        )
    model, train_ds, test_ds = _model_and_data(cfg, folder)
    model = model.to(device)
    channels_last = tc.channels_last and speed_switches(device) and is_convnet(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    text = isinstance(train_ds, TextData)
    view = train_labels_view(train_ds) if train_ds.labels else None
    if view is not None:  # a classifier: one output per class of the data
        check_classifier(cfg, model, test_ds, train_ds.num_classes)
    shard = (proc.rank, proc.world)
    views = [view] if view else None
    # Text has no augmentation; its training shards are padded so DDP steps in lockstep.
    train_batches = make_batches(
        train_ds, tc.batch_size // proc.world, device, train=tc.augment or text, shuffle=True,
        seed=tc.seed, views=views, shard=shard, channels_last=channels_last,
    )  # fmt: skip
    # Text: N x T x V logits per batch; an evaluation batch of the training batch's size.
    eval_batch = tc.batch_size // proc.world if text else EVAL_BATCH
    test_batches = make_batches(
        test_ds, eval_batch, device, views=["clean"] if views else None, shard=shard,
        channels_last=channels_last,
    )  # fmt: skip
    train_model: nn.Module = model
    if proc.world > 1:
        train_model = nn.parallel.DistributedDataParallel(  # CUDA only: a GPU per rank
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tc.compile and speed_switches(device):
        # Static shapes: train_epoch runs the epoch's last, smaller batch eagerly, so one
        # graph serves every step (a dynamic-shape recompile made compiled runs slower).
        train_model = torch.compile(train_model, dynamic=False)
    tracker = _tracker(cfg, model, test_ds, proc, device, channels_last, folder)
    return _Setup(model, train_model, make_optimizer(model, tc), train_batches, test_batches,
                  train_ds, test_ds, view, tracker)  # fmt: skip


def _tracker(cfg, model, test_ds, proc, device, channels_last, folder: RunFolder):
    """`track(epoch, board)`: NC of every block on a fixed test subset, or None."""
    tc = cfg.train
    if not tc.track_nc_every:
        return None
    keep = balanced_subset(test_ds.labels["clean"], tc.track_nc_samples, test_ds.num_classes,
                           tc.seed)  # fmt: skip
    batches = make_batches(
        test_ds.subset(keep), EVAL_BATCH, device, views=["clean"],
        shard=(proc.rank, proc.world), channels_last=channels_last,
    )  # fmt: skip
    blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)

    def track(epoch: int, board) -> None:
        table = track_nc(model, blocks, batches, test_ds.num_classes, tc.amp, run=cfg.run,
                         epoch=epoch)  # fmt: skip
        if proc.main:
            folder.write_table(DYNAMICS, Table([*folder.read_table(DYNAMICS), *table]))
            for row in table if board is not None else ():
                board.add_scalar(f"nc1/layer{row['layer']:02d}", row["nc1"], epoch)
                board.add_scalar(f"nc2/layer{row['layer']:02d}", row["nc2"], epoch)

    return track


def _train(cfg, folder, proc, device, start: _Start, stop_after, progress) -> TrainResult:
    tc = cfg.train
    s = _setup(cfg, proc, device, folder)
    history = list(start.history or [])
    if start.state is not None:
        s.model.load_state_dict(start.state["model"])
        # The saved state (momentum buffers, Adam moments) with this config's settings:
        # a resumed run honours train.momentum, weight_decay, betas (and the lr schedule).
        settings = [{k: v for k, v in g.items() if k != "params"} for g in s.optimizer.param_groups]
        s.optimizer.load_state_dict(start.state["optimizer"])
        for group, given in zip(s.optimizer.param_groups, settings, strict=True):
            group.update(given)
        states = start.state["rng"]
        set_rng_state(states[proc.rank] if len(states) == proc.world else states[0])
        _trim_dynamics(folder, start.epoch)
    else:
        folder.remove(DYNAMICS, CHECKPOINT, TRAIN_SUMMARY)
    folder.save_config(cfg)  # on resume too: e.g. train.epochs may have grown
    folder.forget("train")
    end = tc.epochs if stop_after is None else min(tc.epochs, stop_after)
    say, board, close = _outputs(folder, proc, start, tc.tensorboard)
    if start.epoch >= end:
        say(f"every epoch ran (checkpoint at epoch {start.epoch}): writing the run's summary")
    else:
        say(
            f"{cfg.model.name} on {cfg.data.name} ({len(s.train_ds)} train / "
            f"{len(s.test_ds)} test), {device}, {proc.world} process(es), per-process "
            f"batch {tc.batch_size // proc.world}, epochs {start.epoch + 1}..{end} of {tc.epochs}"
        )
    t0 = time.perf_counter()
    try:
        if s.tracker is not None and start.state is None:
            s.tracker(0, board)
        records = fit(s.model, s.optimizer, s.train_batches, s.test_batches, tc,
                      range(start.epoch, end), proc, s.train_model, progress)  # fmt: skip
        for record in records:
            _after_epoch(cfg, folder, proc, s, record, history, t0, start.epoch, end, say, board)
    finally:
        close()
    return _finish(cfg, folder, proc, device, s, history, time.perf_counter() - t0, progress)


def _after_epoch(cfg, folder, proc, s: _Setup, record, history, t0, first, end, say, board):
    tc, epoch = cfg.train, record["epoch"]
    if not all(math.isfinite(record[k]) for k in ("train_loss", "test_loss")):
        last = f"epoch {history[-1]['epoch']}" if history else "none"
        raise NCLayersError(
            f"training diverged at epoch {epoch}: training loss {record['train_loss']}, test "
            f"loss {record['test_loss']}; lower train.lr (now {tc.lr}) and train again "
            f"(--force); the last good checkpoint ({last}) is kept in {folder.path}"
        )
    record["seconds"] = time.perf_counter() - t0
    language = s.view is None
    if language:  # the loss is the mean next-token loss in nats
        record["test_perplexity"] = math.exp(min(record["test_loss"], 700.0))  # no overflow
    history.append(record)
    eta = record["seconds"] / (epoch - first) * (end - epoch)
    unit = "seq/s" if isinstance(s.train_ds, TextData) else "img/s"
    test = f"ppl {record['test_perplexity']:.2f}" if language else f"{record['test_acc']:.4f}"
    say(
        f"epoch {epoch:>3}/{tc.epochs}  loss {record['train_loss']:.4f}  "
        f"train {record['train_acc']:.4f}  test {test}  "
        f"lr {record['lr']:.3g}  {record['img_per_s']:.0f} {unit}  "
        f"{record['epoch_seconds']:.1f} s  eta {_duration(eta)}"
    )
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "img_per_s",
                "test_perplexity"):  # fmt: skip
        if board is not None and key in record:
            board.add_scalar(key, record[key], epoch)
    if s.tracker is not None and (epoch % tc.track_nc_every == 0 or epoch == tc.epochs):
        s.tracker(epoch, board)
    if epoch == end or (tc.checkpoint_every and epoch % tc.checkpoint_every == 0):
        states = gather_rng_states(proc)  # every rank takes part
        folder.save_torch(CHECKPOINT, {
            "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "epoch": epoch, "history": history, "rng": states, "world": proc.world,
            "config": cfg.to_dict(),
        })  # fmt: skip
        _drop_stale_values(folder)


def _drop_stale_values(folder: RunFolder) -> None:
    """layers.csv shows only measurements of the weights the folder holds: once the
    checkpoint changed, it is written again without the older ones (they are kept in
    measurements/ and say they are out of date)."""
    try:
        folder.refresh_layers()
    except NCLayersError as err:  # a damaged measurement: said, training goes on
        log.warning("layers.csv not updated: %s", err)


def _finish(cfg, folder, proc, device, s: _Setup, history, seconds, progress) -> TrainResult:
    tc = cfg.train
    summary = {
        "config": cfg.to_dict(),
        "epochs_done": len(history),
        "train_labels": s.view or "next token",
        "num_classes": s.train_ds.num_classes,
        "final": history[-1] if history else None,
        "best_test_acc": max((h["test_acc"] for h in history), default=None),
        "train_seconds": seconds,
        "device": str(device),
        "world_size": proc.world,
        "per_process_batch": tc.batch_size // proc.world,
        "history": history,
    }
    if "noisy" in s.train_ds.labels:
        # Whether the model fitted its noisy labels decides whether Δ can be judged at all.
        meta = s.train_ds.meta
        summary["label_noise"] = {
            "source": meta.get("noise_source"),
            "changed": meta.get("noise_changed"),
            "rate": meta.get("noise_rate"),
            **memorized_fraction(s.model, s.train_ds, amp=tc.amp),
        }
        noise = summary["label_noise"]
        log.info("%.2f%% of the training labels changed; the model fits %.2f%% of them",
                 100 * noise["rate"], 100 * noise["memorized"])  # fmt: skip
    folder.write_json(TRAIN_SUMMARY, summary)
    if history and history[-1]["epoch"] == tc.epochs:
        weights = {"file": CHECKPOINT, "sha256": folder.checkpoint_sha(), "epoch": tc.epochs}
        folder.mark_done("train", cfg, weights=weights, test_acc=history[-1]["test_acc"],
                         seconds=seconds)  # fmt: skip
    return TrainResult(summary, s.model)


def _trim_dynamics(folder: RunFolder, epoch: int) -> None:
    """Drop rows measured after the checkpoint's epoch: the resumed run measures them
    again (a crash between measuring and checkpointing would otherwise leave twins)."""
    rows = Table(r for r in folder.read_table(DYNAMICS) if (r.get("epoch") or 0) <= epoch)
    if rows:
        folder.write_table(DYNAMICS, rows)
    else:
        folder.remove(DYNAMICS)


def _outputs(folder: RunFolder, proc: Distributed, start: _Start, tensorboard: bool):
    """(say, board, close): the epoch lines to train.log and the log, TensorBoard."""
    board, logs = None, proc.main and folder.writes
    if logs:
        if not start.state:  # a new training starts a new log
            folder.write(TRAIN_LOG, "")
        if tensorboard:
            board = _tensorboard(folder, start.epoch + 1 if start.state else None)

    def say(line: str) -> None:
        if logs:
            folder.append(TRAIN_LOG, line + "\n")  # through the folder's store: checksummed
        if proc.main:
            log.info(line)

    def close() -> None:
        if board is not None:
            board.close()

    return say, board, close


def _tensorboard(folder: RunFolder, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (pip install nclayers[tensorboard])
        return None
    return SummaryWriter(str(folder.file("tb")), purge_step=purge_step)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


__all__ = ["TrainResult", "train_job"]
