"""The training loop and its pieces, following the paper's recipes (A.1).

Library code: models, batches and configs in, weights and per-epoch records out; it knows
no folders (the `nclayers.jobs.train` job owns the run folder, checkpoints and logs).

- `fit(...)` trains over a range of epochs and yields one record per epoch, so the caller
  decides what to log, measure and checkpoint between epochs;
- `train_step`, `train_epoch`, `evaluate`: one step, one epoch, one evaluation, free of
  host-device synchronisations inside the batch loop;
- the recipe: `make_optimizer` (SGD for ResNets, AdamW without decay on norms, biases and
  tokens for Swin/ViT), `lr_factor` (multi-step, cosine, linear warm-up);
- speed switches act on CUDA only (bf16 autocast, channels_last, torch.compile), so they
  never change CPU results;
- torchrun/DDP: `setup_distributed` joins the process group (nccl on CUDA, gloo on CPU);
  each rank takes its shard of every epoch's permutation; sums are reduced across ranks;
- exact resume: `rng_state`/`set_rng_state`/`gather_rng_states` and atomic
  `save_checkpoint`/`load_checkpoint` (weights_only=True).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from nclayers.data import ArrayDataset, DeviceBatches
from nclayers.errors import NCLayersError
from nclayers.files import atomic_open
from nclayers.runtime import Distributed, all_sum, autocast, counter
from nclayers.table import Table

EVAL_BATCH = 500


# ----------------------------------------------------------------------------- pieces
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
    # One fused kernel for the whole update on CUDA (the per-parameter loop is launch-bound).
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if tc.optimizer == "sgd":
        # The ResNet recipe decays every parameter, as the usual CIFAR code does.
        return torch.optim.SGD(
            model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
            **fused,
        )  # fmt: skip
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(
            param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas), **fused
        )
    raise NCLayersError(f"train.optimizer={tc.optimizer!r}: expected 'sgd' or 'adamw'")


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
    if tc.schedule == "linear":  # linear decay to min_lr (the transformers fine-tuning one)
        span = max(1, tc.epochs - tc.warmup_epochs)
        t = (epoch - tc.warmup_epochs) / span
        low = tc.min_lr / tc.lr
        return 1.0 - (1.0 - low) * t
    if tc.schedule == "constant":
        return 1.0
    raise NCLayersError(
        f"train.schedule={tc.schedule!r}: expected multistep, cosine, linear or constant"
    )


def is_convnet(model: nn.Module) -> bool:
    """More than one Conv2d. Swin and ViT have one (the patch embedding), and
    channels_last only pays off where convolutions dominate."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


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
    """Write atomically (`files.atomic_open`): a crash at any point leaves the previous
    checkpoint whole; a failed write removes its temporary file."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict:
    """Tensors, numbers, strings and containers only (weights_only=True): loading a
    checkpoint never runs code from it."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- processes
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
        raise NCLayersError("the training batches are empty; check data.train_subset")
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
    loss_sum, correct, n = all_sum(sums).tolist()
    return loss_sum / n, correct / n


def track_nc(model: nn.Module, blocks, batches, num_classes: int, amp: bool, **extra) -> Table:
    """NC1/NC2 of every block on a fixed subset (reduced across ranks by analyze)."""
    from nclayers.analysis import analyze

    return analyze(
        model, batches, num_classes, blocks, split="test", amp=amp, progress=False, extra=extra
    )


def train_labels_view(ds: ArrayDataset) -> str:
    """The view the model learns from: the noisy labels when there are any."""
    return "noisy" if "noisy" in ds.labels else "clean"


def check_recipe(tc, world: int = 1) -> None:
    """Refuse a training config that cannot run, naming the key and the fix."""
    for key in ("epochs", "batch_size"):
        if getattr(tc, key) < 1:
            raise NCLayersError(f"train.{key}={getattr(tc, key)}: must be a positive integer")
    for key in ("checkpoint_every", "track_nc_every"):
        if getattr(tc, key) < 0:
            raise NCLayersError(f"train.{key}={getattr(tc, key)}: use 0 (off) or a positive N")
    if tc.batch_size < world:
        raise NCLayersError(
            f"train.batch_size={tc.batch_size} is smaller than the {world} processes; each "
            f"needs at least one sample per batch: set train.batch_size >= {world}"
        )


def gather_rng_states(proc: Distributed) -> list[dict]:
    """The RNG states of all ranks (every rank takes part), so each resumes with its own."""
    state = rng_state()
    if proc.world == 1:
        return [state]
    states: list = [None] * proc.world
    dist.all_gather_object(states, state)
    return states


# ----------------------------------------------------------------------------- loop
def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: DeviceBatches,
    test_batches: DeviceBatches,
    tc,
    epochs: range,
    proc: Distributed | None = None,
    train_model: nn.Module | None = None,
    progress: bool = False,
) -> Iterator[dict]:
    """Train `model` for `epochs` (0-based) with the recipe `tc`, yielding after each
    epoch its record: epoch (1-based), lr, train/test loss and accuracy, img/s, seconds.

    train_model: what the steps call (the DDP wrapper or compiled model; default `model`).
    Between two records the caller may log, measure or checkpoint; with several processes
    every rank iterates and the records are identical on all of them.
    """
    proc = proc or Distributed()
    train_model = train_model or model
    for epoch in epochs:
        lr = tc.lr * lr_factor(tc, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_batches.set_epoch(epoch)
        t_epoch = time.perf_counter()
        bar = counter(
            train_batches.samples_per_epoch * proc.world, progress,
            f"epoch {epoch + 1}/{tc.epochs}",
        )  # fmt: skip
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
        sums = torch.cat([sums, torch.tensor([seen], dtype=torch.float64, device=sums.device)])
        loss_sum, correct, seen = all_sum(sums).tolist()  # once per epoch
        train_seconds = time.perf_counter() - t_epoch
        test_loss, test_acc = evaluate(model, test_batches, tc.amp, proc)
        yield {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "img_per_s": seen / train_seconds,
            "epoch_seconds": time.perf_counter() - t_epoch,
        }
