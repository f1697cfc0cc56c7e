"""NC1's class-mean distances at K = 1000 on the CPU: exact differences against the Gram.

    python benchmarks/nc1_distances.py

For K = 1000 means of width D = 2048 (one block, one labels view) it times
`torch.cdist` without the matrix-product shortcut (exact differences, what an accelerator
uses) and `metrics.square_distances` from the Gram matrix nc2 computes anyway, and prints
their ratio and the largest relative difference between the two.
"""

from __future__ import annotations

import time

import torch

from nclayers.metrics import square_distances


def main(k: int = 1000, d: int = 2048, repeats: int = 3) -> None:
    torch.manual_seed(0)
    means = torch.randn(1, k, d, dtype=torch.float64)
    centred = means - means.mean(1, keepdim=True)
    gram = centred @ centred.transpose(1, 2)
    runs = {
        "exact": lambda: torch.cdist(means, means, compute_mode="donot_use_mm_for_euclid_dist"),
        "gram": lambda: square_distances(means, gram),
    }
    best = {}
    for name, fn in runs.items():
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        best[name] = min(times)
    exact = runs["exact"]().square()
    off = ~torch.eye(k, dtype=torch.bool)
    rel = ((square_distances(means, gram) - exact).abs()[:, off] / exact[:, off]).max()
    print(f"K={k}, D={d}, {torch.get_num_threads()} threads, CPU seconds (fastest of "
          f"{repeats}): exact differences {best['exact']:.2f} s, from the Gram "
          f"{best['gram']:.3f} s: {best['exact'] / best['gram']:.0f}x; largest relative "
          f"difference {float(rel):.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
