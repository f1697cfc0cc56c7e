"""Training: recipes load, resume is exact, checkpoints are atomic, NC dynamics are tracked."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from nclayers.cli import main
from nclayers.config import load_config
from nclayers.data import DATASETS
from nclayers.jobs.folder import CHECKPOINT, DYNAMICS, RunFolder
from nclayers.jobs.train import train_job
from nclayers.models import build_model, get_entry
from nclayers.report.dynamics import plot_dynamics
from nclayers.table import Table
from nclayers.train import (
    load_checkpoint,
    lr_factor,
    param_groups,
    save_checkpoint,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "data.name=digits", "data.train_subset=200", "data.test_subset=100", "model.width=4",
    "train.epochs=3", "train.batch_size=32", "train.lr=0.05", "train.schedule=cosine",
    "train.min_lr=0.001", "train.checkpoint_every=0", "train.track_nc_every=1",
    "train.track_nc_samples=100", "device=cpu",
]  # fmt: skip


def tiny(out: Path, *overrides: str):
    return load_config(None, [*TINY, *overrides]), out


def train(cfg_out: tuple, **kwargs):
    return train_job(*cfg_out, **kwargs)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def scores(history: list[dict]) -> list[tuple]:
    """The deterministic part of each epoch record (not its timings)."""
    keys = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")
    return [tuple(h[k] for k in keys) for h in history]


# ----------------------------------------------------------------------------- recipes
# Run configs sit at the top level; configs/paper/ holds sweeps (validated by the sweep tests).
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert cfg.data.name in DATASETS
    if ":" not in cfg.model.name:
        get_entry(cfg.model.name)  # registered
    assert lr_factor(cfg.train, 0) > 0


def test_recipes_follow_the_paper():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    for depth in (18, 50, 101, 152):
        assert f"resnet{depth}-cifar10" in names and f"resnet{depth}-cifar100" in names
    for stem in sorted(n for n in names if n.startswith("resnet")):
        tc = load_config(CONFIGS / f"{stem}.yaml").train
        assert (tc.optimizer, tc.lr, tc.momentum, tc.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
        assert (tc.batch_size, tc.epochs, tc.augment) == (128, 200, True)
        lrs = [tc.lr * lr_factor(tc, e) for e in (0, 99, 100, 149, 150, 199)]
        assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    for stem in ("swin-tiny-cifar10", "vit-small-cifar10"):
        tc = load_config(CONFIGS / f"{stem}.yaml").train
        assert (tc.optimizer, tc.betas, tc.weight_decay) == ("adamw", (0.9, 0.999), 0.05)
        assert (tc.batch_size, tc.epochs, tc.augment) == (128, 200, True)
        lr = [tc.lr * lr_factor(tc, e) for e in range(tc.epochs)]
        assert lr[0] == pytest.approx(1e-4) and lr[20] == pytest.approx(1e-3)
        assert all(a < b for a, b in itertools.pairwise(lr[:21]))  # warm-up rises
        assert all(a > b for a, b in itertools.pairwise(lr[20:]))  # cosine falls
        assert lr[-1] == pytest.approx(1e-5, rel=0.02)


def test_transformer_decay_skips_tokens_embeddings_norms_biases():
    model = build_model("vit_small", 10, embed_dim=48, depth=2, num_heads=2)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"} <= skipped
    decayed = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- resume
def test_resume_is_exact_and_survives_a_crash(tmp_path):
    full = train(tiny(tmp_path / "full"), progress=False)

    run = tmp_path / "run"
    train(tiny(run), stop_after=1, progress=False)
    after_one = (run / CHECKPOINT).read_bytes()
    train(tiny(run), resume=True, stop_after=2, progress=False)
    # A crash after epoch 2 was measured but before it was checkpointed, in the middle of
    # writing a checkpoint: epoch 1's checkpoint, epoch 2's NC rows, a torn temporary file.
    state = torch.load(io.BytesIO(after_one), weights_only=True)
    RunFolder(run).save_torch(CHECKPOINT, state)
    torn = run / f".{CHECKPOINT}.12345.tmp"
    torn.write_bytes(b"half a checkpoint")
    resumed = train(tiny(run), resume=True, progress=False)

    assert_same_weights(full.model.state_dict(), resumed.model.state_dict())
    assert_same_weights(
        load_checkpoint(tmp_path / "full" / CHECKPOINT)["model"],
        load_checkpoint(run / CHECKPOINT)["model"],
    )
    assert scores(resumed.summary["history"]) == scores(full.summary["history"])
    assert [h["epoch"] for h in resumed.summary["history"]] == [1, 2, 3]
    assert not torn.exists()  # the folder's lock holder clears torn temporary files
    # NC dynamics: epochs 0..3, every block once per epoch, the same numbers as uninterrupted.
    ours, theirs = Table.from_csv(run / DYNAMICS), Table.from_csv(tmp_path / "full" / DYNAMICS)
    assert list(ours) == list(theirs)
    expected = [(epoch, layer) for epoch in range(4) for layer in range(1, 9)]
    assert [(r["epoch"], r["layer"]) for r in ours] == expected


def test_run_folder_log_summary_and_dynamics_figure(tmp_path):
    out = tmp_path / "run"
    result = train(tiny(out, "train.epochs=2", "train.track_nc_every=2"), progress=False)
    lines = (out / "train.log").read_text().splitlines()
    epochs = [line for line in lines if line.startswith("epoch")]
    assert len(epochs) == 2
    for word in ("loss", "train", "test", "lr", "img/s", "eta"):
        assert word in epochs[-1]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["world_size"] == 1
    assert summary["final"]["test_acc"] == result.summary["final"]["test_acc"]
    assert 0.0 <= summary["final"]["test_acc"] <= 1.0 and summary["final"]["img_per_s"] > 0

    table = Table.from_csv(out / DYNAMICS)
    assert sorted({r["epoch"] for r in table}) == [0, 2]  # before training, then every 2
    assert all(r["n"] == 100 and r["split"] == "test" for r in table)
    assert all(math.isfinite(r["nc1"]) and r["nc1"] > 0 for r in table)
    png = plot_dynamics(out / DYNAMICS, tmp_path / "dyn.png")
    assert png.stat().st_size > 10_000
    assert main(["plot", str(out / DYNAMICS)]) == 0
    assert (out / "nc_dynamics.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="track_nc_every"):
        plot_dynamics(Table([{"layer": 1, "nc1": 1.0}]), tmp_path / "x.png")


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no checkpoint\.pt"):
        train(tiny(tmp_path), resume=True, progress=False)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, weights=torch.arange(4.0), epoch=1)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails mid-write
        save_checkpoint(path, weights=torch.zeros(4), epoch=2, bad=lambda: 0)
    state = load_checkpoint(path)  # weights_only=True
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left


# ----------------------------------------------------------------------------- steps
def test_speed_switches_do_not_change_cpu_results(tmp_path):
    base = ["train.epochs=2", "train.track_nc_every=0"]
    on = train(tiny(tmp_path / "on", *base, "train.amp=true", "train.channels_last=true",
                    "train.compile=true"), progress=False)  # fmt: skip
    off = train(tiny(tmp_path / "off", *base, "train.amp=false", "train.channels_last=false",
                     "train.compile=false"), progress=False)  # fmt: skip
    assert_same_weights(on.model.state_dict(), off.model.state_dict())


def test_train_step_is_the_plain_pytorch_step():
    """What benchmarks/train_overhead.py compares against: the same step, bit for bit."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    a = build_model("resnet18", 10, width=4)
    b = build_model("resnet18", 10, width=4)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        loss, correct = train_step(a, opt_a, x, y)
        opt_b.zero_grad()
        ref = torch.nn.functional.cross_entropy(b(x), y)
        ref.backward()
        opt_b.step()
        assert torch.equal(loss, ref.detach()) and 0 <= int(correct) <= 16
    assert_same_weights(a.state_dict(), b.state_dict())
