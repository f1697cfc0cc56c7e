"""`nclayers demo`: the whole story, offline, on the embedded digits, in a few CPU minutes.

Trains a width-16 CIFAR ResNet18 twice on 500 of scikit-learn's digits: with clean labels,
and with 40% of the training labels shuffled, in a set-up that fits the noisy labels
(no augmentation, AdamW, 12 epochs: the noisy run reaches 100% training accuracy on its
labels). Then measures every block on the training split (true and training labels) and
the test split, trains a short linear probe on every block, and writes layers.csv,
memorization.csv (Δ per block: above 1 in the last blocks, the memorization layers),
summary.json, the figures (demo.png: the paper's noisy-label layout) and report.html, and
says in words which blocks memorize.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nclayers.config import Config, load_config
from nclayers.jobs.analyze import analyze_job
from nclayers.jobs.folder import LAYERS, MEMORIZATION, SUMMARY, RunFolder
from nclayers.jobs.probe import probe_job
from nclayers.jobs.report import describe_memorization, write_report
from nclayers.jobs.train import train_job
from nclayers.memorization import memorization_layers, memorization_ratio
from nclayers.probing import underfit_note
from nclayers.report.figures import plot_layers, plot_layout, plot_metric
from nclayers.table import Table

# A set-up that fits 40% shuffled labels in 12 epochs on 2 CPU cores: a small training set
# (50 images per class), no augmentation, AdamW with a cosine schedule. With crop/flip
# augmentation and SGD the noisy run fits only part of its noisy labels and no block has
# Δ > 1; here the last blocks memorize, as in the paper's Figure 3.
DEMO_OVERRIDES = [
    "data.name=digits",
    "data.train_subset=500",
    "model.name=resnet18",
    "model.width=16",
    "train.epochs=12",
    "train.batch_size=32",
    "train.optimizer=adamw",
    "train.lr=0.002",
    "train.weight_decay=0.0005",
    "train.schedule=cosine",
    "train.min_lr=0.00002",
    "train.augment=false",
    "train.checkpoint_every=5",
    "train.tensorboard=false",
    "analyze.batch_size=500",
    # A short linear probe per block (the paper's is 10 epochs with crop and flip): features
    # computed once (no augmentation), 5 epochs, lr divided by 5 at epochs 3 and 4.
    "probe.epochs=5",
    "probe.milestones=[3, 4]",
    "probe.augment=false",
    "device=cpu",
]
NOISE = 0.4
log = logging.getLogger("nclayers.demo")


def demo_config(overrides: list[str] | tuple = ()) -> Config:
    return load_config(None, [*DEMO_OVERRIDES, *overrides])


def run_demo(
    out: str | Path = "runs/demo", overrides: list[str] | tuple = (), progress: bool = True
) -> dict:
    out = Path(out)
    folder = RunFolder(out)
    base = demo_config(overrides)
    t0 = time.perf_counter()
    tables, accuracy = [], {}
    for run, noise in (("clean", None), (f"noise{round(NOISE * 100)}", NOISE)):
        cfg = base.updated({"run": run, "data.noise": noise or 0})
        log.info(
            "[%s] training %s (width %s) on %s for %d epochs%s", run, cfg.model.name,
            cfg.model.width, cfg.data.name, cfg.train.epochs,
            f", {noise:.0%} labels shuffled" if noise else "",
        )  # fmt: skip
        sub = RunFolder(out / run)
        trained = train_job(cfg, sub, progress=progress, force=True)
        log.info("[%s] measuring every block", run)
        measured = analyze_job(cfg, sub, model=trained.model, progress=progress)
        log.info("[%s] linear probes on every block", run)
        probe_job(cfg, sub, model=trained.model, progress=progress)
        tables.append(sub.layers())  # the analysis rows, with probe_acc
        acc = measured.summary["accuracy"]
        accuracy[run] = {"train_" + v: a for v, a in acc["train"].items()} | {
            "test": acc["test"]["clean"]
        }
    layers = Table(r for t in tables for r in t)
    ratios = memorization_ratio(layers, split="train")
    figures = _figures(folder, layers, ratios)
    folder.write_table(LAYERS, layers)
    folder.write_table(MEMORIZATION, ratios)
    folder.save_config(base)  # the demo's own settings, before either run's changes
    summary = {
        "config": base.to_dict(),
        "runs": [t[0]["run"] for t in tables],
        "accuracy": accuracy,
        "memorization_layers": memorization_layers(ratios),
        "seconds": time.perf_counter() - t0,
    }
    folder.write_json(SUMMARY, summary)
    report = write_report(out)
    summary["text"] = _story(layers, ratios, summary, accuracy, figures, report, out)
    return summary


def _figures(folder: RunFolder, layers: Table, ratios: Table) -> list[Path]:
    """The demo's figures, written through the folder's store (atomic, checksummed)."""
    return folder.draw_all(lambda tmp: _draw(tmp, layers, ratios))


def _draw(out: Path, layers: Table, ratios: Table) -> list[Path]:
    labelled = Table({**r, "labels": _labels(r["run"])} for r in layers)
    figures = plot_layout(labelled, out / "demo", "noisy", curves="labels", memorization=Table(
        {**r, "labels": _labels(r["run"])} for r in ratios), formats=("png",),
        title="ResNet18 (width 16) on 500 digits: clean and 40% shuffled labels")  # fmt: skip
    figures += plot_layers(layers.where(split="test"), out)
    figures.append(plot_metric(ratios, "ratio", out / "memorization.png", group=("run",)))
    figures.append(
        plot_metric(layers.where(split="train"), "nc1", out / "nc1_train.png",
                    title="NC1 on the training images, by labels view")
    )  # fmt: skip
    return [f for f in figures if f]


def _story(layers, ratios, summary, accuracy, figures, report, out) -> str:
    """What the demo found, in words and tables, for the terminal."""
    test = layers.where(split="test", run="clean")
    lines = [
        "", "Clean model, test split, every block:",
        test.format(["layer", "block", "dim", "nc1", "nc2", "ncc_acc", "probe_acc", "probe_lr",
                     "probe_underfit"]),
        *([note] if (note := underfit_note(test)) else []), "",
        f"Noisy model ({NOISE:.0%} shuffled), training images, memorization ratio:",
        ratios.format(["layer", "block", "nc1_clean", "nc1_noisy", "ratio"]),
        "In words: " + describe_memorization(ratios, summary["memorization_layers"]), "",
        *(f"{run}: " + ", ".join(f"{k} acc {v:.3f}" for k, v in acc.items())
          for run, acc in accuracy.items()),
        f"Results in {out}/: layers.csv, memorization.csv, summary.json, "
        f"{', '.join(p.name for p in figures)}, {report.name}  ({summary['seconds']:.0f} s)",
    ]  # fmt: skip
    return "\n".join(lines)


def _labels(run: str) -> str:
    return "clean labels" if run == "clean" else f"{NOISE:.0%} shuffled"
