"""What a run folder holds, how its files are named, and which stages are finished.

Every job (train, analyze, probe, memorization, prune, sweep, demo) reads and writes a
run folder through `RunFolder`; the library functions below the jobs never see a path.

    run/
      config.yaml          the resolved config (written by the first stage that runs)
      checkpoint.pt        trained weights, optimiser and RNG states (train)
      train_summary.json   accuracies, history, timings (train)
      train.log            one line per epoch (train)
      nc_dynamics.csv      NC per block during training (train, when tracked)
      layers.csv           one row per (run, split, view, layer[, input]) (analyze, probe, ...)
      summary.json         configs, accuracies, timings of the analysis stages
      probe.csv            per-epoch probe loss/accuracy per block (probe)
      probe_heads.pt       the trained probe heads (probe)
      memorization.csv     per block NC1 clean/noisy and the ratio (memorization)
      prune.csv            accuracy and NC after pruning blocks (prune)
      report.html          the self-contained report (report)
      stages.json          finished stages, each with when and what it recorded
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nclayers.config import Config, load_config, save_config
from nclayers.errors import NCLayersError
from nclayers.table import Table

CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
TRAIN_SUMMARY = "train_summary.json"
TRAIN_LOG = "train.log"
DYNAMICS = "nc_dynamics.csv"
LAYERS = "layers.csv"
SUMMARY = "summary.json"
PROBE = "probe.csv"
PROBE_HEADS = "probe_heads.pt"
MEMORIZATION = "memorization.csv"
PRUNE = "prune.csv"
REPORT = "report.html"
STAGES = "stages.json"

# Columns that identify a row of layers.csv; other columns are measurements.
LAYER_KEYS = ("run", "split", "view", "input", "layer")


class RunFolder:
    """A run folder: file paths, the saved config, finished stages, layers.csv updates."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self.file(name).is_file()

    def mkdir(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # ----------------------------------------------------------------- config
    def save_config(self, cfg: Config) -> None:
        self.mkdir()
        save_config(cfg, self.file(CONFIG))

    def load_config(self, overrides: Sequence[str] = ()) -> Config:
        """The run's saved config, with `key=value` overrides; `out` is this folder."""
        if not self.exists(CONFIG):
            raise NCLayersError(
                f"{str(self.path)!r} is not a run folder (no {CONFIG}); pass a folder written "
                "by `nclayers train` or `nclayers analyze`, or a config file"
            )
        cfg = load_config(self.file(CONFIG), overrides)
        cfg.out = str(self.path)
        return cfg

    # ----------------------------------------------------------------- stages
    def stages(self) -> dict[str, dict]:
        if not self.exists(STAGES):
            return {}
        return json.loads(self.file(STAGES).read_text())

    def done(self, stage: str) -> bool:
        return stage in self.stages()

    def mark_done(self, stage: str, **info: Any) -> None:
        """Record a finished stage (atomically, so a kill never leaves half a file)."""
        stages = self.stages()
        stages[stage] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        self.write_json(STAGES, stages)

    def forget(self, *stages: str) -> None:
        """Mark stages unfinished (e.g. analysis after the model was trained further)."""
        current = self.stages()
        if any(s in current for s in stages):
            self.write_json(STAGES, {k: v for k, v in current.items() if k not in stages})

    # ----------------------------------------------------------------- files
    def write_json(self, name: str, obj: Any) -> Path:
        self.mkdir()
        path = self.file(name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
        return path

    def read_json(self, name: str) -> dict:
        return json.loads(self.file(name).read_text()) if self.exists(name) else {}

    def update_json(self, name: str, **values: Any) -> dict:
        """Merge top-level keys into a JSON file (summary.json is shared by the stages)."""
        obj = self.read_json(name)
        obj.update(values)
        self.write_json(name, obj)
        return obj

    def layers(self) -> Table:
        return Table.from_csv(self.file(LAYERS)) if self.exists(LAYERS) else Table()

    def upsert_layers(self, rows: Iterable[dict], keys: Sequence[str] = LAYER_KEYS) -> Table:
        """Merge rows into layers.csv: a row whose key columns match an existing row fills
        in its columns (e.g. `probe_acc` into the analyze rows); other rows are appended."""
        table = self.layers()

        def key(row: dict) -> tuple:
            return tuple(row.get(k) for k in keys)

        index = {key(r): r for r in table}
        for row in rows:
            old = index.get(key(row))
            if old is None:
                table.append(dict(row))
                index[key(row)] = table[-1]
            else:
                old.update({k: v for k, v in row.items() if v is not None})
        table.to_csv(self.file(LAYERS))
        return table

    def replace_layers(self, rows: Iterable[dict], **match: Any) -> Table:
        """Replace the rows matching `match` (e.g. split="train") by `rows`, keep the rest."""
        kept = [r for r in self.layers() if not all(r.get(k) == v for k, v in match.items())]
        table = Table([*kept, *rows])
        table.to_csv(self.file(LAYERS))
        return table
