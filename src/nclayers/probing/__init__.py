"""Linear probes on every block at once (paper A.1): frozen backbone, a grid of heads per
block, the learning rate chosen per block on held-out training rows.

    heads     ProbeHeads (one linear classifier per block and lr) and GridSGD
    features  the frozen backbone with its taps; streamed or cached training features
    holdout   the held-out rows and the choice of each block's lr
    fit       `probe(...)`: the fit loop
    result    ProbeResult, scoring, saving the heads, the underfit check
"""

from nclayers.config import ProbeSettings
from nclayers.probing.fit import probe
from nclayers.probing.heads import GridSGD, ProbeHeads
from nclayers.probing.result import (
    UNDERFIT,
    ProbeResult,
    heads_state,
    load_heads,
    score_heads,
    underfit,
    underfit_note,
)

__all__ = [
    "UNDERFIT", "GridSGD", "ProbeHeads", "ProbeResult", "ProbeSettings", "heads_state",
    "load_heads", "probe", "score_heads", "underfit", "underfit_note",
]  # fmt: skip
