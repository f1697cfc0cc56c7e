"""Processes for the kill tests: a stage or a sweep run in a child that the test kills with
SIGKILL, at a chosen moment or at a chosen write.

The children come from a forkserver that has imported torch and nclayers once, so each
starts in milliseconds. A child tells the parent through a pipe when its work starts
("ready"), when a sweep's stage starts (("stage", name, run index)), and when it is done;
with `block`, it stops for good at one file write, just before the temporary file is
renamed over the file ("before") or just after, before the write's checksum is recorded
in manifest.json ("after"), and says so: the parent then kills it there. A write is named
by the end of its path ("layers.csv": any, "tiny/layers.csv": the sweep tiny's)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

# Imported once in the forkserver (what the stages import lazily too): children start warm.
PRELOAD = ["torch", "sklearn.datasets", "sklearn.model_selection", "matplotlib.figure",
           "matplotlib.backends.backend_agg", "nclayers.jobs", "nclayers.jobs.sweep",
           "nclayers.jobs.launch", "nclayers.jobs.report", "nclayers.report.figures",
           "nclayers.cli", "killing"]  # fmt: skip
_CTX = None


def context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def _hook_writes(conn, block) -> None:
    """os.replace (every atomic write renames) that stops at the `block` write."""
    when, name, nth = block
    real = os.replace
    seen = {"n": 0}

    def replace(src, dst, *args, **kwargs):
        hit = f"/{Path(dst).as_posix()}".endswith(f"/{name}")
        if hit:
            seen["n"] += 1
            hit = seen["n"] == nth
        if hit and when == "before":
            conn.send(("blocked", f"before renaming {name} #{nth}"))
            time.sleep(3600)
        real(src, dst, *args, **kwargs)
        if hit and when == "after":
            conn.send(("blocked", f"after renaming {name} #{nth}"))
            time.sleep(3600)

    os.replace = replace


def child(conn, task: dict) -> None:
    """Run `task` ({"stage": NAME, "folder": ..., "config": {...}} or {"sweep": FILE}),
    telling the parent what happens."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("nclayers").setLevel(logging.ERROR)
    if task.get("block"):
        _hook_writes(conn, task["block"])
    try:
        if "sweep" in task:
            _sweep(conn, task)
        else:
            from nclayers.config import Config
            from nclayers.jobs.sweep import stage_jobs

            cfg = Config.model_validate(task["config"])
            conn.send(("ready", None))
            stage_jobs()[task["stage"]](cfg, task["folder"], progress=False)
        conn.send(("done", None))
    except BaseException as err:  # the parent shows it
        import traceback

        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def _sweep(conn, task: dict) -> None:
    import nclayers.jobs.launch as launch
    import nclayers.jobs.sweep as sweep
    from nclayers.cli import main

    jobs = sweep.stage_jobs()

    def announced(name, job):
        def run(cfg, folder, **kwargs):
            conn.send(("stage", (name, cfg.run)))
            return job(cfg, folder, **kwargs)

        return run

    sweep.stage_jobs = lambda: {n: announced(n, j) for n, j in jobs.items()}
    collect = launch.collect

    def collecting(s):
        conn.send(("stage", ("collect", "")))
        return collect(s)

    launch.collect = collecting
    conn.send(("ready", None))
    rc = main(["sweep", task["sweep"], "-q"])
    if rc != 0:
        raise RuntimeError(f"the sweep exited with status {rc}")


class Child:
    """A started child and the messages it sent (with the time each arrived)."""

    def __init__(self, task: dict) -> None:
        ctx = context()
        self.conn, theirs = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=child, args=(theirs, task), daemon=True)
        self.proc.start()
        theirs.close()
        self.events: list[tuple[float, str, object]] = []

    def next(self, timeout: float = 120.0):
        """The next message (kind, value); ("exit", code) once the child is gone."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the child sent nothing for {timeout} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            self.proc.join(30)
            return "exit", self.proc.exitcode
        self.events.append((time.perf_counter(), kind, value))
        if kind == "error":
            raise AssertionError(f"the child failed: {value}")
        return kind, value

    def wait_for(self, want) -> bool:
        """Read messages until one matches `want(kind, value)`; False if the child ended."""
        while True:
            kind, value = self.next()
            if want(kind, value):
                return True
            if kind in ("done", "exit"):
                return False

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)
        self.conn.close()

    def finish(self) -> None:
        """Wait for a clean end."""
        assert self.wait_for(lambda k, v: k == "done"), "the child ended without finishing"
        self.proc.join(60)
        assert self.proc.exitcode == 0, self.proc.exitcode
        self.conn.close()


def kill_after(task: dict, seconds: float) -> str:
    """Start `task`, SIGKILL it `seconds` after its work started; what happened."""
    c = Child(task)
    assert c.wait_for(lambda k, v: k == "ready"), "the child never started"
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if c.conn.poll(max(0.0, seconds - (time.perf_counter() - t0))):
            kind, _ = c.next()
            if kind in ("done", "exit"):
                c.kill()
                return "finished before the kill"
    c.kill()
    return f"killed after {seconds:.2f} s"


def kill_at_write(task: dict, block: tuple[str, str, int]) -> str:
    """Start `task` and SIGKILL it at the `block` write (see the module doc)."""
    c = Child({**task, "block": block})
    hit = c.wait_for(lambda k, v: k == "blocked")
    c.kill()
    assert hit, f"the child never reached {block}"
    return f"killed {c.events[-1][2]}"


def timed(task: dict) -> tuple[float, list[tuple[float, str, object]]]:
    """Run `task` to its end; (seconds of work, its messages stamped from the start)."""
    c = Child(task)
    assert c.wait_for(lambda k, v: k == "ready"), "the child never started"
    t0 = c.events[-1][0]
    c.finish()
    return c.events[-1][0] - t0, [(t - t0, k, v) for t, k, v in c.events]
