"""Running a sweep: here, or elsewhere through submitit (one run per GPU of this machine,
or one Slurm job array), then gathering it (`run_sweep`).

Each run is a `SweepTask(index)`: it loads the sweep file again (in the submitting
directory, with the same overrides) and runs `run_one` for its run, which skips the
stages that are done and up to date and resumes an interrupted training from its
checkpoint. So a task can be started again at any time: on Slurm, a task that is
preempted or reaches its time limit is requeued by submitit (`Checkpointable`) and
continues where its run stopped; `scontrol requeue` of a running task does the same.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from nclayers.errors import NCLayersError
from nclayers.files import atomic_write, dumps_json
from nclayers.jobs.sweep import (
    Sweep,
    collect,
    load_sweep,
    out_lock,
    run_one,
    stage_failed,
    status_path,
    sweep_json,
)

log = logging.getLogger("nclayers.sweep")
POLL_S = 2.0
LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # a run on this machine is never cut off


def run_sweep(
    sweep: Sweep,
    launcher: str = "local",
    gpus: list[int] | None = None,
    progress: bool = True,
    collect_only: bool = False,
    wait: bool = True,
) -> dict:
    """Run the whole sweep (here, one run per GPU, or on Slurm), then gather, plot and
    report. Returns the gathered summary."""
    t0 = time.perf_counter()
    sweep.out.mkdir(parents=True, exist_ok=True)
    if not collect_only:
        if launcher == "slurm":
            jobs = submit_slurm(sweep)
            if not wait:
                return {"submitted": [j.job_id for j in jobs], "files": {}, "stages": {}}
            wait_for(sweep, jobs)
        elif gpus:
            run_on_gpus(sweep, gpus)
        else:
            for run in sweep.runs:
                run_one(sweep, run.index, progress)
    with out_lock(sweep):  # one process gathers at a time; torn writes are cleared
        summary = collect(sweep)
        summary["seconds"] = time.perf_counter() - t0
        atomic_write(sweep.out / "sweep.json", dumps_json(sweep_json(sweep, summary)))
        if sweep.report:
            from nclayers.jobs.report import write_report

            summary["report"] = str(write_report(sweep.out))
    return summary


def _checkpointable():
    try:
        from submitit.helpers import Checkpointable
    except ImportError as err:  # pragma: no cover - submitit is a dependency
        raise NCLayersError("launching runs needs submitit: pip install submitit") from err
    return Checkpointable


class SweepTask(_checkpointable()):
    """One run of a sweep, as a requeueable submitit callable."""

    def __init__(self, sweep_file: str | Path, overrides: list[str]) -> None:
        self.sweep_file = str(Path(sweep_file).resolve())
        self.overrides = list(overrides)
        self.cwd = os.getcwd()  # relative roots and data folders mean the submitter's

    def __call__(self, index: int) -> dict:
        os.chdir(self.cwd)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # as many threads as the task was given: no oversubscribed node
            import torch

            torch.set_num_threads(int(cpus))
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        sweep = load_sweep(self.sweep_file, self.overrides)
        status = run_one(sweep, index, progress=False)
        failed = [n for n, s in status["stages"].items() if stage_failed(s)]
        log.info("run %d: %s", index, f"failed stages {failed}" if failed else "every stage done")
        return status


def submit_slurm(sweep: Sweep) -> list:
    """Submit every run as one Slurm job array; returns submitit's jobs. A request that no
    node of the partition can satisfy is refused first (`check_request`)."""
    import submitit

    s = sweep.slurm
    check_request(s)
    executor = submitit.AutoExecutor(folder=sweep.out / "slurm" / "%j", cluster="slurm",
                                     slurm_max_num_timeout=s.max_requeues)  # fmt: skip
    params: dict[str, Any] = {
        "name": f"nclayers-{sweep.name}",
        "timeout_min": s.time_min,
        "cpus_per_task": s.cpus_per_run,
        "gpus_per_node": s.gpus_per_run,
        "slurm_array_parallelism": s.array_parallelism,
        "slurm_setup": list(s.setup),
    }
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    executor.update_parameters(**params)
    task = SweepTask(sweep.path, sweep.overrides)
    jobs = executor.map_array(task, [r.index for r in sweep.runs])
    log.info("[sweep %s] submitted %d runs as Slurm array %s (logs in %s)", sweep.name,
             len(jobs), jobs[0].job_id.split("_")[0] if jobs else "-",
             sweep.out / "slurm")  # fmt: skip
    return jobs


def check_request(s) -> None:
    """Refuse, naming the key, a request (slurm.cpus_per_run, mem_gb, gpus_per_run,
    time_min) that no node of the partition can satisfy: Slurm would keep such an array
    pending forever (reason PartitionConfig). Reads `sinfo`; says nothing when it cannot."""
    partition = s.partition or _default_partition()
    nodes = _sinfo(["-N", "-p", partition, "-o", "%c|%m|%G|%l"]) if partition else None
    if nodes is None:
        return
    if not nodes:
        names = [p.rstrip("*") for p in (_sinfo(["-o", "%P"]) or [])]
        raise NCLayersError(f"slurm.partition={partition!r}: no such partition (sinfo lists "
                            f"{', '.join(dict.fromkeys(names)) or 'none'})")  # fmt: skip
    fields = [line.split("|") for line in nodes if line.count("|") == 3]
    cpus = max(_number(f[0]) for f in fields)
    mem_gb = max(_number(f[1]) for f in fields) / 1024
    gpus = max(_gpus(f[2]) for f in fields)
    minutes = max(_minutes(f[3]) for f in fields)
    where = f"partition {partition!r}"
    asked = (("cpus_per_run", s.cpus_per_run, cpus, "CPUs"),
             ("mem_gb", s.mem_gb or 0, mem_gb, "GB of memory"),
             ("gpus_per_run", s.gpus_per_run, gpus, "GPUs"),
             ("time_min", s.time_min, minutes, "minutes"))  # fmt: skip
    for key, value, limit, unit in asked:
        if value > limit:
            best = f"{limit:.1f}" if key == "mem_gb" else f"{limit:.0f}"
            why = (f"{where} allows jobs of at most {best} minutes" if key == "time_min" else
                   f"no node of {where} has more than {best} {unit}")  # fmt: skip
            raise NCLayersError(
                f"slurm.{key}={value}: {why} (sinfo), so the array would stay pending; set "
                f"slurm.{key} to at most {best}, or another partition (slurm.partition=NAME)"
            )


def _sinfo(args: list[str]) -> list[str] | None:
    """sinfo's lines (no header); None when sinfo cannot be asked."""
    import subprocess

    try:
        out = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True,
                             timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def _default_partition() -> str | None:
    for name in _sinfo(["-o", "%P"]) or []:
        if name.endswith("*"):
            return name.rstrip("*")
    return None


def _number(text: str) -> float:
    digits = re.match(r"\d+(\.\d+)?", text.strip())
    return float(digits.group()) if digits else math.inf  # unknown: no limit said


def _gpus(gres: str) -> int:
    """GPUs of a node from sinfo's GRES column ("gpu:4", "gpu:a100:4(S:0-1)", "(null)")."""
    return sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def _minutes(limit: str) -> float:
    """A Slurm time limit ("infinite", "30:00", "2:00:00", "1-12:00:00") in minutes."""
    if limit.strip().lower() in ("infinite", "unlimited", "n/a", ""):
        return math.inf
    days, dash, rest = limit.strip().partition("-")
    if not dash:
        days, rest = "0", limit.strip()
    parts = [int(p) for p in rest.split(":")]
    if dash:  # days-hours[:minutes[:seconds]]
        h, m, sec = [*parts, 0, 0][:3]
    elif len(parts) == 3:  # hours:minutes:seconds
        h, m, sec = parts
    else:  # minutes[:seconds]
        h, m, sec = 0, parts[0], (parts[1] if len(parts) > 1 else 0)
    return (int(days or 0) * 24 + h) * 60 + m + sec / 60


def wait_for(sweep: Sweep, jobs: list) -> None:
    """Wait for submitted jobs; a job that died without recording its run is recorded.
    Without Slurm accounting submitit cannot tell a killed job from a running one, so a
    job that squeue no longer knows (twice in a row) counts as ended too. Each task's Slurm
    state and pending reason are logged when they change (PENDING (Resources), RUNNING)."""
    pending = dict(zip((r.index for r in sweep.runs), jobs, strict=True))
    gone: dict[int, int] = {}
    seen: dict[int, str] = {}
    while pending:
        states = _squeue() if pending else {}
        queued = None if states is None else set(states)
        for index, job in list(pending.items()):
            state = (states or {}).get(job.job_id)
            if state is not None and seen.get(index) != state:
                seen[index] = state
                log.info("[sweep %s] run %d (Slurm job %s): %s", sweep.name, index,
                         job.job_id, state)  # fmt: skip
            ended = queued is not None and job.job_id not in queued
            gone[index] = gone.get(index, 0) + 1 if ended else 0
            if job.done() or gone[index] >= 2:
                del pending[index]
                _record_crash(sweep, index, job)
        if pending:
            time.sleep(POLL_S)


def _squeue() -> dict[str, str] | None:
    """The jobs Slurm still holds for this user (array tasks as ARRAY_TASK), each with its
    state and, while pending, the reason ("PENDING (PartitionConfig)"); None when squeue
    cannot say."""
    import subprocess

    try:
        out = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=30,
                             check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    states = {}
    for line in out.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job:
            shown = reason not in ("", "None") and state == "PENDING"
            states[job] = f"{state} ({reason})" if shown else state
    return states


def run_on_gpus(sweep: Sweep, gpus: list[int]) -> None:
    """One run per GPU at a time, each in its own process (submitit's local executor,
    CUDA_VISIBLE_DEVICES set per run). Ctrl-C stops every running child."""
    import submitit

    executor = submitit.LocalExecutor(folder=sweep.out / "local" / "%j")
    task = SweepTask(sweep.path, sweep.overrides)
    todo = [r.index for r in sweep.runs]
    busy: dict[int, tuple[int, Any]] = {}  # gpu -> (run index, job)
    try:
        while todo or busy:
            for gpu in [g for g in gpus if g not in busy and todo]:
                index = todo.pop(0)
                executor.update_parameters(gpus_per_node=1, visible_gpus=(gpu,),
                                           timeout_min=LOCAL_TIMEOUT_MIN)  # fmt: skip
                busy[gpu] = (index, executor.submit(task, index))
                log.info("[sweep %s] run %d on GPU %d", sweep.name, index, gpu)
            for gpu, (index, job) in list(busy.items()):
                if job.done():
                    del busy[gpu]
                    _record_crash(sweep, index, job)
            time.sleep(POLL_S if busy else 0)
    except KeyboardInterrupt:
        for _, job in busy.values():
            job.cancel(check=False)
        raise


def _record_crash(sweep: Sweep, index: int, job) -> None:
    """A task that raised or died before `run_one` wrote its status: record it failed."""
    try:
        error = job.exception() if job.done() else RuntimeError("the job left the queue")
    except Exception as err:  # submitit could not even read the job's result
        error = err
    run = sweep.runs[index]
    path = status_path(sweep, run)
    if error is None and path.is_file():
        return
    text = f"the run's process failed ({type(error).__name__}: {str(error)[-300:]}); see " + str(
        getattr(job.paths, "stderr", "the submitit logs"))  # fmt: skip
    log.warning("[sweep %s] run %d: %s", sweep.name, index, text)
    if not path.is_file():
        stages = {s: {"status": "failed", "error": text} for s in sweep.stages}
        status = {"index": index, "id": run.id, "labels": run.labels,
                  "folder": str(run.folder), "stages": stages}  # fmt: skip
        with out_lock(sweep):
            atomic_write(path, dumps_json(status))


__all__ = ["SweepTask", "check_request", "run_on_gpus", "run_sweep", "submit_slurm", "wait_for"]
