"""The cost of what one function adds to another, from torch.profiler's operator counts.

Wall and CPU clocks on a shared machine also measure the neighbours (consecutive
identical passes here differ by up to 20 %). The operators a run calls and their self CPU
times hardly move with other work, so `profiled_overhead(plain, analysed)` costs each
call `analysed` makes beyond `plain` at the mean self CPU time of its operator with the
same input shapes:

    1 + sum over (operator, shapes) of (extra calls x mean self CPU time) / plain's time

a ratio that stays put when the clocks do not. Shapes matter: `aten::sum` over a
64 x 256 x 56 x 56 block output and over 64 labels are different costs, and costed at
one mean the small extra calls would be charged as large ones. It counts the added
calls only, not what they do to the shared calls (caches, memory): that shows only on
the clocks. Only this process's operators count: work in DataLoader workers (decoding)
is the same on both sides and left out of both.
`operator_times`, `added_time` and `self_time` are its parts, for a caller that also
separates a fixed cost (e.g. the end-of-pass metrics) from the per-batch one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (operator, its input shapes) -> (self CPU microseconds, calls)
OperatorTimes = dict[tuple[str, str], tuple[float, int]]


def operator_times(fn: Callable[[], object]) -> OperatorTimes:
    """Each (operator, input shapes)'s total self CPU time and calls in one profiled fn()."""
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, record_shapes=True) as prof:
        fn()
    return {
        (e.key, str(e.input_shapes)): (e.self_cpu_time_total, e.count)
        for e in prof.key_averages(group_by_input_shape=True)
    }


def self_time(ops: OperatorTimes) -> float:
    """The self CPU microseconds of every operator together."""
    return sum(t for t, _ in ops.values())


def added_time(base: OperatorTimes, more: OperatorTimes) -> float:
    """Microseconds of the calls `more` makes beyond `base`, each at the mean of its
    operator with the same input shapes."""
    extra = 0.0
    for key, (total, calls) in more.items():
        added = calls - base.get(key, (0.0, 0))[1]
        if added > 0:
            extra += added * total / calls
    return extra


def profiled_overhead(plain: Callable[[], object], analysed: Callable[[], object]) -> float:
    """1 + (the self CPU time of the calls `analysed` makes beyond `plain`, each costed at
    its operator's mean) / (plain's self CPU time), from one profiled run of each."""
    base, more = operator_times(plain), operator_times(analysed)
    return 1.0 + added_time(base, more) / self_time(base)
