"""Kill tests (issue 17 "a second test kills each stage at random moments", issue 14
"Interruption"): a stage, or a whole sweep, is killed with SIGKILL and run again; the
folder then equals an uninterrupted run's: the same tables, the same weights (exact:
CPU), the same files (nothing torn, no temporary file), every stage done.

Each stage is killed at 10 moments spread over its measured duration (seeded), and at
three writes: its main file's, before the rename and after it but before manifest.json
records the file's checksum; and stages.json's, right after the stage is marked done.
The sweep (2 runs; train, analyze, probe) is killed 10 times in a row, restarted each
time: inside training (twice in a row, so the second kill lands in the resumed
training), analysis and probe of both runs, and at CSV writes (one of them the
gathering's), then run to its end."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from killing import Child, kill_after, kill_at_write, timed
from nclayers.config import compose
from nclayers.jobs import RunFolder
from nclayers.jobs.sweep import load_sweep, stage_jobs
from tinyruns import ALL_STAGES, TINY, history, leftovers, same_weights, tables_of, write_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

KILLS = 10
CONFIG = compose({**TINY, "data.noise": 0.4})
# The file whose write each stage is killed at (the n-th time it is renamed into place).
MAIN_FILE = {"train": ("checkpoint.pt", 2), "analyze": ("layers.csv", 1),
             "probe": ("probe.csv", 1), "memorization": ("memorization.csv", 1),
             "prune": ("prune.csv", 1), "equality": ("equality.csv", 1)}  # fmt: skip


def task(stage: str, folder: Path) -> dict:
    return {"stage": stage, "folder": str(folder), "config": CONFIG.to_dict()}


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != ".lock")  # fmt: skip


def assert_same_run(got: Path, ref: Path, stages, what: str) -> None:
    assert not leftovers(got), f"{what}: temporary files left: {leftovers(got)}"
    assert files(got) == files(ref), f"{what}: other files than an uninterrupted run's"
    assert tables_of(got) == tables_of(ref), f"{what}: tables differ"
    if (ref / "checkpoint.pt").is_file():
        assert same_weights(got / "checkpoint.pt", ref / "checkpoint.pt"), f"{what}: weights"
        assert history(got / "train_summary.json") == history(ref / "train_summary.json"), what
    for name in ("equality.json",):
        if (ref / name).is_file():
            assert json.loads((got / name).read_text()) == json.loads((ref / name).read_text())
    folder = RunFolder(got)
    cfg = folder.config()
    for stage in stages:
        assert folder.status(stage, cfg) == "done", f"{what}: {stage} {folder.status(stage, cfg)}"


def rerun(stage: str, folder: Path) -> None:
    """Run the stage again the sweep's way (`run_one`): under the folder's lock, unless it
    is done and up to date."""
    f = RunFolder(folder)
    with f.lock():
        if f.status(stage, CONFIG) != "done":
            stage_jobs()[stage](CONFIG, f, progress=False)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Per stage: the folder before it (the earlier stages done), the folder after it ran
    uninterrupted in a child, and how long it took there."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("chain")
    before = tmp / "empty"
    out = {}
    for stage in ALL_STAGES:
        after = tmp / stage
        if before.exists():
            shutil.copytree(before, after)
        seconds, _ = timed(task(stage, after))
        out[stage] = (before, after, seconds)
        before = after
    return out


def fresh(before: Path, dest: Path) -> Path:
    if before.exists():
        shutil.copytree(before, dest)
    return dest


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_a_killed_stage_run_again_equals_an_uninterrupted_one(chain, stage, tmp_path):
    before, reference, seconds = chain[stage]
    done = ALL_STAGES[: ALL_STAGES.index(stage) + 1]
    rng = random.Random(f"kill {stage}")
    moments = [seconds * (i + rng.random()) / KILLS for i in range(KILLS)]
    name, nth = MAIN_FILE[stage]
    writes = [("before", name, nth), ("after", name, nth), ("after", "stages.json", 1)]
    kills = [("after", m) for m in moments] + [("write", w) for w in writes]
    for i, (how, when) in enumerate(kills):
        folder = fresh(before, tmp_path / f"kill{i}")
        if how == "after":
            what = kill_after(task(stage, folder), when)
        else:
            what = kill_at_write(task(stage, folder), when)
        what = f"{stage} {what} (of {seconds:.2f} s)"
        try:
            rerun(stage, folder)
        except Exception as err:
            raise AssertionError(f"{what}: running it again failed: {err}") from err
        assert_same_run(folder, reference, done, what)


# ----------------------------------------------------------------------------- a sweep
ORDER = [("train", 0), ("analyze", 0), ("probe", 0), ("train", 1), ("analyze", 1),
         ("probe", 1), ("collect", None)]  # fmt: skip
PLAN = [("train", 0), ("train", 0), ("analyze", 0), ("probe", 0),
        ("before", "layers.csv", 1), ("train", 1), ("analyze", 1), ("probe", 1),
        ("after", "probe.csv", 1), ("before", "tiny/layers.csv", 1)]  # fmt: skip


def phases(events, ids) -> dict:
    """How long each (stage, run index) took in an uninterrupted sweep."""
    starts = [(t, v) for t, k, v in events if k == "stage"] + [(events[-1][0], None)]
    index = {rid: i for i, rid in enumerate(ids)}
    return {(name, index.get(rid)): b[0] - t
            for (t, (name, rid)), b in itertools.pairwise(starts)}  # fmt: skip


def kill_in_phase(sweep_file: Path, target, ids, durations, rng) -> str:
    """Start the sweep; once it reaches `target` (or a later phase: earlier kills may have
    finished it), kill it a random moment into that phase."""
    c = Child({"sweep": str(sweep_file)})
    rank = ORDER.index(target)

    def reached(kind, value) -> bool:
        if kind != "stage":
            return False
        name, rid = value
        return ORDER.index((name, ids.index(rid) if rid else None)) >= rank

    if not c.wait_for(reached):
        c.kill()
        return f"the sweep ended before {target}"
    phase = c.events[-1][2]
    wait = rng.uniform(0, durations[target])
    where = f"{wait:.2f} s into {phase}"
    if c.conn.poll(wait):  # the phase ended sooner than it did uninterrupted: kill now
        kind, value = c.next()
        where = f"as {value} began" if kind == "stage" else f"never: the sweep {kind}"
    c.kill()
    return f"killed {where}" if not where.startswith("never") else where


def test_a_sweep_killed_ten_times_ends_as_an_uninterrupted_one(tmp_path):
    stages = ["train", "analyze", "probe"]
    (tmp_path / "ref").mkdir()
    (tmp_path / "got").mkdir()
    ref = write_sweep(tmp_path / "ref" / "tiny.yaml", tmp_path / "ref" / "root", [0.0, 0.4],
                      stages)  # fmt: skip
    got = write_sweep(tmp_path / "got" / "tiny.yaml", tmp_path / "got" / "root", [0.0, 0.4],
                      stages)  # fmt: skip
    _, events = timed({"sweep": str(ref)})
    ids = [r.id for r in load_sweep(ref).runs]
    durations = phases(events, ids)
    rng = random.Random("kill a sweep")
    happened = []
    for step in PLAN:
        if step[0] in ("before", "after"):
            happened.append(kill_at_write({"sweep": str(got)}, step))
        else:
            happened.append(kill_in_phase(got, step, ids, durations, rng))
    assert all(h.startswith("killed") for h in happened), "\n".join(happened)
    timed({"sweep": str(got)})
    what = "; ".join(happened)
    ref_root, got_root = ref.parent / "root", got.parent / "root"
    assert not leftovers(got_root), f"temporary files left: {leftovers(got_root)} ({what})"
    for name in ("layers.csv", "probe.csv", "memorization.csv"):
        assert tables_of(got_root / "tiny")[name] == tables_of(ref_root / "tiny")[name], name
    for rid in ids:
        assert_same_run(got_root / "runs" / rid, ref_root / "runs" / rid, stages, what)
