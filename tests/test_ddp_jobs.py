"""Issue 17 item 11: verbs under torchrun. Two gloo processes, started as torchrun starts
them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), run `nclayers train RUN --resume`,
`nclayers analyze RUN`, `nclayers probe RUN` and `nclayers prune RUN --blocks 1` on the
same unnamed run (and `nclayers memorization` on a noisy one): layers.csv holds 16 rows
(not 32), "wrote" is printed once per verb, only rank 0 writes a file, and rank 1
returns only once rank 0 has written. The numbers equal one process's measuring the same
weights (the statistics reduce exactly)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from killing import context
from nclayers.config import compose
from nclayers.jobs import RunFolder, analyze_job, memorization_job, probe_job, train_job
from nclayers.table import Table
from ports import free_port
from tinyruns import TINY

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo"
    ),
    pytest.mark.usefixtures("one_thread"),
]
# Each verb: the run it works on (a clean one; memorization: one with shuffled labels),
# its options, and the line only the main rank prints.
VERBS = {"train": ("clean", ["--resume", "train.epochs=3"], "run folder"),
         "analyze": ("clean", [], "wrote"), "probe": ("clean", [], "wrote"),
         "memorization": ("noisy", [], "wrote"),
         "prune": ("clean", ["--blocks", "1"], "wrote")}  # fmt: skip


def rank_main(rank: int, runs: dict[str, str], ports: list[int], out: str) -> None:
    """One torchrun process: each verb in turn, its printed lines, the files it wrote."""
    from nclayers.cli import main

    torch.set_num_threads(1)
    writes: list[tuple[float, str]] = []
    real = os.replace

    def replace(src, dst, *args, **kwargs):  # every file nclayers writes is renamed in
        if rank == 0:
            time.sleep(0.05)  # a slow disk: rank 1 must wait for it, whatever the timing
        real(src, dst, *args, **kwargs)
        writes.append((time.time(), str(dst)))

    os.replace = replace
    report = []
    for (verb, (run, extra, _)), port in zip(VERBS.items(), ports, strict=True):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        start = len(writes)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main([verb, runs[run], *extra, "-q"])
        report.append({"verb": verb, "rc": rc, "stdout": stdout.getvalue(),
                       "stderr": stderr.getvalue(), "writes": writes[start:],
                       "returned": time.time()})  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the run trained further and measured by two ranks, the same run measured by one
    process)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ddp_jobs")
    train_job(compose(TINY), tmp / "two", progress=False)
    train_job(compose({**TINY, "data.noise": 0.4}), tmp / "noisy", progress=False)
    shutil.copytree(tmp / "noisy", tmp / "noisy-one")
    runs = {"clean": str(tmp / "two"), "noisy": str(tmp / "noisy")}
    ctx = context()
    ports = [free_port() for _ in VERBS]
    procs = [ctx.Process(target=rank_main, args=(r, runs, ports, str(tmp))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    shutil.copytree(tmp / "two", tmp / "one")  # the same weights, measured by one process
    cfg = RunFolder(tmp / "one").config()
    analyze_job(cfg, tmp / "one", progress=False)
    probe_job(cfg, tmp / "one", progress=False)
    memorization_job(RunFolder(tmp / "noisy-one").config(), tmp / "noisy-one", progress=False)
    return tmp, ranks


def test_two_ranks_write_once_and_the_others_wait(runs):
    tmp, ranks = runs
    for (verb, (_, _, said)), zero, one in zip(VERBS.items(), *ranks, strict=True):
        assert zero["rc"] == one["rc"] == 0, (zero["stderr"], one["stderr"])
        assert zero["stdout"].count(said) == 1 and said not in one["stdout"], zero["stdout"]
        assert zero["writes"], f"{verb}: rank 0 wrote nothing"
        assert one["writes"] == [], f"{verb}: rank 1 wrote {one['writes']}"
        last = max(t for t, _ in zero["writes"])
        assert one["returned"] >= last, f"{verb}: rank 1 returned before rank 0 had written"
    assert not list(tmp.rglob(".*.tmp"))


def test_two_ranks_measure_what_one_process_does(runs):
    tmp, _ = runs
    run = tmp / "two"
    two, one = Table.from_csv(run / "layers.csv"), Table.from_csv(tmp / "one" / "layers.csv")
    assert len(two) == 16 and {r["run"] for r in two} == {""}
    assert [(r["split"], r["view"], r["layer"], r["n"]) for r in two] == [
        (r["split"], r["view"], r["layer"], r["n"]) for r in one
    ]
    for col in ("nc1", "nc2", "ncc_acc", "probe_acc"):
        a, b = two.column(col), one.column(col)
        assert [x is None for x in a] == [x is None for x in b], col
        assert [x for x in a if x is not None] == pytest.approx(
            [x for x in b if x is not None], rel=1e-9, abs=1e-12
        ), col
    folder = RunFolder(run)
    assert all(folder.status(s, folder.config()) == "done" for s, v in VERBS.items()
               if v[0] == "clean")  # fmt: skip
    assert folder.config().train.epochs == 3
    two, one = (Table.from_csv(tmp / r / "memorization.csv") for r in ("noisy", "noisy-one"))
    assert [r["layer"] for r in two] == [r["layer"] for r in one] == list(range(1, 9))
    assert two.column("ratio") == pytest.approx(one.column("ratio"), rel=1e-9)
