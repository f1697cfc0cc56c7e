"""The cost of what one function adds to another, from torch.profiler's operator counts.

Wall and CPU clocks on a shared machine also measure the neighbours (consecutive
identical passes here differ by up to 20 %). The operators a run calls and their self CPU
times hardly move with other work, so `profiled_overhead(plain, analysed)` costs each
call `analysed` makes beyond `plain` at its operator's mean self CPU time:

    1 + sum over operators of (extra calls x mean self CPU time) / plain's self CPU time

a ratio that stays put when the clocks do not. Only this process's operators count: work
in DataLoader workers (decoding) is the same on both sides and left out of both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def profiled_overhead(plain: Callable[[], object], analysed: Callable[[], object]) -> float:
    """1 + (the self CPU time of the calls `analysed` makes beyond `plain`, each costed at
    its operator's mean) / (plain's self CPU time), from one profiled run of each."""
    runs = []
    for fn in (plain, analysed):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        runs.append({e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()})
    base, more = runs
    extra = 0.0
    for key, (total, calls) in more.items():
        added = calls - base.get(key, (0.0, 0))[1]
        if added > 0:
            extra += added * total / calls
    return 1.0 + extra / sum(t for t, _ in base.values())
