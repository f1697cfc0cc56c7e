"""nclayers: per-layer neural collapse of classifiers.

>>> import nclayers
>>> table = nclayers.analyze(model, loader, num_classes=10)   # every block, one pass
>>> probes = nclayers.probe(model, train, test, num_classes=10)  # a linear probe per block
>>> nclayers.metrics.nc1(features, labels)                    # in-memory arrays

The names below load on first use, so `import nclayers` (and `nclayers --help`) does not
import torch. Importing it changes nothing process-wide (no environment variable,
no allocator or thread setting): huge pages for PyTorch's CPU allocator are the user's
choice, `THP_MEM_ALLOC_ENABLE=1` in the environment (see the README's Benchmarks).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"


_LAZY = {
    "analyze": "nclayers.analysis",
    "probe": "nclayers.probing",
    "ProbeSettings": "nclayers.config",
    "ClassStats": "nclayers.metrics",
    "nc1": "nclayers.metrics",
    "nc2": "nclayers.metrics",
    "build_model": "nclayers.models",
    "find_blocks": "nclayers.models",
    "list_models": "nclayers.models",
    "Table": "nclayers.table",
    "NCLayersError": "nclayers.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nclayers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
