"""Sweeps on a real Slurm cluster through submitit: one job array, every run's stages done,
the same tables as a local sweep; a running task requeued with `scontrol requeue` goes on
from its checkpoint. `.ci/run` starts a one-node cluster (`.ci/slurm-up.sh`) where it can;
these tests skip where none answers."""

from __future__ import annotations

import itertools
import math
import re
import shutil
import subprocess
import time

import pytest
import torch

from nclayers.cli import main
from nclayers.jobs.folder import CHECKPOINT, RunFolder
from nclayers.jobs.launch import run_sweep, submit_slurm, wait_for
from nclayers.jobs.sweep import load_sweep
from nclayers.table import Table
from test_sweep import write_sweep


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=20).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return any(s.strip() in ("idle", "mixed", "allocated") for s in out.splitlines())


pytestmark = [
    pytest.mark.skipif(not _cluster_up(), reason="no Slurm cluster answers (.ci/slurm-up.sh)"),
    pytest.mark.usefixtures("one_thread"),
]
SLURM = ["slurm.partition=debug", "slurm.cpus_per_run=1", "slurm.time_min=20",
         "slurm.array_parallelism=2"]  # fmt: skip


def _keyed(table: Table) -> list[tuple]:
    return sorted((r["noise"], r["split"], r["view"], r["layer"], r["nc1"], r["nc2"])
                  for r in table)  # fmt: skip


def test_sweep_on_slurm_equals_the_local_sweep(tmp_path, capsys):
    path = write_sweep(tmp_path, stages=["train", "analyze"])
    assert main(["sweep", str(path), "--launcher", "slurm", *SLURM]) == 0, capsys.readouterr().err
    sweep = load_sweep(path, SLURM)
    # While it waits, the sweep says each task's Slurm state when it changes.
    out = capsys.readouterr().out
    for run in sweep.runs:
        states = re.findall(rf"run {run.index} \(Slurm job \d+_{run.index}\): (\w+)", out)
        assert states and "RUNNING" in states, out
        assert all(a != b for a, b in itertools.pairwise(states)), out
    submissions = sorted((sweep.out / "slurm").glob("*/*_submission.sh"))
    assert len(submissions) == 1  # one array job for every run
    script = submissions[0].read_text()
    assert f"#SBATCH --array=0-{len(sweep.runs) - 1}%2" in script
    assert "#SBATCH --partition=debug" in script and "#SBATCH --signal=USR2@90" in script
    runs = Table.from_csv(sweep.out / "runs.csv")
    assert all(r["train"] == "done" and r["analyze"] == "done" for r in runs)
    slurm_layers = Table.from_csv(sweep.out / "layers.csv")

    (tmp_path / "local").mkdir()
    local = write_sweep(tmp_path / "local", stages=["train", "analyze"])
    run_sweep(load_sweep(local), progress=False)
    local_layers = Table.from_csv(tmp_path / "local" / "root" / "tiny" / "layers.csv")
    assert _keyed(slurm_layers) == _keyed(local_layers)  # CPU training is deterministic


def test_a_request_no_node_can_satisfy_is_refused_naming_the_key(tmp_path, capsys):
    """Slurm would keep such an array pending forever (reason PartitionConfig)."""
    path = write_sweep(tmp_path, stages=["train"])
    node = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%c|%m"],
                          capture_output=True, text=True, check=True).stdout.split()[0]  # fmt: skip
    cpus, mem_mb = (int(v.rstrip("+")) for v in node.split("|"))
    asked = {"slurm.cpus_per_run": cpus + 1, "slurm.mem_gb": mem_mb // 1024 + 2,
             "slurm.gpus_per_run": 64}  # fmt: skip
    for key, value in asked.items():
        line = f"{key}={value}"
        assert main(["sweep", str(path), "--launcher", "slurm", *SLURM, line, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"nclayers sweep: error: {key}=")
        assert "partition 'debug'" in err and f"set {key} to at most" in err
    assert main(["sweep", str(path), "--launcher", "slurm", *SLURM, "slurm.partition=nope"]) == 2
    assert "slurm.partition='nope': no such partition" in capsys.readouterr().err
    assert not (tmp_path / "root" / "tiny" / "slurm").exists()  # nothing was submitted


def _kill_wait() -> float:
    """Seconds Slurm waits between a job's SIGTERM and its SIGKILL (30 unless configured)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                         timeout=30).stdout  # fmt: skip
    found = re.search(r"^KillWait\s*=\s*(\d+)", out, re.MULTILINE)
    return float(found.group(1)) if found else 30.0


def test_a_requeued_task_continues_from_its_checkpoint(tmp_path):
    # `scontrol requeue` sends SIGTERM, which the task outlives for KillWait seconds: the
    # run must last longer than that after the requeue, or it finishes before the kill.
    # An epoch timed here sizes it (twice KillWait of epochs after the requeue at epoch 2).
    long = {"data.train_subset": 600, "model.width": 8}
    from nclayers.config import load_config
    from nclayers.jobs.train import train_job

    one = load_config(None, [f"{k}={v}" for k, v in {**_tiny(), **long}.items()] + [
        "train.epochs=1"])  # fmt: skip
    t0 = time.perf_counter()
    train_job(one, tmp_path / "timing", progress=False)
    epoch_s = time.perf_counter() - t0
    epochs = max(8, 4 + math.ceil(2 * _kill_wait() / epoch_s))
    long["train.epochs"] = epochs
    path = write_sweep(tmp_path, stages=["train"], figure=None, report=False,
                       axes={"noise": [{"label": "r=0%", "data.noise": 0.0}]},
                       config={**_tiny(), **long})  # fmt: skip
    sweep = load_sweep(path, SLURM)
    (job,) = submit_slurm(sweep)
    folder = RunFolder(sweep.runs[0].folder)
    _wait_for(lambda: folder.exists(CHECKPOINT) and _epoch(folder) >= 2, 300)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=30)
    wait_for(sweep, [job])
    log = folder.file("train.log").read_text()
    starts = [line for line in log.splitlines() if "epochs" in line and f"of {epochs}" in line]
    assert len(starts) >= 2 and not starts[-1].endswith(f"epochs 1..{epochs} of {epochs}"), log
    assert folder.status("train", sweep.runs[0].config) == "done"
    # The same weights as an uninterrupted run (exact resume on CPU).
    whole = train_job(sweep.runs[0].config, tmp_path / "whole", progress=False)
    requeued = torch.load(folder.file(CHECKPOINT), weights_only=True)["model"]
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, requeued[key]), key


def _tiny() -> dict:
    from test_sweep import TINY

    return dict(TINY)


def _epoch(folder: RunFolder) -> int:
    try:
        return int(torch.load(folder.file(CHECKPOINT), weights_only=True)["epoch"])
    except Exception:  # being written
        return 0


def _wait_for(condition, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"not reached within {seconds} s")
