"""What a bug report needs to know about this machine, and a self-check of its devices.

`describe()`: the versions (nclayers, Python, torch, CUDA, cuDNN, torchvision, timm,
transformers), each GPU with its memory and bf16 support, CPU threads and the huge-pages
setting of PyTorch's CPU allocator. `self_check(devices)`: about ten seconds per device,
one `Check` per step, each ok or what failed:

- decode: a generated batch of JPEGs decoded on the device (nvJPEG on CUDA) against the
  CPU decoder (libjpeg-turbo);
- bf16: a tiny model's analysis under bf16 autocast against float32 (NC1 within 10 %);
- compile: one torch.compile'd training step (inductor) against the eager step;
- reduce: class statistics reduced over 2 processes (gloo; NCCL too with 2+ GPUs)
  against one process's.

`nclayers env [--check]` prints both.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Check:
    device: str
    name: str
    ok: bool
    detail: str
    seconds: float

    def line(self) -> str:
        state = "ok" if self.ok else "FAILED"
        return f"{self.device:<8} {self.name:<8} {state:<6} {self.detail} ({self.seconds:.1f} s)"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def huge_pages() -> str:
    """PyTorch's CPU allocator setting (THP_MEM_ALLOC_ENABLE) and the kernel's mode."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
        kernel = text[text.find("[") + 1 : text.find("]")]
    except OSError:
        kernel = "unknown"
    value = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    return f"THP_MEM_ALLOC_ENABLE={value} (kernel: {kernel})"


def describe() -> list[tuple[str, str]]:
    """(name, value) lines: versions, devices, threads, huge pages."""
    import torch

    import nclayers

    cuda = torch.version.cuda or "none (CPU build)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [
        ("nclayers", nclayers.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("cuda", cuda),
        ("cudnn", str(cudnn) if cudnn else "none"),
        ("torchvision", _version("torchvision")),
        ("timm", _version("timm")),
        ("transformers", _version("transformers")),
        ("platform", platform.platform()),
    ]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(count):
        p = torch.cuda.get_device_properties(i)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
        lines.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {bf16}"))
    if not count:
        lines.append(("gpus", "none"))
    lines += [
        ("cpu threads", f"{torch.get_num_threads()} (of {os.cpu_count()} CPUs)"),
        ("huge pages", huge_pages()),
    ]
    return lines


# ----------------------------------------------------------------------------- checks
def _timed(device: str, name: str, fn: Callable[[], str]) -> Check:
    start = time.perf_counter()
    try:
        detail, ok = fn(), True
    except Exception as err:  # a self-check reports every failure, whatever it is
        last = traceback.extract_tb(err.__traceback__)[-1]
        detail, ok = f"{type(err).__name__}: {err} (at {last.filename}:{last.lineno})", False
    return Check(device, name, ok, detail, time.perf_counter() - start)


def _images(n: int = 8, size: int = 48):
    """n smooth uint8 RGB images (gradients and discs): what JPEG keeps well."""
    import torch

    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for i in range(n):
        disc = ((yy - size / 2) ** 2 + (xx - i * 5) ** 2 < (size / 4) ** 2).float()
        rgb = torch.stack([xx * 255 / size, yy * 255 / size, 200 * disc + 20 * i])
        out.append(rgb.clamp(0, 255).to(torch.uint8))
    return out


def check_decode(device) -> str:
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    from nclayers.data.imagefolder import torchvision_io

    images = _images()
    with torchvision_io():
        datas = [encode_jpeg(x, quality=90) for x in images]
        cpu = decode_jpeg(datas, mode=ImageReadMode.RGB)
        dev = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    diffs = [(a.int() - b.cpu().int()).abs() for a, b in zip(cpu, dev, strict=True)]
    worst = max(int(d.max()) for d in diffs)
    mean = sum(float(d.float().mean()) for d in diffs) / len(diffs)
    # nvJPEG and libjpeg-turbo upsample chroma differently: a few grey levels apart.
    if mean > 1.5 or worst > 24:
        raise AssertionError(f"device decoding differs: mean {mean:.2f}, max {worst} levels")
    return f"{len(datas)} JPEGs, {mean:.2f} grey levels apart on average (max {worst})"


def _class_data(n: int, num_classes: int, device, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, 3, 16, 16, generator=gen)
    y = torch.arange(n) % num_classes
    x = templates[y] + 0.5 * torch.randn(n, 3, 16, 16, generator=gen)
    return x.to(device), y.to(device)


def check_bf16(device) -> str:
    import torch

    from nclayers.analysis import analyze
    from nclayers.models import build_model
    from nclayers.runtime import speed_switches_on

    torch.manual_seed(0)
    model = build_model("resnet18", 5, width=4).to(device).eval()
    x, y = _class_data(200, 5, device)
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 200, 100)]
    f32 = analyze(model, batches, 5, amp=False, progress=False)
    with speed_switches_on(device.type):
        bf16 = analyze(model, batches, 5, amp=True, progress=False)
    worst = max(abs(b["nc1"] / a["nc1"] - 1) for a, b in zip(f32, bf16, strict=True))
    if worst > 0.10 or bf16.stats[0]["clean"].means.dtype != torch.float64:
        raise AssertionError(f"bf16 NC1 {100 * worst:.1f} % from float32's (limit 10 %)")
    return f"{len(f32)} blocks, NC1 within {100 * worst:.2f} % of float32, stats float64"


def check_compile(device) -> str:
    import torch

    from nclayers.train import train_step

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(8, 5),
        ).to(device)  # fmt: skip

    x, y = _class_data(32, 5, device)
    losses = []
    for compiled in (False, True):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step_model = torch.compile(model, dynamic=False) if compiled else model
        losses.append([float(train_step(step_model, opt, x, y)[0]) for _ in range(2)])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    return f"2 compiled steps, losses {losses[1][0]:.4f}, {losses[1][1]:.4f} as eager"


def _reduce_rank(rank: int, world: int, port: int, backend: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from nclayers.metrics import ClassStats

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(300, 6, generator=gen, dtype=torch.float64) + 1e3).to(device)
        y = (torch.arange(300) % 4).to(device)
        part = ClassStats(4, 6, device).update(x[rank::world], y[rank::world]).reduce()
        if rank == 0:
            whole = ClassStats(4, 6, device).update(x, y)
            same = torch.allclose(part.means, whole.means, rtol=1e-12, atol=0)
            same = same and torch.allclose(part.m2, whole.m2, rtol=1e-9, atol=0)
            same = same and torch.equal(part.counts, whole.counts)
            with open(out, "w") as f:
                f.write("same" if same else f"differs: NC1 {part.nc1()} vs {whole.nc1()}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_reduce(backend: str) -> str:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.start_processes(_reduce_rank, args=(2, _free_port(), backend, out), nprocs=2,
                           start_method="spawn")  # fmt: skip
        with open(out) as f:
            result = f.read()
    if result != "same":
        raise AssertionError(result)
    return "2 processes' class statistics reduce to one process's"


CHECKS = ("decode", "bf16", "compile", "gloo", "nccl")


def self_check(devices=None, skip=()) -> list[Check]:
    """Every check (but those named in `skip`) on every device (default: the CPU and each
    GPU), one `Check` each."""
    import torch

    from nclayers.errors import NCLayersError

    unknown = sorted(set(skip) - set(CHECKS))
    if unknown:
        raise NCLayersError(f"--skip {unknown[0]}: not a check; choose from {', '.join(CHECKS)}")

    if devices is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = ["cpu", *(f"cuda:{i}" for i in range(count))]
    per_device = {"decode": check_decode, "bf16": check_bf16, "compile": check_compile}
    checks = []
    for name in devices:
        device = torch.device(name)
        for check, fn in per_device.items():
            if check not in skip:
                checks.append(_timed(name, check, lambda d=device, fn=fn: fn(d)))
    if "gloo" not in skip:
        checks.append(_timed("cpu", "gloo", lambda: check_reduce("gloo")))
    if "nccl" not in skip and sum(str(d).startswith("cuda") for d in devices) >= 2:
        checks.append(_timed("cuda", "nccl", lambda: check_reduce("nccl")))
    return checks


__all__ = ["CHECKS", "Check", "describe", "huge_pages", "self_check"]
