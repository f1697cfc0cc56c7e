"""Cost of per-sample reproducible corruption, as ratios measured in one run.

    python benchmarks/corrupt_cost.py --json bench_corrupt.json

`nclayers.data.corrupt` seeds one generator per sample (from the seed and the sample's
index), so an image is corrupted the same way in every subset, order and rank. The
baseline draws the whole chunk's noise from one generator (fast, but the noise of a
sample then depends on its position). Random uint8 images of CIFAR size.
Prints and writes, per corruption:
  seconds_per_50k          per-sample corruption of 50,000 images (extrapolated)
  per_sample_over_batched  (per-sample generators) / (one generator per chunk)
Each variant runs `--repeats` times, interleaved; the median time counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nclayers.data.corrupt import _KINDS, CORRUPTIONS, SEVERITY_CONSTANTS, corrupt


def batched(images: torch.Tensor, name: str, severity: int) -> torch.Tensor:
    """The same formula with one generator for all samples (not reproducible per sample)."""
    c = SEVERITY_CONSTANTS[name][severity - 1]
    draw, formula = _KINDS[name]
    flat = images.reshape(len(images), -1)
    x32 = flat.float() / 255.0
    draws = torch.empty((len(images), 2, flat.shape[1]) if name == "impulse_noise" else x32.shape)
    draw(x32, c, torch.Generator().manual_seed(0), draws)
    y = formula(flat.double() / 255.0, c, draws.double())
    return (y * 255.0).to(torch.uint8).reshape(images.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = torch.randint(0, 256, (args.samples, 3, 32, 32), dtype=torch.uint8)
    results = {}
    for name in CORRUPTIONS:
        times: dict[str, list[float]] = {"per_sample": [], "batched": []}
        for _ in range(args.repeats):
            for variant, fn in (("per_sample", corrupt), ("batched", batched)):
                t0 = time.perf_counter()
                fn(images, name, args.severity)
                times[variant].append(time.perf_counter() - t0)
        per, bat = (statistics.median(times[k]) for k in ("per_sample", "batched"))
        results[name] = {
            "seconds_per_50k": per * 50_000 / args.samples,
            "per_sample_over_batched": per / bat,
        }
        print(f"{name:<15} {results[name]['seconds_per_50k']:7.1f} s per 50,000 images; "
              f"per-sample / batched = {per / bat:.2f}")  # fmt: skip
    out = {"samples": args.samples, "threads": torch.get_num_threads(), "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
