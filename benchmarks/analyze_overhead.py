"""Cost of the one-pass analysis, as ratios measured in one run.

    python benchmarks/analyze_overhead.py --json bench_analyze.json

Model: CIFAR ResNet18 (width 16 by default), real CIFAR-10 test images from
../shared/data (2,000 by default), two labels views (true labels and 20% shuffled).
Prints and writes:
  analyze_over_inference  (nclayers.analyze, every block, two views) / (plain inference,
                          no hooks)                                      target <= 1.05
  two_pass_over_analyze   (two-pass baseline: class means in one pass, variances around
                          them in a second, as existing tools do) / (analyze) target >= 1.8
Each variant runs `--repeats` times, interleaved; the median time counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import nclayers
from nclayers.config import DataConfig
from nclayers.data import DeviceBatches, load_dataset, shuffle_labels
from nclayers.models import build_model, find_blocks
from nclayers.taps import Taps

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@torch.no_grad()
def plain_inference(model, batches) -> None:
    for x, _ in batches:
        model(x)


@torch.no_grad()
def two_pass_baseline(model, batches, num_classes: int) -> list[dict]:
    """Means in a first pass over the data, squared deviations in a second pass."""
    blocks = find_blocks(model)
    sums: dict = {}
    counts: dict = {}
    state = {}

    def first(i, f):
        for v, y in state["y"].items():
            s = sums.setdefault((i, v), torch.zeros(num_classes, f.shape[1], dtype=torch.float64))
            s.index_add_(0, y, f.double())
            c = counts.setdefault((i, v), torch.zeros(num_classes, dtype=torch.float64))
            c.index_add_(0, y, torch.ones(len(y), dtype=torch.float64))

    with Taps(blocks, first):
        for x, y in batches:
            state["y"] = y
            model(x)
    means = {k: sums[k] / counts[k][:, None] for k in sums}
    ss: dict = {}

    def second(i, f):
        for v, y in state["y"].items():
            d = (f.double() - means[(i, v)][y]).square().sum(1)
            ss.setdefault((i, v), torch.zeros(num_classes, dtype=torch.float64)).index_add_(0, y, d)

    with Taps(blocks, second):
        for x, y in batches:
            state["y"] = y
            model(x)
    return [{"key": k, "var": ss[k] / counts[k]} for k in ss]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the ratios to this JSON file")
    args = p.parse_args()

    torch.manual_seed(0)
    test = load_dataset(
        DataConfig(name="cifar10", dir=args.data_dir, test_subset=args.images), "test"
    )
    test = test.with_views({"clean": test.labels["clean"],
                            "noisy": shuffle_labels(test.labels["clean"], 0.2)})  # fmt: skip
    device = torch.device(args.device)
    batches = DeviceBatches(test, args.batch_size, device)
    model = build_model("resnet18", 10, width=args.width).to(device).eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    variants = {
        "inference": lambda: plain_inference(model, batches),
        "analyze": lambda: nclayers.analyze(model, batches, 10, progress=False),
        "two_pass": lambda: two_pass_baseline(model, batches, 10),
    }
    # The baseline must compute the same variances: check once, then time.
    table = nclayers.analyze(model, batches, 10, progress=False)
    base = {r["key"]: r["var"] for r in two_pass_baseline(model, batches, 10)}
    for i, layer in enumerate(table.stats):
        for v, s in layer.items():
            torch.testing.assert_close(s.variances.cpu(), base[(i, v)], rtol=1e-9, atol=1e-12)

    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "analyze_over_inference": med["analyze"] / med["inference"],
        "two_pass_over_analyze": med["two_pass"] / med["analyze"],
        "seconds": med,
        "images": len(test),
        "blocks": len(table.stats),
        "views": 2,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    print(f"{len(test)} CIFAR-10 test images, ResNet18 width {args.width}, {len(table.stats)} "
          f"blocks, 2 views, {device}, median of {args.repeats}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<10} {v:8.3f} s")
    print(f"analyze / inference = {result['analyze_over_inference']:.3f}   (target <= 1.05)")
    print(f"two-pass / analyze  = {result['two_pass_over_analyze']:.3f}   (target >= 1.8)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
