"""nclayers: per-layer neural collapse of classifiers.

>>> import nclayers
>>> table = nclayers.analyze(model, loader, num_classes=10)   # every block, one pass
>>> probes = nclayers.probe(model, train, test, num_classes=10)  # a linear probe per block
>>> nclayers.metrics.nc1(features, labels)                    # in-memory arrays
"""

from nclayers.analyze import analyze
from nclayers.metrics import ClassStats, nc1, nc2
from nclayers.models import build_model, find_blocks, list_models
from nclayers.probe import probe
from nclayers.report.table import Table

__version__ = "0.1.0"

__all__ = [
    "ClassStats",
    "Table",
    "analyze",
    "build_model",
    "find_blocks",
    "list_models",
    "nc1",
    "nc2",
    "probe",
]
