"""Jobs: the layer that owns run folders. Each job is `job(cfg, folder, *, progress)`:
it reads its inputs from `folder` (and `cfg`), calls the library (`analyze`, `probe`,
the training loop, ...), writes only through `RunFolder`, and records its stage. The CLI
verbs and the sweep's stages call these functions; nothing below them knows a path.
"""

from nclayers.jobs.analyze import analyze_job
from nclayers.jobs.common import build_from_config, load_model
from nclayers.jobs.equality import equality_job
from nclayers.jobs.folder import RunFolder
from nclayers.jobs.memorization import memorization_job
from nclayers.jobs.probe import probe_job
from nclayers.jobs.prune import prune_job
from nclayers.jobs.train import train_job

__all__ = [
    "RunFolder",
    "analyze_job",
    "build_from_config",
    "equality_job",
    "load_model",
    "memorization_job",
    "probe_job",
    "prune_job",
    "train_job",
]
