"""Issue 17's damage test: every file a run folder can hold, damaged four ways (cut at a
third, at two thirds, by its last byte; its bytes replaced by random ones of the same
length), then every verb that reads it. Each outcome is either the correct result (the
tables the verb writes equal those it writes from the undamaged folder, exactly: CPU) or
exit status 2 with one line on stderr that names the damaged file, the folder left as it
was. A damaged cache (probe_state.pt) is dropped, said, and the probe starts over.

One complete tiny run folder is built once through a sweep of all six stages (digits,
40% shuffled labels, NC tracked every epoch), then `report`; a second copy holds a
probe_state.pt left by a probe interrupted after its first epoch."""

from __future__ import annotations

import base64
import io
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nclayers.cli import main
from nclayers.jobs import RunFolder, probe_job
from nclayers.jobs.folder import MANIFEST, PROBE_STATE
from nclayers.table import Table
from tinyruns import ALL_STAGES, history, leftovers, same_weights, tables_of, write_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

# verb -> (its command line, RUN and SWEEP filled in; the files whose tables must equal)
VERBS = {
    "analyze": (["analyze", "{run}", "-q"], ["layers.csv"]),
    "probe": (["probe", "{run}", "-q"], ["probe.csv", "layers.csv"]),
    "memorization": (["memorization", "{run}", "-q"],
                     ["memorization.csv", "memorization_layers.csv"]),
    "equality": (["equality", "{run}", "-q"], ["equality.csv"]),
    "prune": (["prune", "{run}", "--blocks", "1", "-q"], ["prune.csv", "prune_layers.csv"]),
    "prune-plateau": (["prune", "{run}", "--blocks", "plateau", "-q"],
                      ["prune.csv", "prune_layers.csv"]),
    "report": (["report", "{run}"], []),
    "train": (["train", "{run}", "--resume", "train.epochs=3", "-q"], ["nc_dynamics.csv"]),
    "sweep": (["sweep", "{sweep}", "-q"], []),
    "collect": (["sweep", "{sweep}", "--collect", "-q"], []),
}  # fmt: skip
EVERY = [
    "analyze",
    "probe",
    "memorization",
    "equality",
    "prune",
    "report",
    "train",
    "sweep",
    "collect",
]
# file -> the verbs that read it (or write over it after reading the folder)
READERS = {
    "config.yaml": EVERY,
    "stages.json": EVERY,
    "manifest.json": EVERY,
    "checkpoint.pt": ["analyze", "probe", "memorization", "prune", "train", "sweep"],
    "train_summary.json": ["report", "sweep", "collect"],
    "train.log": ["train"],
    "nc_dynamics.csv": ["train", "report"],
    "layers.csv": ["analyze", "probe", "equality", "prune-plateau", "report", "sweep", "collect"],
    "summary.json": ["analyze", "probe", "memorization", "report", "sweep"],
    "measurements.json": ["analyze", "probe", "memorization", "report", "sweep", "collect"],
    "measurements/analyze-????????????.csv": ["analyze", "equality", "report", "sweep", "collect"],
    "measurements/probe-????????????.csv": ["probe", "report", "sweep", "collect"],
    "probe.csv": ["report", "sweep", "collect"],
    "probe_heads.pt": ["probe", "report"],
    "probe_state.pt": ["probe"],
    "memorization.csv": ["memorization", "report", "sweep", "collect"],
    "memorization_layers.csv": ["memorization", "report"],
    "equality.csv": ["equality", "report"],
    "equality.json": ["equality", "prune-plateau", "report"],
    "equality.png": ["report"],
    "prune.csv": ["prune", "equality", "report"],
    "prune_layers.csv": ["prune", "report"],
    "prune.png": ["report"],
    # the report draws its own figures (figures/<stem>-<hash>.png) from the rows it shows
    "probe_acc.png": [],
    "memorization.png": [],
    "report.html": ["report"],
}
DAMAGES = ("cut-third", "cut-two-thirds", "cut-last-byte", "random-bytes")


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    n = len(data)
    cut = {"cut-third": n // 3, "cut-two-thirds": 2 * n // 3, "cut-last-byte": n - 1}
    if how in cut:
        path.write_bytes(data[: cut[how]])
    else:
        path.write_bytes(random.Random(f"{path.name}/{how}").randbytes(n))


@dataclass
class Built:
    root: Path  # the sweep's root: runs/<id>/ and the sweep's own folder
    run_id: str
    interrupted: Path  # a copy whose probe was interrupted after epoch 1 (probe_state.pt)

    def run(self, root: Path) -> Path:
        return root / "runs" / self.run_id


class _Interrupt(Exception):
    pass


class _StopAfterProbeState(RunFolder):
    """A run folder whose probe is 'killed' right after its first probe_state.pt."""

    def save_torch(self, name, obj):
        path = super().save_torch(name, obj)
        if name == PROBE_STATE:
            raise _Interrupt
        return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("damage")
    root = tmp / "root"
    sweep = write_sweep(tmp / "build.yaml", root, [0.4], ALL_STAGES)
    assert main(["sweep", str(sweep), "-q"]) == 0
    (run,) = (root / "runs").iterdir()
    assert main(["report", str(run)]) == 0
    interrupted = tmp / "interrupted"
    shutil.copytree(root, interrupted)
    folder = _StopAfterProbeState(interrupted / "runs" / run.name)
    with pytest.raises(_Interrupt):
        probe_job(folder.config(), folder, progress=False)
    assert (folder.path / PROBE_STATE).is_file()
    return Built(root, run.name, interrupted)


def copy_root(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def invoke(verb: str, root: Path, built: Built, capsys) -> tuple[int, str, str]:
    sweep = write_sweep(root.parent / f"{root.name}.yaml", root, [0.4], ALL_STAGES)
    args = [a.format(run=built.run(root), sweep=sweep) for a in VERBS[verb][0]]
    capsys.readouterr()
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def outcome(verb: str, root: Path, built: Built) -> dict:
    """What a verb leaves that must equal the undamaged folder's."""
    run = built.run(root)
    got: dict = {
        name: Table.from_csv(run / name) for name in VERBS[verb][1] if (run / name).is_file()
    }
    if verb == "train":
        got["history"] = history(run / "train_summary.json")
    if verb in ("sweep", "collect"):
        got.update(tables_of(root / root.name))  # the sweep's gathered tables
        got["runs.csv"] = [{k: v for k, v in r.items() if k not in ("train_seconds", "folder")}
                           for r in Table.from_csv(root / root.name / "runs.csv")]  # fmt: skip
    return got


@pytest.fixture(scope="module")
def reference(built, tmp_path_factory):
    """Per verb: its return code and results on an undamaged copy (computed when needed)."""
    cache: dict = {}
    tmp = tmp_path_factory.mktemp("reference")

    def get(verb: str, capsys):
        if verb not in cache:
            root = copy_root(built.root, tmp / verb.replace("-", "_"))
            rc, _, err = invoke(verb, root, built, capsys)
            assert rc == 0, err
            cache[verb] = (outcome(verb, root, built), built.run(root))
        return cache[verb]

    return get


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # fmt: skip


def inlined_images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def whole_png(data: bytes) -> bool:
    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).load()
    except Exception:
        return False
    return True


CASES = [(name, how) for name in READERS for how in DAMAGES]


@pytest.mark.parametrize(("name", "how"), CASES, ids=[f"{n}-{h}" for n, h in CASES])
def test_a_damaged_file_is_named_or_recovered(built, reference, name, how, tmp_path, capsys):
    source = built.interrupted if name == PROBE_STATE else built.root
    for verb in READERS[name]:
        root = copy_root(source, tmp_path / verb.replace("-", "_"))
        run = built.run(root)
        path = next(run.glob(name), run / name)  # a measurement's name holds its key
        assert path.is_file(), f"the complete folder holds no {name}"
        damage(path, how)
        before = snapshot(run)
        rc, out, err = invoke(verb, root, built, capsys)
        where = f"{name} {how}, `nclayers {verb}`"
        assert "Traceback" not in err, f"{where}: a traceback\n{err}"
        assert not leftovers(root), f"{where}: temporary files left"
        if rc == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1, f"{where}: not one line\n{err}"
            assert str(path) in lines[0], f"{where}: the error does not name the file\n{err}"
            if name != MANIFEST:
                assert snapshot(run) == before, f"{where}: refused, but the folder changed"
            continue
        if (
            verb in ("sweep", "collect") and rc == 1
        ):  # stages failed and were recorded, one line each
            assert str(path) in err, f"{where}: the sweep's errors do not name the file\n{err}"
            continue
        assert rc == 0, f"{where}: exit status {rc}\n{err}"
        expected, ref_run = reference(verb, capsys)
        got = outcome(verb, root, built)
        for key in expected:
            assert got.get(key) == expected[key], f"{where}: {key} differs from the undamaged run's"
        if verb == "train":
            assert same_weights(run / "checkpoint.pt", ref_run / "checkpoint.pt"), where
        if verb == "report":
            html = (run / "report.html").read_text()
            images = inlined_images(html)
            assert images and all(whole_png(i) for i in images), f"{where}: a broken figure"
            if name.endswith(".png") and not whole_png(path.read_bytes()):
                assert name in html, f"{where}: the damaged figure left out without a word"
        if name == PROBE_STATE:
            said = out + err  # a damaged cache is a warning (stderr)
            assert "probe_state.pt" in said and "starting over" in said, where


def test_a_rewrite_within_one_clock_tick_is_not_taken_for_damage(tmp_path):
    """File times are coarse (a kernel tick): a file rewritten with as many bytes within
    one tick keeps its modification time, and the checksum remembered for the old
    contents must not be used for the new ones."""
    import os

    folder = RunFolder(tmp_path)
    folder.write("t.csv", "run,x\n,1\n")
    old = (tmp_path / "t.csv").stat()
    assert folder.read_table("t.csv")[0]["x"] == 1  # checked: its checksum is remembered
    folder.write("t.csv", "run,x\n,2\n")
    os.utime(tmp_path / "t.csv", ns=(old.st_atime_ns, old.st_mtime_ns))  # the same tick
    assert folder.read_table("t.csv")[0]["x"] == 2
