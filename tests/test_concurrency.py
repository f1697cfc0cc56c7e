"""Issue 14 "Concurrency": two `nclayers sweep` processes started together on sweep files
that share a run (noise rates [0.4, 0] and [0.4, 0.8]: both begin with the shared run)
finish with the shared run trained once, by one process, and every file of every run
folder readable and the same as a single sweep leaves it (tables and weights exact;
JSON files but for timings; figures byte for byte)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from killing import Child
from nclayers.jobs import RunFolder
from nclayers.jobs.folder import MANIFEST
from nclayers.jobs.sweep import load_sweep
from nclayers.table import Table
from tinyruns import leftovers, untimed, write_sweep

pytestmark = pytest.mark.usefixtures("one_thread")
STAGES = ["train", "analyze", "probe"]
NOISE = {"a": [0.4, 0.0], "b": [0.4, 0.8]}


def same_object(a, b) -> bool:
    """Equal but for timings, and for the checkpoint's checksum (its bytes hold the
    training's timings; its weights are compared as tensors)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        a, b = untimed(a), untimed(b) if isinstance(b, dict) else b
        if a.get("file") == "checkpoint.pt":
            a, b = {**a, "sha256": None}, {**b, "sha256": None}
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_object(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_object(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def readable(path: Path):
    """The file's contents as nclayers reads them."""
    if path.suffix == ".csv":
        return Table.from_csv(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    return path.read_bytes()


def test_two_sweeps_sharing_a_run_train_it_once(tmp_path):
    got, ref = tmp_path / "together", tmp_path / "one"
    files = {}
    for root in (got, ref):
        root.mkdir()
        files[root] = [write_sweep(root / f"{k}.yaml", root / "root", v, STAGES)
                       for k, v in NOISE.items()]  # fmt: skip
    # The reference: one process, one sweep after the other.
    for sweep_file in files[ref]:
        c = Child({"sweep": str(sweep_file)})
        c.finish()
    # Together: both started before either works.
    children = [Child({"sweep": str(f)}) for f in files[got]]
    for c in children:
        c.finish()

    ids = {f.stem: [r.id for r in load_sweep(f).runs] for f in files[got]}
    shared = ids["a"][0]
    assert shared == ids["b"][0] and len({*ids["a"], *ids["b"]}) == 3
    trained = [v for c in children for _, k, v in c.events if k == "stage" and v[0] == "train"]
    assert trained.count(("train", shared)) == 1, trained  # one process trained it
    log = (got / "root" / "runs" / shared / "train.log").read_text()
    assert log.count("epochs 1..2 of 2") == 1, log
    assert not leftovers(got / "root")

    for rid in {*ids["a"], *ids["b"]}:
        mine, theirs = got / "root" / "runs" / rid, ref / "root" / "runs" / rid
        names = sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if p.is_file())
        assert names == sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*")
                               if p.is_file()), rid  # fmt: skip
        folder = RunFolder(mine)
        cfg = folder.config()
        assert all(folder.status(s, cfg) == "done" for s in STAGES), rid
        for name in json.loads((mine / MANIFEST).read_text()):
            folder.verify(name)  # every file as it was written
        for name in names:
            if name in (MANIFEST, ".lock", "train.log"):  # checksums and lines of timings
                continue
            a, b = readable(mine / name), readable(theirs / name)
            assert same_object(a, b), f"run {rid}: {name} differs from a single sweep's"
    for sweep_file in files[got]:
        out, single = got / "root" / sweep_file.stem, ref / "root" / sweep_file.stem
        for name in ("layers.csv", "probe.csv", "memorization.csv"):
            assert Table.from_csv(out / name) == Table.from_csv(single / name), name
