"""Two processes with gloo on CPU, as torchrun would start them.

Each worker (i) runs `train()` from torchrun's environment variables (DDP, per-rank
shards, rank-0 files) and saves its weights; then, in a process group of its own,
(ii) reduces ClassStats / NCCAccuracy over its part of a data set and (iii) runs
`analyze` on its part of the digits. The parent compares the reduced results with one
process over all the data, and the ranks' weights with each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nclayers.analysis import analyze
from nclayers.config import DataConfig, load_config
from nclayers.data import DeviceBatches, load_dataset
from nclayers.jobs.folder import CHECKPOINT, DYNAMICS
from nclayers.jobs.train import train_job
from nclayers.metrics import ClassStats, NCCAccuracy
from nclayers.models import build_model
from nclayers.table import Table
from nclayers.train import evaluate, load_checkpoint
from ports import free_port

WORLD = 2
TRAIN = [
    "data.name=digits", "data.train_subset=300", "data.test_subset=120", "model.width=4",
    "train.epochs=2", "train.batch_size=64", "train.lr=0.05", "train.track_nc_every=1",
    "train.track_nc_samples=100", "device=cpu",
]  # fmt: skip

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo"
    ),
    pytest.mark.usefixtures("one_thread"),
]


def features(n: int = 600, dim: int = 7, classes: int = 5):
    """float32 features far from the origin (where naive variance formulas cancel)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = (torch.randn(n, dim, generator=gen) + 3.0 * y[:, None] + 1000.0).float()
    return x, y


def rank_rows(y: torch.Tensor, rank: int) -> torch.Tensor:
    """Uneven parts; class 4 only on rank 1 (an empty class on a rank must merge)."""
    first = (torch.arange(len(y)) < 250) & (y != 4)
    return (first if rank == 0 else ~first).nonzero().flatten()


def rank_part(ds, rank: int):
    return ds.subset(torch.arange(rank, len(ds), WORLD))


def model_and_data(tmp: Path):
    model = build_model("resnet18", 10, width=4)
    model.load_state_dict(torch.load(tmp / "init.pt", weights_only=True))
    # 600 of the 1,347 training digits (every class) give the NCC means; less CPU.
    train_ds = load_dataset(DataConfig(name="digits"), "train").subset(torch.arange(600))
    test_ds = load_dataset(DataConfig(name="digits"), "test")
    return model.eval(), train_ds, test_ds


def worker(rank: int, tmp: Path, ports: tuple[int, int]) -> None:
    torch.set_num_threads(1)  # two processes on CI's two cores
    # (i) train() as under torchrun: it joins (and leaves) the process group itself.
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]),
    )  # fmt: skip
    result = train_job(load_config(None, TRAIN), tmp / "run", progress=False)
    assert not dist.is_initialized()
    torch.save(result.model.state_dict(), tmp / f"rank{rank}.pt")
    keep = ("history", "world_size", "per_process_batch")
    (tmp / f"rank{rank}.json").write_text(json.dumps({k: result.summary[k] for k in keep}))

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank, world_size=WORLD
    )
    try:
        # (ii) exact statistics over uneven parts.
        x, y = features()
        rows = rank_rows(y, rank)
        stats = ClassStats(5, x.shape[1])
        for chunk in rows.split(64):
            stats.update(x[chunk], y[chunk])
        stats.reduce()
        ref = ClassStats(5, x.shape[1]).update(x[:300], y[:300]).update(x[300:], y[300:])
        ncc = NCCAccuracy(ref).update(x[rows], y[rows]).reduce()
        torch.save(
            {**stats.state_dict(), "ncc": (int(ncc.correct), int(ncc.total))},
            tmp / f"stats{rank}.pt",
        )
        # (iii) analyze on this rank's part of the digits, NCC means from the train parts.
        model, train_ds, test_ds = model_and_data(tmp)
        table = analyze(
            model, DeviceBatches(rank_part(test_ds, rank), 100), 10,
            reference=DeviceBatches(rank_part(train_ds, rank), 200), amp=False, progress=False,
        )  # fmt: skip
        table.to_csv(tmp / f"analyze{rank}.csv")
        (tmp / f"accuracy{rank}.json").write_text(json.dumps(table.accuracy))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    torch.save(build_model("resnet18", 10, width=4).state_dict(), tmp / "init.pt")
    mp.spawn(worker, args=(tmp, (free_port(), free_port())), nprocs=WORLD, join=True)
    return tmp


def test_class_stats_reduce_equals_one_process(spawned):
    x, y = features()
    one = ClassStats(5, x.shape[1])
    for chunk in torch.arange(len(y)).split(97):
        one.update(x[chunk], y[chunk])
    ref = ClassStats(5, x.shape[1]).update(x[:300], y[:300]).update(x[300:], y[300:])
    single_ncc = NCCAccuracy(ref).update(x, y)
    for rank in range(WORLD):
        got = torch.load(spawned / f"stats{rank}.pt", weights_only=True)
        assert torch.equal(got["counts"], one.counts)
        torch.testing.assert_close(got["means"], one.means, rtol=1e-12, atol=0)
        torch.testing.assert_close(got["m2"], one.m2, rtol=1e-12, atol=0)
        reduced = ClassStats.from_state_dict(got)
        assert reduced.nc1() == pytest.approx(one.nc1(), rel=1e-12)
        assert reduced.nc2() == pytest.approx(one.nc2(), rel=1e-12, abs=1e-15)
        assert got["ncc"] == (int(single_ncc.correct), int(single_ncc.total))


def test_analyze_under_two_ranks_equals_one(spawned):
    model, train_ds, test_ds = model_and_data(spawned)
    one = analyze(
        model, DeviceBatches(test_ds, 100), 10, reference=DeviceBatches(train_ds, 200),
        amp=False, progress=False,
    )  # fmt: skip
    for rank in range(WORLD):
        two = Table.from_csv(spawned / f"analyze{rank}.csv")
        assert len(two) == len(one) == 8
        for a, b in zip(one, two, strict=True):
            assert (a["layer"], a["block"], a["n"]) == (b["layer"], b["block"], b["n"])
            # Features agree to float32 rounding (conv results may depend on batch makeup).
            assert b["nc1"] == pytest.approx(a["nc1"], rel=1e-5)
            assert b["nc2"] == pytest.approx(a["nc2"], rel=1e-5, abs=1e-7)
            assert b["ncc_acc"] == pytest.approx(a["ncc_acc"], abs=1.5 / len(test_ds))
        accuracy = json.loads((spawned / f"accuracy{rank}.json").read_text())
        assert accuracy["clean"] == pytest.approx(one.accuracy["clean"], abs=1.5 / 450)


def test_ddp_training_keeps_ranks_identical_and_writes_once(spawned):
    weights = [torch.load(spawned / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), f"{key} differs between ranks"
    checkpoint = load_checkpoint(spawned / "run" / CHECKPOINT)
    for key, value in checkpoint["model"].items():
        assert torch.equal(value, weights[0][key])
    assert len(checkpoint["rng"]) == WORLD  # each rank resumes with its own RNG state

    runs = [json.loads((spawned / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert runs[0]["per_process_batch"] == 32 and runs[0]["world_size"] == WORLD
    timings = ("img_per_s", "epoch_seconds", "seconds")
    scores = [[{k: v for k, v in h.items() if k not in timings} for h in run["history"]]
              for run in runs]  # fmt: skip
    assert scores[0] == scores[1]  # losses and accuracies were reduced: every rank agrees
    log = (spawned / "run" / "train.log").read_text()
    assert "2 process(es), per-process batch 32" in log
    assert sum(line.startswith("epoch") for line in log.splitlines()) == 2  # rank 0 only

    # Evaluation was reduced over both ranks' parts: it equals one process on all of it.
    cfg = load_config(None, TRAIN)
    model = build_model("resnet18", 10, width=4)
    model.load_state_dict(weights[0])
    _, acc = evaluate(model, DeviceBatches(load_dataset(cfg.data, "test"), 500), amp=False)
    assert runs[0]["history"][-1]["test_acc"] == pytest.approx(acc, abs=1.5 / 120)
    # NC tracking counted both ranks' halves of the 100-image subset.
    table = Table.from_csv(spawned / "run" / DYNAMICS)
    assert sorted({r["epoch"] for r in table}) == [0, 1, 2]
    assert {r["n"] for r in table} == {100}
