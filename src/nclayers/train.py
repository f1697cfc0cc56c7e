"""The training loop and its pieces, following the paper's recipes (A.1).

Library code: models, batches and configs in, weights and per-epoch records out; it knows
no folders (the `nclayers.jobs.train` job owns the run folder, checkpoints and logs).

- `fit(...)` trains over a range of epochs and yields one record per epoch, so the caller
  decides what to log, measure and checkpoint between epochs;
- `train_step`, `train_epoch`, `evaluate`: one step, one epoch, one evaluation, free of
  host-device synchronisations inside the batch loop. Their seams: a batch's inputs go
  to the model as `run_model` does (a tensor: `model(x)`; a tokenised batch, a mapping:
  `model(**x)`), the logits are `output_logits` of what it returns (a tensor, or the
  `.logits` of a transformers output), and `batch_loss` is the cross-entropy against the
  labels, or, for language-model text (labels None), the next-token loss `lm.lm_loss`
  over the real positions (its accuracy: next-token accuracy);
- the recipe: `make_optimizer` (SGD for ResNets, AdamW without decay on norms, biases and
  tokens for Swin/ViT/transformers), `lr_factor` (multi-step, cosine, linear, warm-up by
  epochs), `step_lr_factor` (the same per optimiser step after a warm-up of
  `train.warmup_steps`, transformers' fine-tuning recipe);
- speed switches act on CUDA only (bf16 autocast, channels_last, torch.compile), so they
  never change CPU results (`runtime.speed_switches`; tests run them on the CPU too);
- torchrun/DDP: `setup_distributed` joins the process group (nccl on CUDA, gloo on CPU);
  each rank takes its shard of every epoch's permutation; sums are reduced across ranks;
- exact resume: `rng_state`/`set_rng_state`/`gather_rng_states` and atomic
  `save_checkpoint`/`load_checkpoint` (weights_only=True).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from nclayers.data import ArrayDataset, DeviceBatches
from nclayers.errors import NCLayersError
from nclayers.files import atomic_open
from nclayers.lm import IGNORE, lm_loss, next_token_targets
from nclayers.runtime import Distributed, all_sum, autocast, counter
from nclayers.table import Table
from nclayers.taps import batch_rows, output_logits, run_model

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
    if not any(p.requires_grad for p in model.parameters()):
        raise NCLayersError(
            f"model: {type(model).__name__} has no trainable parameter (none, or all with "
            "requires_grad=False), so there is nothing to train; measure it as it is "
            "(nclayers analyze ... model.untrained=true, or model.checkpoint=FILE)"
        )
    # CUDA only: one fused kernel for the whole update (the per-parameter loop is
    # launch-bound there; on the CPU the plain loop keeps results bit for bit).
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


def step_lr_factor(tc, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier for a 0-based optimiser step when the schedule runs per
    step (`train.warmup_steps` > 0): linear warm-up (step+1)/W over the first W steps, so
    the first step already learns; then linear or cosine decay to min_lr over the other
    steps of train.epochs, or multistep/constant by the step's epoch."""
    warm = tc.warmup_steps
    if step < warm:
        return (step + 1) / warm
    low = tc.min_lr / tc.lr
    t = (step - warm) / max(1, tc.epochs * steps_per_epoch - warm)
    if tc.schedule == "linear":
        return 1.0 - (1.0 - low) * t
    if tc.schedule == "cosine":
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t))
    return lr_factor(tc.model_copy(update={"warmup_epochs": 0}), step // steps_per_epoch)


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
def input_device(x) -> torch.device:
    """The device of a batch's inputs (a tensor, or a tokenised mapping's input_ids)."""
    if isinstance(x, torch.Tensor):
        return x.device
    return (x.get("input_ids") if "input_ids" in x else next(iter(x.values()))).device


def batch_loss(
    logits: torch.Tensor, x, y: torch.Tensor | None, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """(mean loss, number correct, count) of one batch, on the device: cross-entropy of
    N x K logits against the labels `y` (count N, an int); for language-model text (`y`
    None, N x T x V logits of a tokenised batch) the next-token loss over the positions
    whose next token is real (count: those positions, a device tensor, so nothing waits)."""
    if y is not None:
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        return loss, (logits.detach().argmax(1) == y).sum(), len(y)
    if label_smoothing:
        raise NCLayersError(
            f"train.label_smoothing={label_smoothing}: applies to classifiers, not to "
            "language-model text; set it to 0"
        )
    mask = x.get("attention_mask")
    target = next_token_targets(x["input_ids"], mask)
    count = (target != IGNORE).sum()
    hits = (logits.detach()[:, :-1].argmax(-1) == target).sum()  # IGNORE is never a token
    return lm_loss(logits, x["input_ids"], target=target), hits, count


def _step(model, optimizer, x, y, amp: bool, label_smoothing: float):
    """One optimiser step: (mean loss, number correct, count) as device values."""
    device = input_device(x)
    # CUDA only: CUDA graphs. A compiled model's step is a new iteration for them.
    if device.type == "cuda" and hasattr(model, "_orig_mod"):
        torch.compiler.cudagraph_mark_step_begin()  # for CUDA graphs (mode="reduce-overhead")
    with autocast(device, amp):
        logits = output_logits(run_model(model, x))
    loss, hits, count = batch_loss(logits, x, y, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), hits, count


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x,
    y: torch.Tensor | None,
    amp: bool = False,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch (images, or a tokenised batch; labels, or None for
    language-model text). Returns (mean loss, number correct) as device tensors, without
    a host-device synchronisation."""
    loss, hits, _ = _step(model, optimizer, x, y, amp, label_smoothing)
    return loss, hits


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    amp: bool = False,
    label_smoothing: float = 0.0,
    bar=None,
    world: int = 1,
    lr_at: Callable[[int], float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """`train_step` over the batches: (summed loss, number correct, count) of this
    process, as device tensors and an int (count: the samples; for language-model text
    the counted positions, a device tensor): nothing here waits for the device. `bar`
    (tqdm) advances by the samples all processes consumed. `lr_at(i)`: the learning rate
    of the epoch's i-th step, where the schedule runs per step.

    A batch smaller than the first (the epoch's last) runs a `torch.compile`d model's
    original module: compiling would otherwise recompile for it, or switch every later
    step to a slower dynamic-shape graph.
    """
    model.train()
    eager = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    loss_sum = correct = None
    seen = 0
    full = None
    for i, (x, y) in enumerate(batches):
        rows = batch_rows(x)
        full = rows if full is None else full
        net = model if rows == full else eager
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(i)
        loss, hits, count = _step(net, optimizer, x, y, amp, label_smoothing)
        loss = loss * count
        loss_sum = loss if loss_sum is None else loss_sum + loss
        correct = hits if correct is None else correct + hits
        seen = seen + count
        if bar is not None:
            bar.update(rows * world)
    if loss_sum is None:
        raise NCLayersError("the training batches are empty; check data.train_subset")
    return loss_sum, correct, seen


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: DeviceBatches, amp: bool, proc: Distributed | None = None
) -> tuple[float, float]:
    """(mean loss, accuracy) on the batches' first labels view, summed over all ranks;
    for language-model text (labels None) the mean next-token loss (its exp is the
    perplexity) and next-token accuracy over the counted positions."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=batches.device)  # loss, correct, n
    for x, y in batches:
        y = y if y is None or isinstance(y, torch.Tensor) else y[batches.views[0]]
        with autocast(input_device(x), amp):
            logits = output_logits(run_model(model, x))
        if y is None:
            loss, hits, count = batch_loss(logits, x, None)
            sums[0] += loss * count
            sums[1] += hits
            sums[2] += count
            continue
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
    train_model = (
        train_model if train_model is not None else model
    )  # a compiled model has no truth value
    steps = len(train_batches)
    for epoch in epochs:
        lr_at = None
        if tc.warmup_steps:  # the schedule moves every step

            def lr_at(i: int, first: int = epoch * steps) -> float:
                return tc.lr * step_lr_factor(tc, first + i, steps)

        lr = lr_at(0) if lr_at is not None else tc.lr * lr_factor(tc, epoch)
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
                proc.world, lr_at,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        _sync_buffers(model, proc)
        sums = torch.stack([loss_sum.double(), correct.double()])
        samples = None  # images: the samples are what the loss counted
        if isinstance(seen, torch.Tensor):  # language-model text: positions, on the device
            samples = train_batches.samples_per_epoch * proc.world
            seen = seen.double().view(1)
        else:
            seen = torch.tensor([seen], dtype=torch.float64, device=sums.device)
        loss_sum, correct, seen = all_sum(torch.cat([sums, seen])).tolist()  # once per epoch
        samples = seen if samples is None else samples
        train_seconds = time.perf_counter() - t_epoch
        test_loss, test_acc = evaluate(model, test_batches, tc.amp, proc)
        yield {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "img_per_s": samples / train_seconds,  # samples (images or sequences) per second
            "epoch_seconds": time.perf_counter() - t_epoch,
        }
