"""A seeded random driver over one tiny run folder: analyze, probe, memorization, plot,
memorization of a layers.csv, report and train --resume, with random block subsets, test
subsets, references and run names, called in-process. After every step, every value in
layers.csv equals a fresh measurement (made elsewhere, at the settings recorded for the
measurement its row names) of the block its row names, and a report holds no figure other
than those it drew from the rows it shows."""

from __future__ import annotations

import base64
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from nclayers.config import load_config
from nclayers.jobs import RunFolder, analyze_job, memorization_job, probe_job, train_job
from nclayers.jobs.folder import LAYERS
from nclayers.jobs.memorization import memorization_from_csv
from nclayers.jobs.report import plot_csv, write_report
from nclayers.table import Table
from tinyruns import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 200
SMALL = {**TINY, "data.train_subset": 60, "data.test_subset": 40, "train.epochs": 1,
         "data.noise": 0.4, "probe.epochs": 1, "model.width": 2}  # fmt: skip
ARGS = [f"{k}={v}" for k, v in SMALL.items() if not k.startswith("train.track")]
BLOCKS = [None, "layer4.*", "layer1.0,layer3.1", "layer2.1"]
SUBSETS = [None, 20]
REFERENCES = ["train", None]
NAMES = ["", "foo"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("machine") / "run"
    train_job(load_config(None, ARGS), out, progress=False)
    return out


class Driver:
    def __init__(self, run: Path, scratch: Path, seed: int) -> None:
        self.run, self.scratch, self.rng = run, scratch, random.Random(seed)
        self.folder = RunFolder(run)
        self.fresh: dict[tuple, dict] = {}  # (stage, key, weights) -> block -> values
        self.epochs = SMALL["train.epochs"]
        self.reports = 0

    def settings(self) -> dict:
        pick = self.rng.choice
        out = {"run": pick(NAMES)}
        if (blocks := pick(BLOCKS)) is not None:
            out["model.blocks"] = blocks
        if (subset := pick(SUBSETS)) is not None:
            out["data.test_subset"] = subset
        return out

    # ---------------------------------------------------------------- steps
    def analyze(self) -> None:
        cfg = self.folder.config().updated(
            {**self.settings(), "analyze.reference": self.rng.choice(REFERENCES)}
        )
        analyze_job(cfg, self.folder, progress=False)

    def probe(self) -> None:
        probe_job(self.folder.config().updated(self.settings()), self.folder, progress=False)

    def memorization(self) -> None:
        cfg = self.folder.config().updated({"run": self.rng.choice(NAMES)})
        memorization_job(cfg, self.folder, progress=False)

    def plot(self) -> None:
        if self.folder.exists(LAYERS):
            metric = self.rng.choice(["nc1", "nc2", "ncc_acc", "probe_acc"])
            plot_csv(self.run / LAYERS, split=self.rng.choice(["test", None]), metrics=[metric])

    def memorization_of_csv(self) -> None:
        layers = self.folder.layers() if self.folder.exists(LAYERS) else Table()
        if layers.where(split="train", view="noisy"):
            memorization_from_csv(self.run / LAYERS, split="train")

    def report(self) -> None:
        html = write_report(self.run).read_text()
        self.reports += 1
        drawn = {p.read_bytes() for p in (self.run / "figures").glob("*.png")}
        drawn |= {p.read_bytes() for p in self.run.glob("equality*.png")}
        drawn |= {p.read_bytes() for p in self.run.glob("prune*.png")}
        for image in re.findall(r'src="data:image/png;base64,([^"]+)"', html):
            assert base64.b64decode(image) in drawn, "the report embeds a figure it did not draw"
        if self.folder.exists(LAYERS):
            layouts = list((self.run / "figures").glob("layers-*.png"))
            assert len(layouts) == 1, layouts  # one drawing: of the rows shown now
            assert layouts[0].read_bytes() in {base64.b64decode(i) for i in re.findall(
                r'src="data:image/png;base64,([^"]+)"', html)}  # fmt: skip

    def train_more(self) -> None:
        self.epochs += 1
        cfg = self.folder.config().updated({"train.epochs": self.epochs})
        train_job(cfg, self.folder, progress=False, resume=True)

    # ---------------------------------------------------------------- the invariant
    def check(self) -> None:
        if not self.folder.exists(LAYERS):
            return
        layers = Table.from_csv(self.run / LAYERS)
        measured = self.folder.measurements()
        for row in layers:
            tags = dict(t.split("=") for t in row["measurement"].split())
            for stage, key in tags.items():
                record = measured[key]
                assert record["stage"] == stage
                values = self.fresh_values(stage, key, record)
                mine = values[(row["split"], row["view"], row.get("input") or "", row["block"])]
                cols = ("nc1", "nc2", "ncc_acc", "n") if stage == "analyze" else ("probe_acc",)
                for col in cols:
                    assert row.get(col) == mine.get(col), (stage, row["block"], col)
                assert row["layer"] == mine["layer"]

    def fresh_values(self, stage: str, key: str, record: dict) -> dict:
        weights = record["weights"]["sha256"]
        assert weights == self.folder.checkpoint_sha(), "a value of other weights is shown"
        if (stage, key, weights) not in self.fresh:
            checkpoint = self.scratch / f"{weights}.pt"
            if not checkpoint.exists():
                shutil.copy(self.run / "checkpoint.pt", checkpoint)
            out = self.scratch / f"{stage}-{key}-{weights[:8]}"
            cfg = load_config(None, ARGS).updated(
                {**record["settings"], "model.checkpoint": str(checkpoint)}
            )
            job = analyze_job if stage == "analyze" else probe_job
            job(cfg, out, progress=False)
            rows = RunFolder(out).measured_rows(stage)
            self.fresh[(stage, key, weights)] = {
                (r["split"], r["view"], r.get("input") or "", r["block"]): r for r in rows
            }
        return self.fresh[(stage, key, weights)]


# How often each step is drawn (the drawing steps are the dear ones: CI's share stays
# under a minute).
WEIGHTS = {"analyze": 6, "probe": 2, "memorization": 1, "plot": 1, "memorization_of_csv": 1,
           "report": 2, "train_more": 1}  # fmt: skip


def test_every_value_shown_is_a_fresh_measurement_of_its_block(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (tmp_path / "scratch").mkdir()
    driver = Driver(run, tmp_path / "scratch", seed=20261207)
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    done = []
    for step in range(STEPS):
        name = driver.rng.choices(names, weights)[0]
        if name == "train_more" and driver.epochs >= 3:
            name = "report"
        getattr(driver, name)()
        done.append(name)
        try:
            driver.check()
        except AssertionError as err:
            raise AssertionError(f"after step {step} ({' '.join(done[-8:])}): {err}") from err
    assert {"analyze", "probe", "report", "train_more"} <= set(done)
