"""Where and how code runs: the device, autocast, the process group, progress bars.

One helper per idea, used by every stage:

- `resolve_device("auto" | "cpu" | "cuda" | "cuda:N")`;
- `autocast(device, amp)`: bf16 autocast on CUDA when asked, a no-op elsewhere, so CPU
  results never depend on it; `speed_switches(device)` says where autocast,
  channels_last and torch.compile act (`speed_switches_on("cpu")`: on the CPU too);
- `Distributed`, `setup_distributed`, `world()`, `all_sum`: this process's rank among
  torchrun's processes (nccl on CUDA, gloo on CPU) and the sums that cross them;
- `progress(iterable, ...)` and `counter(total, ...)`: tqdm bars with rate and ETA, or
  nothing when progress is off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nclayers.errors import NCLayersError

DEVICES = "auto, cpu, cuda or cuda:N"


# ----------------------------------------------------------------------------- device
def resolve_device(name: str = "auto") -> torch.device:
    """The torch device `name` means here; refuses CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise NCLayersError(f"device={name!r}: not a device; use {DEVICES}") from err
    if dev.type not in ("cpu", "cuda"):
        raise NCLayersError(f"device={name!r}: not supported; use {DEVICES}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NCLayersError(f"device={name!r}: CUDA is not available here; use device=cpu")
    return dev


# The device types on which the speed switches act when a config or call asks for them:
# bf16 autocast (`amp`), channels_last and torch.compile. The CPU is not one by default:
# there they are slower on most cores, and CPU results stay the same whatever the
# switches say. The code they run is the same on every device: tests add "cpu" here
# (`speed_switches_on("cpu")`) to run the GPU paths on the CPU.
SPEED_DEVICES: set[str] = {"cuda"}


def speed_switches(device: torch.device | str) -> bool:
    """Whether bf16 autocast, channels_last and torch.compile act on `device` when asked."""
    return torch.device(device).type in SPEED_DEVICES


@contextlib.contextmanager
def speed_switches_on(device_type: str):
    """Let the speed switches act on `device_type` (e.g. "cpu") inside the block: the GPU
    code paths (bf16 autocast, channels_last, torch.compile) on another device."""
    added = device_type not in SPEED_DEVICES
    SPEED_DEVICES.add(device_type)
    try:
        yield
    finally:
        if added:
            SPEED_DEVICES.discard(device_type)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on `device` when `amp` and the speed switches act there (CUDA); a
    no-op elsewhere (CPU results never change)."""
    if amp and speed_switches(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Distributed:
    """This process's place among the processes of a run (world 1: a plain run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # setup_distributed initialised the group, so the caller ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """End the process group if this process started it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes files and prints. Before the
    group is joined, torchrun's RANK variable tells."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(device_name: str = "auto") -> tuple[Distributed, torch.device]:
    """Join torchrun's process group if the environment names one (or use a group the
    caller initialised); pick this rank's device (one GPU per process)."""
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        proc = Distributed(rank, size, int(os.environ.get("LOCAL_RANK", rank)))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise NCLayersError(
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
    if proc.world > 1 and device.type == "cuda":
        device = torch.device("cuda", proc.local_rank)
        torch.cuda.set_device(device)
    return proc, device


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` in place over every process of the group (a no-op without one)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    """Wait for every process of the group (a no-op without one)."""
    if world()[1] > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- state
@contextlib.contextmanager
def seeded(seed: int):
    """Seed Python's, NumPy's and torch's global generators for the block, then give the
    caller's states back: a library call never leaves the global RNG changed."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()  # noqa: NPY002
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002  the generator third-party code uses
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)  # noqa: NPY002


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN's autotuner for the block (fixed shapes: fastest kernels once), then as it was."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# ----------------------------------------------------------------------------- progress
def progress(iterable: Iterable, enabled: bool, desc: str, unit: str = "batch"):
    """`iterable` with a tqdm bar (rate, ETA) when `enabled`, else `iterable` itself."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    total = len(iterable) if hasattr(iterable, "__len__") else None
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def counter(total: int, enabled: bool, desc: str, unit: str = "img"):
    """A tqdm bar advanced by hand (`bar.update(n)`), or None when off."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, unit_scale=unit == "img", leave=False,
        dynamic_ncols=True,
    )  # fmt: skip


__all__ = [
    "Distributed",
    "all_sum",
    "autocast",
    "barrier",
    "counter",
    "cudnn_benchmark",
    "is_main",
    "progress",
    "resolve_device",
    "seeded",
    "setup_distributed",
    "speed_switches",
    "speed_switches_on",
    "world",
]
