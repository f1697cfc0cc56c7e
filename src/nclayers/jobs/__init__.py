"""Jobs: the layer that owns run folders. Each job reads a config, calls the library
(`analyze`, `probe`, the training loop, ...) and writes its files through `RunFolder`;
the CLI verbs call these functions and nothing below them knows a path."""

from nclayers.jobs.analyze import analyze_run
from nclayers.jobs.common import build_from_config, load_model
from nclayers.jobs.folder import RunFolder
from nclayers.jobs.train import train_run

__all__ = ["RunFolder", "analyze_run", "build_from_config", "load_model", "train_run"]
