"""`nclayers demo`: the whole job, offline, on the embedded digits, in a few CPU minutes.

Trains a width-16 CIFAR ResNet18 twice on scikit-learn's digits (clean labels, and with
20% of the training labels shuffled), measures every block on the training split (true
and training labels) and on the test split, and writes layers.csv, memorization.csv,
summary.json and the figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nclayers.config import Config, load_config, save_config
from nclayers.jobs.analyze import analyze_run
from nclayers.jobs.train import train_run
from nclayers.memorization import memorization_layers, memorization_ratio
from nclayers.report.figures import plot_layers, plot_metric
from nclayers.report.table import Table

DEMO_OVERRIDES = [
    "data.name=digits",
    "model.name=resnet18",
    "model.width=16",
    "train.epochs=12",
    "train.batch_size=64",
    "train.lr=0.05",
    "train.schedule=cosine",
    "train.min_lr=0.0005",
    "train.checkpoint_every=5",
    "analyze.batch_size=500",
    "device=cpu",
]
NOISE = 0.2


def demo_config(out: str | Path = "runs/demo", overrides: list[str] | tuple = ()) -> Config:
    return load_config(None, [*DEMO_OVERRIDES, f"out={out}", *overrides])


def run_demo(
    out: str | Path = "runs/demo", overrides: list[str] | tuple = (), progress: bool = True
) -> dict:
    out = Path(out)
    base = demo_config(out, overrides)
    t0 = time.perf_counter()
    tables, accuracy = [], {}
    for run, noise in (("clean", None), (f"noise{round(NOISE * 100)}", NOISE)):
        cfg = load_config(
            None, [f"out={out / run}", f"run={run}", f"data.noise={noise or 0}"], base
        )
        print(
            f"[{run}] training {cfg.model.name} (width {cfg.model.width}) on {cfg.data.name}"
            f" for {cfg.train.epochs} epochs" + (f", {noise:.0%} labels shuffled" if noise else "")
        )
        result = train_run(cfg, progress=progress)
        print(f"[{run}] measuring every block")
        table = analyze_run(cfg, model=result["model"], progress=progress)
        tables.append(table)
        accuracy[run] = {"train_" + v: a for v, a in table.meta["accuracy"]["train"].items()} | {
            "test": table.meta["accuracy"]["test"]["clean"]
        }

    layers = Table(r for t in tables for r in t)
    layers.to_csv(out / "layers.csv")
    ratios = memorization_ratio(layers, split="train")
    ratios.to_csv(out / "memorization.csv")
    figures = plot_layers(layers.where(split="test"), out)
    figures.append(plot_metric(ratios, "ratio", out / "memorization.png", group=("run",)))
    figures.append(
        plot_metric(layers.where(split="train"), "nc1", out / "nc1_train.png",
                    title="NC1 on the training images, by labels view")
    )  # fmt: skip
    save_config(base, out / "config.yaml")
    summary = {
        "config": base.to_dict(),
        "runs": [t.meta["config"]["run"] for t in tables],
        "accuracy": accuracy,
        "memorization_layers": memorization_layers(ratios),
        "seconds": time.perf_counter() - t0,
        "files": sorted(p.name for p in out.iterdir() if p.is_file()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    test = layers.where(split="test", run="clean")
    print()
    print("Clean model, test split, every block:")
    print(test.format(["layer", "block", "dim", "nc1", "nc2", "ncc_acc"]))
    print()
    print(f"Noisy model ({NOISE:.0%} shuffled), training images, memorization ratio:")
    print(ratios.format(["layer", "block", "nc1_clean", "nc1_noisy", "ratio"]))
    print()
    for run, acc in accuracy.items():
        print(f"{run}: " + ", ".join(f"{k} acc {v:.3f}" for k, v in acc.items()))
    print(
        f"Results in {out}/: layers.csv, memorization.csv, summary.json, "
        f"{', '.join(p.name for p in figures if p)}  ({summary['seconds']:.0f} s)"
    )
    return summary
