"""Cost of the one-pass analysis, as ratios measured in one run.

    python benchmarks/analyze_overhead.py --json bench_analyze.json
    python benchmarks/analyze_overhead.py --device cuda --model resnet152 --width 64 \\
        --batch-size 1000 --json bench_analyze_r152.json

Model: CIFAR ResNet (`--model resnet18`, width 16 by default on the CPU, 64 on CUDA),
real CIFAR-10 test images from ../shared/data (2,000 by default on the CPU, 10,000 on
CUDA), two labels views (true labels and 20% shuffled). Prints and writes:
  analyze_over_inference  (nclayers.analysis, every block, two views) / (plain inference,
                          no hooks)                                      target <= 1.05
  two_pass_over_analyze   (two-pass baseline: class means in one pass, variances around
                          them in a second, one index_add_ per statistic, as existing tools
                          do) / (analyze)                                target >= 1.8
On a CPU shared with other work, `--clock cpu --threads 1` times this process's own CPU
time on one thread (waiting for a core is the other work's cost, not ours).
Every variant runs on `--device` with the same input batches, the same autocast (bf16 on
CUDA unless --no-amp; none on the CPU) and the same memory format (channels_last on
CUDA). Each variant runs `--repeats` times, interleaved; the median time counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import nclayers
from nclayers.config import DataConfig
from nclayers.data import DeviceBatches, load_dataset, shuffle_labels
from nclayers.models import build_model, find_blocks
from nclayers.runtime import autocast
from nclayers.taps import Taps

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@torch.no_grad()
def plain_inference(model, batches, amp: bool) -> None:
    for x, _ in batches:
        with autocast(x.device, amp):
            model(x)


@torch.no_grad()
def two_pass_baseline(model, batches, num_classes: int, amp: bool) -> list[dict]:
    """Means in a first pass over the data, squared deviations in a second pass."""
    blocks = find_blocks(model)
    sums: dict = {}
    counts: dict = {}
    state = {}

    def zeros(f, *shape):
        return torch.zeros(*shape, dtype=torch.float64, device=f.device)

    def first(i, f):
        for v, y in state["y"].items():
            s = sums.setdefault((i, v), zeros(f, num_classes, f.shape[1]))
            s.index_add_(0, y, f.double())
            c = counts.setdefault((i, v), zeros(f, num_classes))
            c.index_add_(0, y, torch.ones(len(y), dtype=torch.float64, device=f.device))

    with Taps(blocks, first):
        for x, y in batches:
            state["y"] = y
            with autocast(x.device, amp):
                model(x)
    means = {k: sums[k] / counts[k][:, None] for k in sums}
    ss: dict = {}

    def second(i, f):
        for v, y in state["y"].items():
            d = (f.double() - means[(i, v)][y]).square().sum(1)
            ss.setdefault((i, v), zeros(f, num_classes)).index_add_(0, y, d)

    with Taps(blocks, second):
        for x, y in batches:
            state["y"] = y
            with autocast(x.device, amp):
                model(x)
    return [{"key": k, "var": ss[k] / counts[k]} for k in ss]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet18", help="a CIFAR ResNet: resnet18 ... resnet152")
    p.add_argument("--width", type=int, help="ResNet width (default 16 on cpu, 64 on cuda)")
    p.add_argument("--images", type=int, help="test images (default 2000 on cpu, 10000 on cuda)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (CPU runs only)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write the ratios to this JSON file")
    args = p.parse_args()
    if not (Path(args.data_dir) / "cifar-10-batches-py").is_dir():
        p.error(f"--data-dir={args.data_dir!r} holds no cifar-10-batches-py/; pass the folder")

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and on_cuda:
        p.error("--clock cpu times CPU runs; use the wall clock on CUDA")
    width = args.width or (64 if on_cuda else 16)
    images = args.images or (10000 if on_cuda else 2000)
    amp = on_cuda and not args.no_amp
    if on_cuda:  # fixed shapes: let cuDNN pick its fastest kernels once (warm-up below)
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    test = load_dataset(DataConfig(name="cifar10", dir=args.data_dir, test_subset=images), "test")
    test = test.with_views({"clean": test.labels["clean"],
                            "noisy": shuffle_labels(test.labels["clean"], 0.2)})  # fmt: skip
    model = build_model(args.model, 10, width=width).to(device).eval()
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    batches = DeviceBatches(test, args.batch_size, device, channels_last=on_cuda)

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    variants = {
        "inference": lambda: plain_inference(model, batches, amp),
        "analyze": lambda: nclayers.analyze(model, batches, 10, amp=amp, progress=False),
        "two_pass": lambda: two_pass_baseline(model, batches, 10, amp),
    }
    # The baseline must compute the same variances: check once, then time. (bf16 features
    # on CUDA may differ in their last bits from one pass to the next.)
    table = nclayers.analyze(model, batches, 10, amp=amp, progress=False)
    base = {r["key"]: r["var"] for r in two_pass_baseline(model, batches, 10, amp)}
    tol = dict(rtol=1e-3, atol=1e-6) if on_cuda else dict(rtol=1e-9, atol=1e-12)
    for i, layer in enumerate(table.stats):
        for v, s in layer.items():
            torch.testing.assert_close(s.variances, base[(i, v)], **tol)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for r in range(args.repeats):
        order = list(variants.items())
        if r % 2:  # alternate the order: drift in machine load hits every variant alike
            order.reverse()
        for name, fn in order:
            sync()
            t = clock()
            fn()
            sync()
            times[name].append(clock() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "analyze_over_inference": med["analyze"] / med["inference"],
        "two_pass_over_analyze": med["two_pass"] / med["analyze"],
        "seconds": med,
        "images_per_s": {k: len(test) / v for k, v in med.items()},
        "spread": {k: [min(v), max(v)] for k, v in times.items()},
        "model": args.model,
        "width": width,
        "images": len(test),
        "batch_size": args.batch_size,
        "blocks": len(table.stats),
        "views": 2,
        "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "amp": amp,
        "channels_last": on_cuda,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "clock": args.clock,
        "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
        "torch": torch.__version__,
    }
    print(f"{len(test)} CIFAR-10 test images, {args.model} width {width}, {len(table.stats)} "
          f"blocks, 2 views, batch {args.batch_size}, {result['device']}, "
          f"amp={amp}, channels_last={on_cuda}, median of {args.repeats}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<10} {v:8.3f} s  {len(test) / v:9.0f} img/s")
    print(f"analyze / inference = {result['analyze_over_inference']:.3f}   (target <= 1.05)")
    print(f"two-pass / analyze  = {result['two_pass_over_analyze']:.3f}   (target >= 1.8)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
