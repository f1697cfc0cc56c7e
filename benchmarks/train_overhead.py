"""Cost of nclayers' training loop and speed of its input pipeline, as ratios from one run.

    python benchmarks/train_overhead.py --json bench_train.json
    python benchmarks/train_overhead.py --device cuda --width 64 --json bench_train_gpu.json

Data: real CIFAR-10 training images from ../shared/data (10,000 by default).
Prints and writes:
  step_over_plain      nclayers' `train_epoch` (train_step: forward, loss, backward, SGD
                       step, plus its running loss/accuracy sums) / a minimal hand-written
                       PyTorch loop (forward, loss, backward, SGD step), on the same model,
                       optimiser and pre-made batches.                     target <= 1.05
  pipeline_speedup     DeviceBatches (uint8 set on the device; batched random crop with
                       padding 4, flip, normalise) images/s / torchvision DataLoader
                       images/s (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
                       Normalize on PIL images, num_workers=2), one epoch each, the
                       DataLoader's worker start included as in a training loop.
Both loops run under the same autocast (bf16 on CUDA unless --no-amp; none on the CPU),
memory format (channels_last on CUDA) and, with --compile, the same compiled model.
Each variant runs `--repeats` times, interleaved; the median time counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from nclayers.config import DataConfig
from nclayers.data import DeviceBatches, load_dataset
from nclayers.models import build_model
from nclayers.runtime import autocast
from nclayers.train import train_epoch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def plain_loop(model, optimizer, batches, amp: bool = False) -> torch.Tensor:
    """The minimal PyTorch training loop nclayers is measured against."""
    model.train()
    for x, y in batches:
        with autocast(x.device, amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.detach()


class PilCifar(torch.utils.data.Dataset):
    """The same uint8 images as PIL images, the way torchvision's CIFAR10 serves them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # N x H x W x C
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def torchvision_loader(ds, batch_size: int, workers: int, augment: bool, device):
    from torchvision import transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(ds.mean, ds.std)])
    return torch.utils.data.DataLoader(
        PilCifar(ds.images, ds.labels["clean"], transform), batch_size=batch_size,
        shuffle=augment, num_workers=workers, pin_memory=device.type == "cuda",
    )  # fmt: skip


def consume(batches, device) -> int:
    """One epoch; each batch ends on `device` as float32 images and labels."""
    n = 0
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def timed(fn, times: list[float], device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--images", type=int, default=10000, help="training images for the pipeline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet18", help="a CIFAR ResNet: resnet18 ... resnet152")
    p.add_argument("--width", type=int, help="ResNet width (default 16 on cpu, 64 on cuda)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, help="training steps per timed loop (8 cpu, 100 cuda)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="torch.compile the model for both loops with this mode (e.g. default, "
                        "max-autotune-no-cudagraphs, reduce-overhead)")  # fmt: skip
    p.add_argument("--json", help="write the ratios to this JSON file")
    args = p.parse_args()
    if not (Path(args.data_dir) / "cifar-10-batches-py").is_dir():
        p.error(f"--data-dir={args.data_dir!r} holds no cifar-10-batches-py/; pass the folder")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    width = args.width or (64 if on_cuda else 16)
    steps = args.steps or (100 if on_cuda else 8)
    amp = on_cuda and not args.no_amp
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    ds = load_dataset(
        DataConfig(name="cifar10", dir=args.data_dir, train_subset=args.images), "train"
    )

    # --- the training step: same model, optimiser and batches for both loops
    model = build_model(args.model, 10, width=width).to(device)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    net = torch.compile(model, mode=args.compile, dynamic=False) if args.compile else model
    source = DeviceBatches(ds, args.batch_size, device, train=True, channels_last=on_cuda)
    batches = []
    while len(batches) < steps:  # full batches only: every step has the same shapes
        batches += [(x.clone(), y.clone()) for x, y in source if len(y) == args.batch_size]
    batches = batches[:steps]
    loops = {
        "nclayers_step": lambda: float(train_epoch(net, optimizer, batches, amp)[0]),
        "plain_step": lambda: float(plain_loop(net, optimizer, batches, amp)),
    }
    # --- the input pipeline: one epoch of augmented, normalised batches each
    device_batches = DeviceBatches(ds, args.batch_size, device, train=True)
    loader = torchvision_loader(ds, args.batch_size, args.workers, True, device)
    # Same work: without augmentation both pipelines give the same normalised images.
    check = next(iter(torchvision_loader(ds, args.batch_size, 0, False, device)))[0]
    torch.testing.assert_close(
        next(iter(DeviceBatches(ds, args.batch_size, device)))[0].cpu(), check, rtol=0, atol=1e-5
    )
    epoch = iter(range(1, 10**6))
    pipelines = {
        "device_batches": lambda: consume(_epoch(device_batches, next(epoch)), device),
        "dataloader": lambda: consume(loader, device),
    }

    times: dict[str, list[float]] = {k: [] for k in (*loops, *pipelines)}
    t = time.perf_counter()
    for fn in (*loops.values(), *pipelines.values()):  # warm-up (and compilation)
        fn()
    warmup = time.perf_counter() - t
    for r in range(args.repeats):
        order = list((loops | pipelines).items())
        if r % 2:  # alternate the order: drift in machine load hits both sides alike
            order.reverse()
        for name, fn in order:
            timed(fn, times[name], device)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: len(ds) / med[k] for k in pipelines}
    result = {
        "step_over_plain": med["nclayers_step"] / med["plain_step"],
        "pipeline_speedup": rate["device_batches"] / rate["dataloader"],
        "seconds": med,
        "images_per_s": rate | {k: steps * args.batch_size / med[k] for k in loops},
        "warmup_seconds": warmup,
        "images": len(ds),
        "steps": steps,
        "batch_size": args.batch_size,
        "model": args.model,
        "width": width,
        "workers": args.workers,
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "amp": amp,
        "channels_last": on_cuda,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "spread": {k: [min(v), max(v)] for k, v in times.items()},
        "torch": torch.__version__,
    }
    print(f"{args.model} width {width}, batch {args.batch_size}, {steps} steps; "
          f"{len(ds)} CIFAR-10 training images; {result['device']}, amp={amp}, "
          f"channels_last={on_cuda}, compile={args.compile}, {torch.get_num_threads()} threads, "
          f"{args.workers} DataLoader workers; median of {args.repeats}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<15} {v:8.3f} s  {result['images_per_s'][k]:9.0f} img/s")
    print(
        f"nclayers step / plain PyTorch step = {result['step_over_plain']:.3f}   (target <= 1.05)"
    )
    print(f"DeviceBatches / DataLoader (img/s) = {result['pipeline_speedup']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _epoch(batches: DeviceBatches, epoch: int) -> DeviceBatches:
    batches.set_epoch(epoch)  # a fresh permutation, as in training
    return batches


if __name__ == "__main__":
    main()
