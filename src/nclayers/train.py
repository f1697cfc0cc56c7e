"""Training with the paper's recipes (A.1): optimiser, schedule, checkpoints, resume, DDP.

`train(cfg)` builds the model and data from a `Config` and trains it:

- checkpoints every `train.checkpoint_every` epochs and at the end, atomically (a kill
  mid-write leaves the previous checkpoint intact), read back with `weights_only=True`;
- `resume=True` continues exactly from `checkpoint.pt` in the run folder (model,
  optimiser, epoch, history, every RNG state): on CPU the final weights equal those of
  an uninterrupted run bit for bit;
- speed switches act on CUDA only: bf16 autocast (`train.amp`), channels_last for
  convnets (`train.channels_last`), `torch.compile` (`train.compile`); on CPU they are
  ignored, so they never change CPU results;
- under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) it joins the process group (nccl on
  CUDA, gloo on CPU), wraps the model in DistributedDataParallel and gives each rank its
  shard of every epoch's permutation. The per-rank batch is `train.batch_size // world`,
  so the global batch stays the recipe's. Evaluation and NC tracking are reduced across
  ranks; only rank 0 prints and writes files;
- `train.track_nc_every=N` measures NC1 and NC2 of every block on a fixed class-balanced
  test subset (`train.track_nc_samples`) before training and every N epochs, into
  `nc_dynamics.csv` (the rows of `analyze` plus an `epoch` column).

Run folder: config.yaml, train.log (one line per epoch), checkpoint.pt,
train_summary.json, nc_dynamics.csv (when tracked), tb/ (when tensorboard is installed).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from nclayers.analyze import autocast
from nclayers.config import Config, resolve_device, save_config
from nclayers.data import ArrayDataset, DeviceBatches, balanced_subset, load_dataset
from nclayers.models import build_model, find_blocks, load_weights
from nclayers.report.table import Table

CHECKPOINT = "checkpoint.pt"
DYNAMICS = "nc_dynamics.csv"
EVAL_BATCH = 500


# ----------------------------------------------------------------------------- pieces
def make_model(cfg: Config, num_classes: int) -> nn.Module:
    options = dict(cfg.model.options)
    if cfg.model.width is not None:
        options["width"] = cfg.model.width
    model = build_model(cfg.model.name, num_classes, **options)
    if cfg.model.checkpoint:
        load_weights(model, cfg.model.checkpoint)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: not on biases, norms, class
    tokens or position embeddings (the Swin/ViT recipe; harmless for ResNets' BN)."""
    no_decay_names = ("cls_token", "pos_embed", "absolute_pos_embed", "relative_position")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, tc) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":
        # The ResNet recipe decays every parameter, as the usual CIFAR code does.
        return torch.optim.SGD(
            model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay
        )
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(
            param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas)
        )
    raise ValueError(f"train.optimizer={tc.optimizer!r}: expected 'sgd' or 'adamw'")


def lr_factor(tc, epoch: int) -> float:
    """Learning-rate multiplier (of train.lr) for a 0-based epoch."""
    if epoch < tc.warmup_epochs:  # linear warm-up warmup_lr -> lr
        start = tc.warmup_lr / tc.lr
        return start + (1.0 - start) * epoch / tc.warmup_epochs
    if tc.schedule == "multistep":
        return tc.gamma ** sum(epoch >= m for m in tc.milestones)
    if tc.schedule == "cosine":
        span = max(1, tc.epochs - tc.warmup_epochs)
        t = (epoch - tc.warmup_epochs) / span
        low = tc.min_lr / tc.lr
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t))
    if tc.schedule == "constant":
        return 1.0
    raise ValueError(f"train.schedule={tc.schedule!r}: expected multistep, cosine or constant")


def is_convnet(model: nn.Module) -> bool:
    """More than one Conv2d. Swin and ViT have one (the patch embedding), and
    channels_last only pays off where convolutions dominate."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    # The legacy global generator is the one third-party code draws from; seed and save it.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    state = {
        "python": random.getstate(),
        # numpy's state as tensors and numbers, so checkpoints load with weights_only=True
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state) -> None:
    """Write atomically: to a temporary file, flushed to disk, then renamed over the old
    one. A crash at any point leaves the previous checkpoint whole; a failed write
    removes its temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    """Tensors, numbers, strings and containers only (weights_only=True): loading a
    checkpoint never runs code from it."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (world 1: a plain run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # train() initialised the process group, so it also ends it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group if the environment names one (or use a group the
    caller has initialised); pick this rank's device."""
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        proc = Distributed(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ValueError(
                    f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {key} is not set; launch "
                    "with torchrun (e.g. torchrun --nproc-per-node=2 -m nclayers.cli train ...)"
                    " or unset WORLD_SIZE"
                )
        rank = int(os.environ["RANK"])
        proc = Distributed(
            rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)), True
        )
        if device.type == "cuda":
            torch.cuda.set_device(proc.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        proc = Distributed()
    if proc.world > 1 and device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", proc.local_rank)
        torch.cuda.set_device(device)
    return proc, device


def _all_sum(t: torch.Tensor, proc: Distributed) -> torch.Tensor:
    if proc.world > 1:
        dist.all_reduce(t)
    return t


def _sync_buffers(model: nn.Module, proc: Distributed) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). Each rank's last
    forward updated its own; DDP would broadcast rank 0's at the next forward anyway, so
    this changes no training step, but evaluation and the checkpoint see one model."""
    if proc.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


# ----------------------------------------------------------------------------- steps
def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: bool = False,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch. Returns (mean loss, number correct) as device
    tensors, without a host-device synchronisation."""
    if x.is_cuda and hasattr(model, "_orig_mod"):  # compiled: a new iteration for CUDA
        torch.compiler.cudagraph_mark_step_begin()  # graphs (mode="reduce-overhead")
    with autocast(x.device, amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    amp: bool = False,
    label_smoothing: float = 0.0,
    bar=None,
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`train_step` over the batches: (summed loss, number correct, samples) of this
    process, as device tensors and an int: nothing here waits for the device. `bar`
    (tqdm) advances by the images all processes consumed.

    A batch smaller than the first (the epoch's last) runs a `torch.compile`d model's
    original module: compiling would otherwise recompile for it, or switch every later
    step to a slower dynamic-shape graph.
    """
    model.train()
    eager = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    loss_sum = correct = None
    seen = 0
    full = None
    for x, y in batches:
        full = len(y) if full is None else full
        net = model if len(y) == full else eager
        loss, hits = train_step(net, optimizer, x, y, amp, label_smoothing)
        loss = loss * len(y)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct = hits if correct is None else correct + hits
        seen += len(y)
        if bar is not None:
            bar.update(len(y) * world)
    if loss_sum is None:
        raise ValueError("the training batches are empty; check data.train_subset")
    return loss_sum, correct, seen


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: DeviceBatches, amp: bool, proc: Distributed | None = None
) -> tuple[float, float]:
    """(mean loss, accuracy) on the batches' first labels view, summed over all ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=batches.device)  # loss, correct, n
    for x, y in batches:
        y = y if isinstance(y, torch.Tensor) else y[batches.views[0]]
        with autocast(x.device, amp):
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
    model.train(was_training)
    loss_sum, correct, n = _all_sum(sums, proc or Distributed()).tolist()
    return loss_sum / n, correct / n


def track_nc(model: nn.Module, blocks, batches, num_classes: int, epoch: int, cfg) -> Table:
    """NC1/NC2 of every block on the tracking subset (reduced across ranks by analyze)."""
    from nclayers.analyze import analyze

    return analyze(
        model, batches, num_classes, blocks, split="test", amp=cfg.train.amp,
        progress=False, run=cfg.run, extra={"epoch": epoch},
    )  # fmt: skip


def train_labels_view(ds: ArrayDataset) -> str:
    """The view the model learns from: the noisy labels when there are any."""
    return "noisy" if "noisy" in ds.labels else "clean"


def _check(cfg: Config, world: int) -> None:
    tc = cfg.train
    for key in ("epochs", "batch_size"):
        if getattr(tc, key) < 1:
            raise ValueError(f"train.{key}={getattr(tc, key)}: must be a positive integer")
    for key in ("checkpoint_every", "track_nc_every"):
        if getattr(tc, key) < 0:
            raise ValueError(f"train.{key}={getattr(tc, key)}: use 0 (off) or a positive N")
    if tc.batch_size < world:
        raise ValueError(
            f"train.batch_size={tc.batch_size} is smaller than the {world} processes; each "
            f"needs at least one sample per batch: set train.batch_size >= {world}"
        )


# ----------------------------------------------------------------------------- loop
def train(
    cfg: Config,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train per `cfg` into `cfg.out`; returns the summary (also in train_summary.json)
    with the trained (unwrapped) model under "model".

    resume: continue from `cfg.out/checkpoint.pt` exactly. stop_after: stop after this
    many epochs in total (tests, time-boxed runs); the checkpoint then allows `resume`.
    Under torchrun every rank calls this; see the module docstring.
    """
    tc = cfg.train
    out = Path(cfg.out)
    proc, device = setup_distributed(cfg.device)
    try:
        return _train(cfg, tc, out, proc, device, resume, stop_after, progress and proc.main)
    finally:
        if proc.owned:
            dist.destroy_process_group()


def _train(cfg, tc, out, proc, device, resume, stop_after, progress) -> dict:
    _check(cfg, proc.world)
    if proc.main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(tc.seed)  # the same on every rank: DDP starts from equal weights anyway

    train_ds = load_dataset(cfg.data, "train")
    test_ds = load_dataset(cfg.data, "test")
    num_classes = train_ds.num_classes
    model = make_model(cfg, num_classes).to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:  # fixed input shapes: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = True
    channels_last = tc.channels_last and on_cuda and is_convnet(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, tc)
    view = train_labels_view(train_ds)
    rank_batch = tc.batch_size // proc.world
    train_batches = DeviceBatches(
        train_ds, rank_batch, device, train=tc.augment, shuffle=True, seed=tc.seed,
        views=[view], shard=(proc.rank, proc.world), channels_last=channels_last,
    )  # fmt: skip
    test_batches = DeviceBatches(
        test_ds, EVAL_BATCH, device, views=["clean"], shard=(proc.rank, proc.world),
        channels_last=channels_last,
    )  # fmt: skip
    track_batches = blocks = None
    if tc.track_nc_every:
        keep = balanced_subset(test_ds.labels["clean"], tc.track_nc_samples, num_classes, tc.seed)
        track_batches = DeviceBatches(
            test_ds.subset(keep), EVAL_BATCH, device, views=["clean"],
            shard=(proc.rank, proc.world), channels_last=channels_last,
        )  # fmt: skip
        blocks = find_blocks(model, cfg.model.blocks, pool=cfg.model.pool)

    start_epoch, history = 0, []
    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise ValueError(f"--resume: no {CHECKPOINT} in {str(out)!r}; start without --resume")
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        states = state["rng"]
        set_rng_state(states[proc.rank] if len(states) == proc.world else states[0])
        if proc.main:
            _trim_dynamics(out / DYNAMICS, start_epoch)
    elif proc.main:
        (out / DYNAMICS).unlink(missing_ok=True)
    if proc.main:  # on resume too: e.g. train.epochs may have grown
        save_config(cfg, out / "config.yaml")

    train_model: nn.Module = model
    if proc.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if on_cuda else None
        )
    if tc.compile and on_cuda:
        train_model = torch.compile(train_model)

    end_epoch = tc.epochs if stop_after is None else min(tc.epochs, stop_after)
    log = open(out / "train.log", "a" if resume else "w") if proc.main else None
    board = _tensorboard(out, tc.tensorboard and proc.main, start_epoch + 1 if resume else None)
    say = _printer(log, progress)
    say(
        f"{cfg.model.name} on {cfg.data.name} ({len(train_ds)} train / {len(test_ds)} test), "
        f"{device}, {proc.world} process(es), per-process batch {rank_batch} "
        f"(train.batch_size={tc.batch_size} // {proc.world}), epochs {start_epoch + 1}.."
        f"{end_epoch} of {tc.epochs}"
    )
    t0 = time.perf_counter()
    try:
        if tc.track_nc_every and not resume:
            _record_nc(model, blocks, track_batches, num_classes, 0, cfg, proc, out, board)
        for epoch in range(start_epoch, end_epoch):
            lr = tc.lr * lr_factor(tc, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_batches.set_epoch(epoch)
            t_epoch = time.perf_counter()
            bar = _bar(
                train_batches.samples_per_epoch * proc.world,
                progress,
                f"epoch {epoch + 1}/{tc.epochs}",
            )
            try:
                loss_sum, correct, seen = train_epoch(
                    train_model, optimizer, train_batches, tc.amp, tc.label_smoothing, bar,
                    proc.world,
                )  # fmt: skip
            finally:
                if bar is not None:
                    bar.close()
            _sync_buffers(model, proc)
            sums = torch.stack([loss_sum.double(), correct.double()])
            sums = torch.cat([sums, torch.tensor([seen], dtype=torch.float64, device=device)])
            loss_sum, correct, seen = _all_sum(sums, proc).tolist()
            train_seconds = time.perf_counter() - t_epoch
            test_loss, test_acc = evaluate(model, test_batches, tc.amp, proc)
            record = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "img_per_s": seen / train_seconds,
                "epoch_seconds": time.perf_counter() - t_epoch,
                "seconds": time.perf_counter() - t0,
            }
            history.append(record)
            done = epoch + 1 - start_epoch
            eta = (time.perf_counter() - t0) / done * (end_epoch - epoch - 1)
            say(
                f"epoch {epoch + 1:>3}/{tc.epochs}  loss {record['train_loss']:.4f}  "
                f"train {record['train_acc']:.4f}  test {test_acc:.4f}  lr {lr:.3g}  "
                f"{record['img_per_s']:.0f} img/s  {record['epoch_seconds']:.1f} s  "
                f"eta {_duration(eta)}"
            )
            if board is not None:
                for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "img_per_s"):
                    board.add_scalar(key, record[key], epoch + 1)
            if tc.track_nc_every and (
                (epoch + 1) % tc.track_nc_every == 0 or epoch + 1 == tc.epochs
            ):
                _record_nc(
                    model, blocks, track_batches, num_classes, epoch + 1, cfg, proc, out, board
                )
            last = epoch + 1 == end_epoch
            if last or (tc.checkpoint_every and (epoch + 1) % tc.checkpoint_every == 0):
                states = _gather_rng(proc)  # every rank takes part
                if proc.main:
                    save_checkpoint(
                        ckpt_path,
                        model=model.state_dict(),
                        optimizer=optimizer.state_dict(),
                        epoch=epoch + 1,
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

    final = history[-1] if history else None
    summary = {
        "config": cfg.to_dict(),
        "epochs_done": len(history),
        "train_labels": view,
        "final": final,
        "best_test_acc": max((h["test_acc"] for h in history), default=None),
        "train_seconds": time.perf_counter() - t0,
        "device": str(device),
        "world_size": proc.world,
        "per_process_batch": rank_batch,
        "history": history,
    }
    if proc.main:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    summary["model"] = model
    return summary


# ----------------------------------------------------------------------------- helpers
def _record_nc(model, blocks, batches, num_classes, epoch, cfg, proc, out, board) -> None:
    table = track_nc(model, blocks, batches, num_classes, epoch, cfg)
    if proc.main:
        table.to_csv(out / DYNAMICS, append=True)
        if board is not None:
            for row in table:
                board.add_scalar(f"nc1/layer{row['layer']:02d}", row["nc1"], epoch)
                board.add_scalar(f"nc2/layer{row['layer']:02d}", row["nc2"], epoch)


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


def _gather_rng(proc: Distributed) -> list[dict]:
    """The RNG states of all ranks, so that each rank resumes with its own."""
    state = rng_state()
    if proc.world == 1:
        return [state]
    states: list = [None] * proc.world
    dist.all_gather_object(states, state)
    return states


def _tensorboard(out: Path, enabled: bool, purge_step: int | None):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (pip install nclayers[tensorboard])
        return None
    return SummaryWriter(str(out / "tb"), purge_step=purge_step)


def _printer(log, progress: bool):
    def say(line: str) -> None:
        if log is not None:
            print(line, file=log, flush=True)
        if progress:
            print(line, flush=True)

    return say


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # img/s and the epoch's ETA come from tqdm's rate.
    return tqdm(
        total=total, desc=desc, unit="img", unit_scale=True, leave=False, dynamic_ncols=True
    )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
