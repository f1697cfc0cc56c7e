"""Training with the paper's recipes (A.1): optimiser, schedule, checkpoints, resume.

`train(cfg)` builds the model and data from a `Config`, trains it, checkpoints every
`train.checkpoint_every` epochs and at the end (atomically: a kill mid-write leaves the
previous checkpoint intact), and resumes exactly from `checkpoint.pt` in the run folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nclayers.config import Config, resolve_device, save_config
from nclayers.data import ArrayDataset, DeviceBatches, load_dataset
from nclayers.models import build_model, load_weights

CHECKPOINT = "checkpoint.pt"


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
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
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state) -> None:
    """Write atomically: to a temporary file, flushed, then renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- loop
def evaluate(model: nn.Module, batches: DeviceBatches, amp: bool) -> tuple[float, float]:
    """(loss, accuracy) of the model on the batches' first labels view."""
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            y = y if isinstance(y, torch.Tensor) else y["clean"]
            with _autocast(x.device, amp):
                logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    return loss_sum / total, correct / total


def _autocast(device: torch.device, amp: bool):
    import contextlib

    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_labels_view(ds: ArrayDataset) -> str:
    """The view the model learns from: the noisy labels when there are any."""
    return "noisy" if "noisy" in ds.labels else "clean"


def train(
    cfg: Config,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train per `cfg` into `cfg.out`; returns the summary (also written to summary.json).

    resume: continue from `cfg.out/checkpoint.pt` (exactly: model, optimiser, epoch,
    RNG states). stop_after: stop after this many epochs in total (for tests and
    time-boxed runs); the checkpoint then allows `resume`.
    """
    tc = cfg.train
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(tc.seed)

    train_ds = load_dataset(cfg.data, "train")
    test_ds = load_dataset(cfg.data, "test")
    model = make_model(cfg, train_ds.num_classes).to(device)
    channels_last = tc.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, tc)
    view = train_labels_view(train_ds)
    train_batches = DeviceBatches(
        train_ds, tc.batch_size, device, train=tc.augment, shuffle=True, seed=tc.seed,
        views=[view], channels_last=channels_last,
    )  # fmt: skip
    test_batches = DeviceBatches(test_ds, 500, device, views=["clean"], channels_last=channels_last)
    step_model = torch.compile(model) if tc.compile else model
    amp = tc.amp

    start_epoch, history = 0, []
    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise ValueError(f"--resume: no {CHECKPOINT} in {str(out)!r}; start without --resume")
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        set_rng_state(state["rng"])
    else:
        save_config(cfg, out / "config.yaml")

    log = open(out / "train.log", "a")  # noqa: SIM115 - closed in finally
    end_epoch = tc.epochs if stop_after is None else min(tc.epochs, stop_after)
    t0 = time.perf_counter()
    try:
        for epoch in range(start_epoch, end_epoch):
            lr = tc.lr * lr_factor(tc, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_batches.set_epoch(epoch)
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            bar = _bar(train_batches, progress, f"epoch {epoch + 1}/{tc.epochs}")
            for x, y in bar:
                with _autocast(device, amp):
                    logits = step_model(x)
                loss = nn.functional.cross_entropy(
                    logits.float(), y, label_smoothing=tc.label_smoothing
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
            test_loss, test_acc = evaluate(model, test_batches, amp)
            record = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": float(loss_sum) / seen,
                "train_acc": int(correct) / seen,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "seconds": time.perf_counter() - t0,
            }
            history.append(record)
            line = (
                f"epoch {epoch + 1:>3}/{tc.epochs}  loss {record['train_loss']:.4f}  "
                f"train {record['train_acc']:.4f}  test {test_acc:.4f}  lr {lr:.3g}"
            )
            print(line, file=log, flush=True)
            if progress:
                print(line, flush=True)
            last = epoch + 1 == end_epoch
            if last or (tc.checkpoint_every and (epoch + 1) % tc.checkpoint_every == 0):
                save_checkpoint(
                    ckpt_path,
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    epoch=epoch + 1,
                    history=history,
                    rng=rng_state(),
                    config=cfg.to_dict(),
                )
    finally:
        log.close()

    summary = {
        "config": cfg.to_dict(),
        "epochs_done": len(history),
        "train_labels": view,
        "final": history[-1] if history else None,
        "train_seconds": time.perf_counter() - t0,
        "device": str(device),
        "history": history,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    summary["model"] = model
    return summary


def _bar(batches, enabled: bool, desc: str):
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
