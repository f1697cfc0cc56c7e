"""Tiny digits runs and folder comparisons shared by the robustness tests (damage, kill,
concurrency): one sweep file writer, the files a run folder holds, and "the same result"
(tables exact, weights exact, JSON without its timings)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from nclayers.table import Table

# A width-4 ResNet18 on 100 + 100 digits, 2 epochs; every stage within a second or two.
TINY = {
    "data.name": "digits", "data.train_subset": 100, "data.test_subset": 100,
    "model.name": "resnet18", "model.width": 4, "train.epochs": 2, "train.batch_size": 50,
    "train.lr": 0.05, "train.schedule": "constant", "train.augment": False,
    "train.checkpoint_every": 1, "train.tensorboard": False, "train.track_nc_every": 1,
    "train.track_nc_samples": 50, "device": "cpu", "analyze.batch_size": 100,
    "probe.epochs": 2, "probe.milestones": [], "probe.augment": False,
    "prune.seeds": [0], "prune.baselines": ["last"], "prune.blocks": [1],
}  # fmt: skip
ALL_STAGES = ["train", "analyze", "probe", "memorization", "prune", "equality"]
TIMING_KEYS = {"seconds", "epoch_seconds", "img_per_s", "train_seconds", "finished", "id",
               "inputs", "seconds_per_epoch", "train_time", "device"}  # fmt: skip


def write_sweep(path: Path, root: Path, noise: list[float], stages=ALL_STAGES, **spec) -> Path:
    doc = {
        "name": path.stem,
        "root": str(root),
        "config": TINY,
        "axes": {"noise": [{"label": f"r={r:g}", "data.noise": r} for r in noise]},
        "stages": list(stages),
        "report": False,
        **spec,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def trained_run(tmp_path_factory, name: str, overrides: list[str], *, analyze: bool = False):
    """A run folder (`name`/run in a fresh temporary folder) trained from the config
    `overrides`, and analysed too with `analyze`, on one CPU thread (the thread count
    restored after): a test module's shared run."""
    from nclayers.config import load_config
    from nclayers.jobs import analyze_job, train_job

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp(name) / "run"
        cfg = load_config(None, overrides)
        train_job(cfg, out, progress=False)
        if analyze:
            analyze_job(cfg, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def tables_of(folder: Path) -> dict[str, Table]:
    """Every CSV below `folder` (relative name -> table)."""
    return {
        str(p.relative_to(folder)): Table.from_csv(p)
        for p in sorted(folder.rglob("*.csv"))
        if "status" not in p.parts
    }


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def untimed(obj):
    """A JSON object without the values that differ between identical runs (timings,
    dates, stage ids, absolute folders)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def history(train_summary: Path) -> list[dict]:
    return untimed(json.loads(train_summary.read_text())["history"])


def leftovers(root: Path) -> list[Path]:
    """Temporary files a write left behind (a kill between writing and renaming)."""
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp"))
