"""Joint linear probes vs plain inference and vs probing one block at a time.

CIFAR ResNet18 (width 16, all 8 blocks) on a fixed class-balanced subset of the real
CIFAR-10 training split, E epochs, batch 128 everywhere. Prints and writes (--json):

  grid_over_inference   (every block's probe with the default lr grid, 5 heads per block
                         trained together, streamed with crop + flip, E epochs over the
                         90% of the rows that train, then one unaugmented pass over the
                         10% held out that choose each block's lr) / (E plain inference
                         passes over the whole training split)              target <= 1.10
  single_over_inference (the paper's recipe, probe.lrs=[0.1] probe.standardize=false:
                         nothing held out, E epochs over every row) / (the same E
                         passes)                                            target <= 1.05
  single_standardized_over_inference  (one lr on standardised features, the statistics
                         from a tenth of the rows: a tenth of a pass more) / (the same)
  separate_over_joint   (the 8 probes trained one block at a time, each with its own
                         streamed passes, default grid) / (grid, joint)     target >= 6
  cache_over_inference  (cache mode, default grid: one feature pass + E epochs of heads +
                         the held-out pass) / (one plain inference pass, no augmentation)
                                                                            target <= 1.5

The streamed ratios are the median of `--repeats` pairs, each probe timed right after its
own E inference passes. Every probe ends with one pass over a test subset (samples // 4
images); each baseline includes that same pass. Times are process CPU seconds on CPU (one thread by
default: on a shared machine wall time measures the neighbours, CPU time the work) and
wall seconds after a device synchronisation on CUDA; wall seconds are printed too. Both
sides of every ratio run under the same autocast (bf16 on CUDA, none on CPU), the same
memory format (channels_last on CUDA) and the same thread count.

    python benchmarks/probe_speed.py --json probe_speed.json
    python benchmarks/probe_speed.py --no-separate          # the grid and single-lr ratios only
    python benchmarks/probe_speed.py --device cuda --samples 10000 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nclayers.config import DataConfig, ProbeSettings
from nclayers.data import DeviceBatches, load_dataset
from nclayers.models import build_model, find_blocks
from nclayers.probing import probe
from nclayers.runtime import autocast

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds of work: process CPU time on CPU, synchronised wall time on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: dict[str, float] = {}
        self.work: dict[str, float] = {}

    def time(self, name: str, fn) -> float:
        sync(self.device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(self.device)
        self.wall[name] = time.perf_counter() - w0
        cpu = time.process_time() - c0
        self.work[name] = cpu if self.device.type == "cpu" else self.wall[name]
        return self.work[name]


@torch.no_grad()
def inference(model, ds, epochs: int, augment: bool, device, channels_last: bool) -> None:
    """`epochs` plain forward passes over `ds` in the probe's batches."""
    batches = DeviceBatches(
        ds, 128, device, train=True, shuffle=True, crop_padding=4 if augment else 0,
        flip=augment, channels_last=channels_last,
    )  # fmt: skip
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for x, _ in batches:
            with autocast(device, True):
                model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--samples", type=int, default=2000, help="training subset size")
    parser.add_argument("--epochs", type=int, default=2, help="E")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--repeats", type=int, default=3, help="pairs per streamed ratio")
    parser.add_argument("--no-separate", action="store_true",
                        help="skip the 8 one-block probes (separate_over_joint)")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = DataConfig(name="cifar10", dir=args.data_dir, train_subset=args.samples,
                     test_subset=max(10, args.samples // 4))  # fmt: skip
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=16).to(device).eval()
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    blocks = find_blocks(model)
    e = args.epochs
    base = ProbeSettings(epochs=e, milestones=[e // 2] if e > 1 else [], batch_size=128,
                         eval_batch_size=128, channels_last=channels_last)  # fmt: skip

    clock = Clock(device)

    def run_probe(blocks="auto", **kw) -> None:
        probe(model, train, test, 10, blocks, base.model_copy(update=kw))

    def plain(passes: int, augment: bool) -> None:  # the probe's passes, without heads
        inference(model, train, passes, augment, device, channels_last)
        inference(model, test, 1, False, device, channels_last)

    inference(model, train.subset(torch.arange(256)), 1, True, device, channels_last)  # warm
    # Streamed probes against the E passes, each right after its own baseline, `repeats`
    # times: the median of the pairs' ratios (a neighbour's burst hits one pair, not all).
    streamed = {
        "grid_over_inference": dict(augment=True, mode="stream"),
        # the paper's recipe: one lr, raw features, nothing held out
        "single_over_inference": dict(augment=True, mode="stream", lrs=[0.1], standardize=False),
        # one lr on standardised features (statistics from a tenth of the rows)
        "single_standardized_over_inference": dict(augment=True, mode="stream", lrs=[0.1]),
    }
    pairs: dict[str, list[float]] = {k: [] for k in streamed}
    for rep in range(args.repeats):
        for key, kw in streamed.items():
            name = f"inference_E_passes.{key.removesuffix('_over_inference')}.{rep}"
            t_inf = clock.time(name, lambda: plain(e, True))  # each ratio's own baseline
            pairs[key].append(clock.time(f"{key}.{rep}", lambda kw=kw: run_probe(**kw)) / t_inf)
    t_grid = clock.work["grid_over_inference.0"]
    t_inf_clean = clock.time("inference_1_pass", lambda: plain(1, False))
    t_cache = clock.time("cache", lambda: run_probe(augment=False, mode="cache"))
    t_separate = float("nan")
    if not args.no_separate:
        t_separate = clock.time(
            "separate_stream_8_blocks",
            lambda: [run_probe([b], augment=True, mode="stream") for b in blocks],
        )

    result = {
        **{k: statistics.median(v) for k, v in pairs.items()},
        "pairs": pairs,
        "separate_over_joint": t_separate / t_grid,
        "cache_over_inference": t_cache / t_inf_clean,
        "seconds": clock.work,
        "wall_seconds": clock.wall,
        "setup": {
            "model": "resnet18 width 16",
            "blocks": len(blocks),
            "samples": len(train),
            "epochs": e,
            "batch": 128,
            "grid": list(base.lrs),
            "val_fraction": base.val_fraction,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "autocast": "bf16" if device.type == "cuda" else "none",
            "channels_last": channels_last,
        },
    }
    targets = {"grid_over_inference": "<= 1.10", "single_over_inference": "<= 1.05",
               "single_standardized_over_inference": "(information)",
               "separate_over_joint": ">= 6", "cache_over_inference": "<= 1.5"}  # fmt: skip
    for key, target in targets.items():
        print(f"{key:34s} {result[key]:7.3f}   (target {target})")
    for key, value in result["seconds"].items():
        print(f"  {key:26s} {value:8.2f} s   (wall {result['wall_seconds'][key]:.2f} s)")
    print(f"  setup: {result['setup']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
