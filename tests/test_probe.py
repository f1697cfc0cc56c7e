"""Linear probes on every block: against hand-derived gradient descent, heads trained one at
a time, the cache, two gloo processes, an interrupted run, and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import nclayers
from nclayers.config import ProbeSettings
from nclayers.data import ArrayDataset, DeviceBatches
from nclayers.errors import NCLayersError
from nclayers.models import build_model, find_blocks
from nclayers.probing import ProbeHeads, heads_state, load_heads, probe, score_heads
from nclayers.probing.holdout import held_out
from nclayers.taps import Taps
from ports import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4
FAST = dict(eval_batch_size=64)
PAPER = dict(lrs=[0.1], standardize=False)  # the paper's recipe: nothing held out


def fit(model, train, test, k, blocks="auto", *, state=None, on_epoch=None, **settings):
    """`probe` with ProbeSettings from keywords (the paper's single lr unless `lrs`)."""
    settings = {**PAPER, **settings}
    if isinstance(settings.get("cache_dtype"), torch.dtype):
        settings["cache_dtype"] = str(settings["cache_dtype"]).removeprefix("torch.")
    if settings.get("cache_dir") is not None:
        settings["cache_dir"] = str(settings["cache_dir"])
    return probe(model, train, test, k, blocks, ProbeSettings(**settings), state=state,
                 on_epoch=on_epoch)  # fmt: skip


def images(n: int, seed: int = 0, size: int = 8, classes: int = K) -> ArrayDataset:
    """Random uint8 images whose class shifts the mean brightness of one channel."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 160, (n, 3, size, size), generator=gen)
    x[:, 0] += (y * 30)[:, None, None]
    return ArrayDataset(
        x.to(torch.uint8), {"clean": y}, [str(k) for k in range(classes)],
        (0.4, 0.3, 0.3), (0.25, 0.25, 0.25),
    )  # fmt: skip


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=K, width=4).eval()


def linear_weights(table) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(h.weight.detach(), h.bias.detach()) for h in table.heads.linear()]


# ----------------------------------------------------------------------------- definitions
class Pixels(nn.Module):
    """A 'backbone' whose blocks output the normalised pixels (1 x 1 images): the pooled
    features are the input features themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.first = nn.Identity()
        self.second = nn.Identity()

    def forward(self, x):
        return self.second(self.first(x) * self.gain).flatten(1)


def separable(n: int, seed: int) -> tuple[ArrayDataset, torch.Tensor]:
    """K classes at the corners of a 4-D cube with a margin: linearly separable."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = 30 + torch.randint(0, 40, (n, 4), generator=gen)
    x[torch.arange(n), y] += 150
    ds = ArrayDataset(
        x.to(torch.uint8)[:, :, None, None], {"clean": y}, list("abcd"),
        (0.3,) * 4, (0.3,) * 4,
    )  # fmt: skip
    return ds, y


def test_separable_features_reach_full_accuracy_on_the_clean_test_labels():
    train, y = separable(200, seed=1)
    # Trained on the clean view; a noisy view with shuffled labels must not be used.
    train = train.with_views({"clean": y, "noisy": y[torch.randperm(200)]})
    test, y_test = separable(100, seed=2)
    model = Pixels()
    table = fit(model, train, test, K, ["first", "second"], batch_size=32, augment=False, **FAST)
    assert [r["probe_acc"] for r in table] == [1.0, 1.0]
    assert [(r["layer"], r["block"], r["dim"], r["split"], r["view"], r["n"]) for r in table] == [
        (1, "first", 4, "test", "clean", 100), (2, "second", 4, "test", "clean", 100),
    ]  # fmt: skip
    last = table.history.where(epoch=10)
    assert [r["train_acc"] for r in last] == [1.0, 1.0]
    assert [r["lr"] for r in table.history.where(layer=1)] == pytest.approx(
        [0.1] * 5 + [0.02] * 2 + [0.004] * 3
    )
    # Scored on the test split's labels: the same heads on permuted test labels fail.
    wrong = test.with_views({"clean": (y_test + 1) % K})
    accuracy, _, n = score_heads(model, table.heads, find_blocks(model, "first,second"), wrong)
    assert n == 100 and accuracy.max() == 0.0


def reference_probe(feats: torch.Tensor, y: torch.Tensor, epochs: int, wd: float):
    """Full-batch gradient descent with heavy-ball momentum in float64, gradient of the
    softmax cross-entropy written out by hand; lr 0.1, / 5 after epochs 5 and 7."""
    n, d = feats.shape
    w, b = torch.zeros(K, d, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    onehot = torch.eye(K, dtype=torch.float64)[y]
    for epoch in range(epochs):
        lr = 0.1 * (0.2 if epoch >= 5 else 1.0) * (0.2 if epoch >= 7 else 1.0)
        p = torch.softmax(feats @ w.T + b, dim=1)
        g = (p - onehot) / n
        gw, gb = g.T @ feats + wd * w, g.sum(0) + wd * b
        vw, vb = 0.9 * vw + gw, 0.9 * vb + gb
        w, b = w - lr * vw, b - lr * vb
    return w, b


@pytest.mark.parametrize("standardize", [False, "feature", "block"])
def test_heads_equal_hand_derived_descent(resnet, standardize):
    """Full batch: one step per epoch, so the batch order cannot matter."""
    train, test = images(40), images(16, seed=1)
    blocks = find_blocks(resnet)
    per = dict(standardize_per=standardize) if standardize else {}
    table = fit(resnet, train, test, K, blocks, augment=False, batch_size=64,
                  standardize=bool(standardize), weight_decay=5e-3, cache_dtype=torch.float32,
                  **per, **FAST)  # fmt: skip
    assert table.mode == "cache"
    x, y = next(iter(DeviceBatches(train, 40)))
    feats = []
    with torch.no_grad(), Taps(blocks, lambda i, f: feats.append(f.double())):
        resnet(x)
    heads = table.heads  # the heads as trained (standardisation not folded in)
    for i, (d, f) in enumerate(zip(heads.dims, feats, strict=True)):
        if standardize:  # population statistics of the features of the sampled rows
            g = f[held_out(train, 0.1, 0, "clean")[1]]
            var = g.var(0, unbiased=False)
            if standardize == "block":  # one scale: the mean variance of the block's features
                var = var.mean().expand_as(var)
            f = (f - g.mean(0)) / (var + 1e-8).sqrt()
        ref_w, ref_b = reference_probe(f, y, 10, 5e-3)
        assert ref_w.abs().max() > 1e-2  # the heads moved
        torch.testing.assert_close(heads.weight[i, :d, 0].T.double(), ref_w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(heads.bias[i, 0, 0].double(), ref_b, rtol=1e-4, atol=1e-6)
        assert torch.all(heads.weight[i, d:] == 0)  # padding stays zero


def test_joint_heads_equal_heads_trained_one_at_a_time(resnet):
    train, test = images(48), images(16, seed=1)
    opts = dict(epochs=3, milestones=(1, 2), batch_size=16, weight_decay=1e-3, **FAST)
    joint = fit(resnet, train, test, K, **opts)
    assert joint.mode == "stream" and len(joint) == 8
    for i, block in enumerate(find_blocks(resnet)):
        alone = fit(resnet, train, test, K, [block.name], **opts)
        (w, b), (w1, b1) = linear_weights(joint)[i], linear_weights(alone)[0]
        torch.testing.assert_close(w, w1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, b1, rtol=1e-5, atol=1e-6)
        assert alone[0]["probe_acc"] == joint[i]["probe_acc"]
        hist = joint.history.where(layer=i + 1)
        for r, r1 in zip(hist, alone.history, strict=True):
            assert r["loss"] == pytest.approx(r1["loss"], rel=1e-5)
            assert r["train_acc"] == r1["train_acc"]


@pytest.mark.parametrize("standardize", [False, True])
def test_cache_and_stream_without_augmentation_train_the_same_heads(resnet, standardize):
    train, test = images(48), images(16, seed=1)
    opts = dict(epochs=2, batch_size=16, augment=False, standardize=standardize, **FAST)
    stream = fit(resnet, train, test, K, mode="stream", **opts)
    cache = fit(resnet, train, test, K, mode="cache", cache_dtype=torch.float32, **opts)
    assert (stream.mode, cache.mode) == ("stream", "cache")
    for (w, b), (w1, b1) in zip(linear_weights(stream), linear_weights(cache), strict=True):
        torch.testing.assert_close(w, w1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, b1, rtol=1e-4, atol=1e-5)
    assert stream.column("probe_acc") == cache.column("probe_acc")


def test_memory_mapped_cache_equals_the_in_memory_one(resnet, tmp_path):
    train, test = images(48), images(16, seed=1)
    opts = dict(epochs=2, batch_size=16, augment=False, **FAST)
    memory = fit(resnet, train, test, K, **opts)
    mapped = fit(resnet, train, test, K, cache_budget_gb=0.0, cache_dir=tmp_path, **opts)
    assert torch.equal(memory.heads.theta, mapped.heads.theta)
    assert list(tmp_path.iterdir()) == []  # the file is removed at the end


def test_backbone_parameters_and_batchnorm_buffers_are_bit_identical():
    torch.manual_seed(1)
    model = build_model("resnet18", num_classes=K, width=4).train()  # as if mid-training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, images(32), images(16, seed=1), K, epochs=2, batch_size=16, **FAST)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert model.training  # its mode is given back
    assert all(p.grad is None for p in model.parameters())


def test_heads_fold_standardisation_and_reload(resnet):
    train, test = images(48), images(16, seed=1)
    table = fit(resnet, train, test, K, epochs=2, batch_size=16, standardize=True,
                  augment=False, **FAST)  # fmt: skip
    heads = table.heads
    assert not torch.equal(heads.scale, torch.ones_like(heads.scale))
    x, _ = next(iter(DeviceBatches(test, 16)))
    feats = []
    with torch.no_grad(), Taps(find_blocks(resnet), lambda i, f: feats.append(f)):
        resnet(x)
        logits = heads(torch.cat(feats, 1))
        for i, (linear, f) in enumerate(zip(heads.linear(), feats, strict=True)):
            torch.testing.assert_close(linear(f), logits[i, :, 0], rtol=1e-4, atol=1e-4)
    saved = heads_state(table)
    reloaded = load_heads(saved)
    accuracy, _, n = score_heads(resnet, reloaded, find_blocks(resnet), test, batch_size=7)
    assert n == 16 and accuracy[:, 0].tolist() == pytest.approx(table.column("probe_acc"))
    assert saved["probe_acc"] == table.column("probe_acc")


def test_interrupted_probe_resumes_to_the_uninterrupted_heads(resnet):
    train, test = images(48), images(16, seed=1)
    opts = dict(epochs=4, milestones=(2, 3), batch_size=16, standardize=True, **FAST)
    whole = fit(resnet, train, test, K, **opts)
    saved = []

    class Stop(Exception):
        pass

    def checkpoint(state):
        saved.append(state)
        if state["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(resnet, train, test, K, on_epoch=checkpoint, **opts)
    resumed = fit(resnet, train, test, K, state=saved[-1], **opts)
    assert resumed.resumed_from == 2
    assert torch.equal(resumed.heads.theta, whole.heads.theta)
    assert torch.equal(resumed.heads.scale, whole.heads.scale)
    assert resumed.history == whole.history
    assert resumed.column("probe_acc") == whole.column("probe_acc")


# ----------------------------------------------------------------------------- the lr grid
D = 8


class Scaled(nn.Module):
    """A 'backbone' whose one block outputs the standardised pixels times `scale`."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.gain = nn.Parameter(torch.ones(1))
        self.block = nn.Identity()

    def forward(self, x):
        return self.block(x.flatten(1) * self.scale * self.gain)


def gaussians(n: int, seed: int) -> ArrayDataset:
    """K well-separated Gaussian classes in D dimensions (centres 2.5 sd apart per
    dimension), stored as 1 x 1 uint8 images; standardised to unit noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    centres = torch.randn(K, D, generator=torch.Generator().manual_seed(99)) * 50
    x = 128 + centres[y] + torch.randn(n, D, generator=gen) * 20
    return ArrayDataset(x.clamp(0, 255).round().to(torch.uint8)[:, :, None, None],
                        {"clean": y}, list("abcd"), (128 / 255,) * D, (20 / 255,) * D)  # fmt: skip


def ncc_accuracy(train: ArrayDataset, test: ArrayDataset) -> float:
    """Nearest class centre in float64 numpy (scale-free: the same at every scale)."""
    import numpy as np

    def feats(ds):
        return (ds.images.double().flatten(1).numpy() - 128) / 20

    xtr, ytr = feats(train), train.labels["clean"].numpy()
    xte, yte = feats(test), test.labels["clean"].numpy()
    mu = np.stack([xtr[ytr == k].mean(0) for k in range(K)])
    return float((((xte[:, None] - mu[None]) ** 2).sum(-1).argmin(1) == yte).mean())


def test_the_grid_reaches_ncc_at_both_feature_scales_where_one_lr_fails_at_one():
    """The right lr moves with the features' scale (the loss' curvature in the weights
    goes with its square): one lr cannot serve 1e-2 and 1e2, a grid across them can."""
    train, test = gaussians(400, 1), gaussians(200, 2)
    ncc = ncc_accuracy(train, test)
    assert ncc >= 0.95
    opts = dict(augment=False, batch_size=32, weight_decay=0.0, standardize=False)  # raw
    grid = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3]
    fixed = {}
    for scale in (1e-2, 1e2):
        chosen = fit(Scaled(scale), train, test, K, ["block"], lrs=grid, **opts)
        assert chosen[0]["probe_acc"] >= ncc, scale
        assert chosen.selection.where(chosen=True)[0]["probe_lr"] == chosen[0]["probe_lr"]
        fixed[scale] = fit(Scaled(scale), train, test, K, ["block"], lrs=[0.1], **opts)
    assert min(r[0]["probe_acc"] for r in fixed.values()) < ncc - 0.1  # 0.1 fails at 1e-2
    small = {r["probe_lr"]: r["val_acc"] for r in chosen.selection}
    assert max(small.values()) == 1.0
    # The defaults (standardised features, the default grid) are scale-free: 1e-3 too,
    # where the raw features' head is lost in its bias' batch-to-batch noise at every lr.
    for scale in (1e-3, 1e3):
        default = probe(Scaled(scale), train, test, K, ["block"],
                        ProbeSettings(augment=False, batch_size=32))  # fmt: skip
        assert default[0]["probe_acc"] >= ncc, scale


def memorised(n: int, seed: int, moved: float) -> ArrayDataset:
    """K Gaussian clusters in 16 dimensions (class k: +80 on dimension k, noise sd 15) as
    1 x 1 uint8 images, labelled by their true class; a share `moved` of the rows sits in
    another class's cluster, pulled 0.7 of the way toward its own on its own dimension:
    what a network that memorised shuffled labels does to those training images."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    where = y.clone()
    rows = (torch.rand(n, generator=gen) < moved).nonzero().flatten()
    where[rows] = (y[rows] + torch.randint(1, K, (len(rows),), generator=gen)) % K
    x = 88 + 15 * torch.randn(n, 16, generator=gen)
    x[torch.arange(n), where] += 80
    x[rows, y[rows]] += 0.7 * 80
    return ArrayDataset(x.round().clamp(0, 255).to(torch.uint8)[:, :, None, None],
                        {"clean": y}, list("abcd"), (0.5,) * 16, (0.2,) * 16)  # fmt: skip


def test_the_held_out_loss_keeps_the_probe_at_ncc_where_memorised_rows_mislead_accuracy():
    """Training rows that sit in another class's cluster (a memorising network's
    mislabelled images) but carry their true label: a head with a large step size fits
    them and moves its boundaries into the clusters. Held-out accuracy, counted on 40
    such rows, moves in steps of a row and prefers that head now and then (more than 2
    points below NCC on the clean test split); the held-out cross-entropy charges its
    confident mistakes and keeps, on every draw, a head at NCC's level."""
    import numpy as np

    test = memorised(1000, seed=100, moved=0.0)
    model = Pixels()
    below = {"loss": [], "accuracy": []}
    for seed in range(6):
        train = memorised(400, seed, moved=0.4)
        xtr, ytr = train.images.double().flatten(1).numpy(), train.labels["clean"].numpy()
        xte, yte = test.images.double().flatten(1).numpy(), test.labels["clean"].numpy()
        mu = np.stack([xtr[ytr == k].mean(0) for k in range(K)])
        ncc = float((((xte[:, None] - mu[None]) ** 2).sum(-1).argmin(1) == yte).mean())
        assert ncc >= 0.99  # class means average the moved rows out
        for by in below:
            settings = ProbeSettings(augment=False, choose_by=by, eval_batch_size=1000)
            result = probe(model, train, test, K, ["first"], settings)
            below[by].append(ncc - result[0]["probe_acc"])
    assert max(below["loss"]) <= 0.02, below["loss"]
    assert max(below["accuracy"]) > 0.02, below["accuracy"]  # the held-out accuracy's choice


def quiet_noise(n: int, seed: int) -> ArrayDataset:
    """K classes on 4 dimensions (class k: +80 on dimension k, sd 15) beside 60 dimensions
    of small noise (sd 3) that carry no class, as 1 x 1 uint8 images."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = torch.cat([88 + 15 * torch.randn(n, K, generator=gen),
                   128 + 3 * torch.randn(n, 60, generator=gen)], 1)  # fmt: skip
    x[torch.arange(n), y] += 80
    return ArrayDataset(x.round().clamp(0, 255).to(torch.uint8)[:, :, None, None],
                        {"clean": y}, list("abcd"), (0.5,) * 64, (0.2,) * 64)  # fmt: skip


def test_one_scale_per_block_keeps_quiet_noise_quiet_where_per_feature_scaling_amplifies_it():
    """Scaling each feature by its own sd gives 60 quiet noise dimensions the weight of the
    4 that carry the class, and 72 training rows then fit the noise (far below NCC, which
    measures in the block's own geometry); one scale per block keeps the geometry."""
    model = Pixels()
    for seed in (0, 1):
        train, test = quiet_noise(80, seed), quiet_noise(1000, 100 + seed)
        xtr, ytr = train.images.double().flatten(1), train.labels["clean"]
        mu = torch.stack([xtr[ytr == k].mean(0) for k in range(K)])
        xte = test.images.double().flatten(1)
        ncc = (torch.cdist(xte, mu).argmin(1) == test.labels["clean"]).double().mean().item()
        assert ncc >= 0.99
        acc = {}
        for per in ("feature", "block"):
            settings = ProbeSettings(augment=False, standardize_per=per, eval_batch_size=1000)
            acc[per] = probe(model, train, test, K, ["first"], settings)[0]["probe_acc"]
        assert acc["block"] >= ncc - 0.02 and acc["feature"] < ncc - 0.1, (ncc, acc)


def test_choose_ranks_by_held_out_loss_or_accuracy_then_the_smaller_lr():
    from nclayers.probing.holdout import choose

    acc = torch.tensor([[0.60, 0.66, 0.58], [0.9, 0.9, 0.9], [0.7, 0.7, 0.5]])
    loss = torch.tensor([[1.40, 1.60, 2.70], [0.3, 0.3, 0.3], [float("nan"), 0.9, 0.8]])
    lrs = [0.01, 0.3, 1.0]
    assert choose(acc, loss, lrs) == [0, 0, 2]  # lowest loss (NaN: a diverged head, last)
    assert choose(acc, loss, lrs, by="accuracy") == [1, 0, 1]  # ties: the lower loss
    assert choose(acc, loss, [1.0, 0.3, 0.01])[1] == 2  # full ties: the smallest lr
    with pytest.raises(NCLayersError, match="by='f1'"):
        choose(acc, loss, lrs, by="f1")


def test_a_probe_recorded_before_choose_by_and_standardize_per_reads_as_what_it_did():
    """A probe recorded before `choose_by` existed chose by accuracy, one recorded before
    `standardize_per` standardised per feature: neither is the measurement of today's
    defaults (a single lr chose nothing, raw features were not standardised: still are)."""
    from nclayers.config import canonical_settings

    then = {"probe.lrs": [0.01, 0.1], "probe.standardize": True}
    assert canonical_settings(then) == {
        **then,
        "probe.choose_by": "accuracy",
        "probe.standardize_per": "feature",
    }
    paper = {"probe.lrs": [0.1], "probe.standardize": False}
    assert canonical_settings(paper) == paper
    now = {"probe.lrs": [0.01, 0.1], "probe.choose_by": "loss", "probe.standardize": True,
           "probe.standardize_per": "block"}  # fmt: skip
    assert canonical_settings(now) == now


def test_each_head_of_the_grid_equals_the_head_trained_alone_at_its_lr(resnet):
    """The grid shares the forward pass, not the optimisation: the head of lr j is the
    head a single-lr probe trains on the same rows."""

    train, test = images(60), images(16, seed=1)
    opts = dict(epochs=3, milestones=(2,), batch_size=16, weight_decay=1e-3, augment=False,
                cache_dtype="float32")  # fmt: skip
    lrs = [0.03, 0.3, 3.0]
    grid = fit(resnet, train, test, K, lrs=lrs, **opts)
    rows, _ = held_out(train, 0.1, 0, "clean")
    assert grid.train_samples == len(rows) == 52  # 2 of each class of 15 held out
    for j, lr in enumerate(lrs):
        alone = fit(resnet, train.subset(rows), test, K, lrs=[lr], **opts)
        w, b = alone.heads.weight[:, :, 0], alone.heads.bias[:, :, 0]
        tol = 1e-5 * float(w.detach().abs().max())  # float rounding of a differently blocked matmul
        torch.testing.assert_close(grid.grid.weight[:, :, j], w, rtol=1e-4, atol=tol)
        torch.testing.assert_close(grid.grid.bias[:, :, j], b, rtol=1e-4, atol=tol)
        mine = grid.history.where(probe_lr=lr)
        assert [r["train_acc"] for r in mine] == alone.history.column("train_acc")
    for i, r in enumerate(grid):  # the chosen head is the grid's head of the chosen lr
        j = lrs.index(r["probe_lr"])
        assert torch.equal(grid.heads.weight[i, :, 0], grid.grid.weight[i, :, j])


def test_held_out_rows_are_class_balanced_seeded_and_never_train():

    y = torch.tensor([0] * 30 + [1] * 50 + [2] * 20)
    ds = ArrayDataset(torch.zeros(100, 1, 1, 1, dtype=torch.uint8), {"clean": y}, list("abc"),
                      (0.5,), (0.5,))  # fmt: skip
    rows, val = held_out(ds, 0.1, seed=3, view="clean")
    assert set(rows.tolist()).isdisjoint(val.tolist())
    assert sorted(rows.tolist() + val.tolist()) == list(range(100))
    assert torch.bincount(y[val]).tolist() == [3, 5, 2]  # 10% of each class
    assert torch.equal(held_out(ds, 0.1, seed=3, view="clean")[1], val)  # seeded
    assert not torch.equal(held_out(ds, 0.1, seed=4, view="clean")[1], val)


def test_the_probe_trains_on_rows_apart_from_those_that_choose_its_lr():
    """The held-out rows get features of the next class: had they trained a head, the
    training set would not be separable (train accuracy below 1); they are, to the
    heads, wrong every time."""

    train, y = separable(200, seed=1)
    _, val = held_out(train, 0.1, seed=0, view="clean")  # what the probe holds out
    images = train.images.clone()
    images[val] = images[val].roll(1, dims=1)  # the class signal on the next channel
    crafted = ArrayDataset(images, {"clean": y}, list("abcd"), (0.3,) * 4, (0.3,) * 4)
    result = fit(Pixels(), crafted, separable(40, seed=2)[0], K, ["first"], lrs=[0.1, 1.0],
                 augment=False, batch_size=32)  # fmt: skip
    assert (result.train_samples, result.val_samples) == (180, 20)
    assert [r["train_acc"] for r in result.history.where(epoch=10)] == [1.0, 1.0]
    assert result.selection.column("val_acc") == [0.0, 0.0]
    assert result[0]["probe_acc"] == 1.0


def test_the_underfit_flag_fires_more_than_two_points_below_ncc_only():
    from nclayers.probing import UNDERFIT, underfit, underfit_note

    assert underfit(0.50, 0.60) is True
    assert underfit(0.585, 0.60) is False  # within 2 points
    assert underfit(0.70, 0.60) is False
    assert underfit(None, 0.6) is None and underfit(0.5, None) is None
    rows = [{"block": "a", "probe_acc": 0.3, "ncc_acc": 0.5, "probe_underfit": True},
            {"block": "b", "probe_acc": 0.5, "ncc_acc": 0.5, "probe_underfit": False}]  # fmt: skip
    note = underfit_note(rows)
    assert note.startswith(UNDERFIT) and "a (0.300 vs NCC 0.500)" in note and " b " not in note
    assert underfit_note(rows[1:]) is None


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_fix(resnet, tmp_path, monkeypatch):
    train, test = images(32), images(16, seed=1)
    with pytest.raises(ValueError, match="matches no module"):
        fit(resnet, train, test, K, blocks="nothing*", **FAST)
    with pytest.raises(ValueError, match="blocks='auto' found no repeated blocks"):
        fit(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), train, test, K, **FAST)
    with pytest.raises(ValueError, match="train: the split is empty"):
        fit(resnet, train.subset(torch.arange(0)), test, K, **FAST)
    with pytest.raises(ValueError, match="test: the split is empty"):
        fit(resnet, train, test.subset(torch.arange(0)), K, **FAST)
    with pytest.raises(ValueError, match=r"set probe\.lrs=\[0\.05\]"):
        ProbeSettings(lr=0.05)  # the single lr of before: a list now
    with pytest.raises(ValueError, match=r"pass nclayers\.config\.ProbeSettings"):
        probe(resnet, train, test, K, "auto", 0.1)
    with pytest.raises(ValueError, match="no held-out rows"):
        fit(resnet, train.subset(torch.arange(4)), test, K, lrs=[0.1, 1.0], **FAST)
    with pytest.raises(ValueError, match="num_classes=2"):
        fit(resnet, train, test, 2, **FAST)
    with pytest.raises(ValueError, match="set augment=False"):
        fit(resnet, train, test, K, mode="cache", **FAST)
    with pytest.raises(ValueError, match="no cache_dir"):
        fit(resnet, train, test, K, augment=False, cache_budget_gb=0.0, **FAST)

    class Usage:
        free = 10

    monkeypatch.setattr(shutil, "disk_usage", lambda _path: Usage)
    with pytest.raises(ValueError, match=r"only 0\.00 GB free"):
        fit(resnet, train, test, K, augment=False, cache_budget_gb=0.0, cache_dir=tmp_path,
              **FAST)  # fmt: skip
    monkeypatch.undo()
    state = fit(resnet, train, test, K, epochs=1, batch_size=16, **FAST).state
    with pytest.raises(ValueError, match="probe the same model, blocks and lrs"):
        fit(resnet, train, test, K, ["layer4.1"], state=state, **FAST)
    with pytest.raises(ValueError, match="raise epochs"):
        fit(resnet, train, test, K, epochs=0 + 1, state={**state, "epoch": 2}, **FAST)


def test_public_api():
    assert nclayers.probe is probe
    heads = ProbeHeads([3, 5], 2, n_lr=3)
    assert heads.weight.shape == (2, 5, 3, 2) and heads.bias.shape == (2, 1, 3, 2)
    assert heads(torch.randn(7, 8)).shape == (2, 7, 3, 2)


# ----------------------------------------------------------------------------- two ranks
WORLD = 2


def ddp_runs(model, rank_tag: str, out: Path) -> None:
    train, test = images(48), images(20, seed=1)
    for mode in ("stream", "cache"):
        table = fit(model, train, test, K, epochs=2, batch_size=16, augment=False,
                    mode=mode, standardize=True, lrs=[0.03, 0.3, 3.0], **FAST)  # fmt: skip
        torch.save(
            {"theta": table.heads.theta.detach(), "scale": table.heads.scale,
             "acc": table.column("probe_acc"), "loss": table.history.column("loss"),
             "lr": table.column("probe_lr"), "val": table.selection.column("val_acc"),
             "n": table[0]["n"]},
            out / f"{mode}{rank_tag}.pt",
        )  # fmt: skip


def worker(rank: int, out: Path, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model = build_model("resnet18", num_classes=K, width=4)
        model.load_state_dict(torch.load(out / "init.pt", weights_only=True))
        ddp_runs(model.eval(), f".rank{rank}", out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo"
)
def test_two_gloo_ranks_train_the_heads_of_one_process(resnet, tmp_path):
    torch.save(resnet.state_dict(), tmp_path / "init.pt")
    env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK") if k in os.environ}
    try:
        mp.spawn(worker, args=(tmp_path, free_port()), nprocs=WORLD, join=True)
    finally:
        os.environ.update(env)
    ddp_runs(resnet, "", tmp_path)
    for mode in ("stream", "cache"):
        one = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
        for rank in range(WORLD):
            two = torch.load(tmp_path / f"{mode}.rank{rank}.pt", weights_only=True)
            torch.testing.assert_close(two["theta"], one["theta"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(two["scale"], one["scale"], rtol=1e-5, atol=1e-6)
            assert two["acc"] == one["acc"] and two["n"] == one["n"] == 20
            assert two["lr"] == one["lr"] and two["val"] == one["val"]  # the same choice
            assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- the job
JOB = ["data.name=digits", "data.train_subset=120", "data.test_subset=60", "model.width=4",
       "probe.epochs=2", "probe.batch_size=32", "probe.milestones=[1]", "probe.eval_batch_size=64",
       "device=cpu", "run=r"]  # fmt: skip


def run_folder(tmp_path: Path, name: str) -> Path:
    """A run folder with a checkpoint, as `nclayers train` leaves it."""
    torch.manual_seed(0)
    folder = tmp_path / name
    folder.mkdir()
    torch.save({"model": build_model("resnet18", 10, width=4).state_dict()},
               folder / "checkpoint.pt")  # fmt: skip
    return folder


def test_cli_probe_fills_probe_acc_into_the_analysis(tmp_path, capsys):
    from nclayers.cli import main
    from nclayers.table import Table

    out = run_folder(tmp_path, "run")
    assert main(["analyze", *JOB, "--out", str(out), "-q"]) == 0
    assert main(["probe", *JOB, "--out", str(out), "-q"]) == 0
    assert "probe_acc" in capsys.readouterr().out
    layers = Table.from_csv(out / "layers.csv")
    assert len(layers) == 16  # no second table: 8 train + 8 test rows of the analysis
    test = layers.where(split="test", view="clean")
    assert all(0.0 <= r["probe_acc"] <= 1.0 and r["nc1"] > 0 for r in test)
    assert all(r["probe_acc"] is None for r in layers.where(split="train"))
    history = Table.from_csv(out / "probe.csv")
    assert len(history) == 2 * 8 * 5 and {r["run"] for r in history} == {"r"}  # 5 lrs
    assert [r["lr"] for r in history.where(layer=1, probe_lr=0.1)] == pytest.approx([0.1, 0.02])
    assert {r["probe_lr"] for r in test} <= {0.01, 0.03, 0.1, 0.3, 1.0}
    for r in test:  # the flag: probe accuracy more than 2 points below NCC's
        assert r["probe_underfit"] == (r["probe_acc"] < r["ncc_acc"] - 0.02)
    saved = torch.load(out / "probe_heads.pt", weights_only=True)
    assert saved["probe_acc"] == [r["probe_acc"] for r in test]
    assert len(saved["linear"]) == 8 and saved["linear"][7]["weight"].shape == (10, 32)
    summary = json.loads((out / "summary.json").read_text())
    assert "accuracy" in summary["analyze"] and summary["probe"]["mode"] == "stream"
    assert summary["probe"]["test_samples"] == 60 and summary["probe"]["train_samples"] == 120
    assert summary["probe"]["val_samples"] == 10  # one of the 12 rows of each class
    assert summary["probe"]["lr"] == {r["block"]: r["probe_lr"] for r in test}
    assert saved["probe_lr"] == [r["probe_lr"] for r in test]
    stages = json.loads((out / "stages.json").read_text())
    assert "probe" in stages and "analyze" in stages
    assert (out / "probe_acc.png").is_file() and not (out / "probe_state.pt").exists()

    # The saved heads re-evaluate to the same accuracies.
    from nclayers.config import load_config
    from nclayers.data import load_dataset
    from nclayers.jobs import RunFolder, load_model

    cfg = load_config(None, JOB)
    model = load_model(cfg, RunFolder(out), 10).eval()
    acc, _, _ = score_heads(model, load_heads(saved), find_blocks(model),
                            load_dataset(cfg.data, "test"))  # fmt: skip
    assert acc[:, 0].tolist() == pytest.approx(saved["probe_acc"])

    # What the job returns (the CLI prints it) carries the view's NCC accuracy and flag.
    from nclayers.jobs import probe_job

    again = probe_job(cfg, out, progress=False)
    shown = {r["block"]: (r["probe_acc"], r["ncc_acc"], r["probe_underfit"]) for r in again}
    assert shown == {r["block"]: (r["probe_acc"], r["ncc_acc"], r["probe_underfit"]) for r in test}


def test_probe_job_resumes_after_an_interruption(tmp_path, monkeypatch):
    from nclayers.config import load_config
    from nclayers.jobs import probe_job
    from nclayers.jobs.folder import PROBE_STATE, RunFolder

    cfg = load_config(None, JOB)
    whole = probe_job(cfg, run_folder(tmp_path, "a"), progress=False)
    out = run_folder(tmp_path, "b")
    real_save = RunFolder.save_torch

    class Stop(Exception):
        pass

    def save_then_stop(self, name, obj):
        real_save(self, name, obj)
        if name == PROBE_STATE:
            raise Stop

    monkeypatch.setattr(RunFolder, "save_torch", save_then_stop)
    with pytest.raises(Stop):
        probe_job(cfg, out, progress=False)
    monkeypatch.undo()
    assert (out / PROBE_STATE).is_file()
    resumed = probe_job(cfg, out, progress=False)
    assert resumed.resumed_from == 1
    assert torch.equal(resumed.heads.theta, whole.heads.theta)
    assert json.loads((out / "summary.json").read_text())["probe"]["resumed_from_epoch"] == 1


def test_probe_job_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    from nclayers.cli import main

    out = tmp_path / "run"
    out.mkdir()
    torch.save(build_model("resnet18", 10, width=8).state_dict(), out / "checkpoint.pt")
    assert main(["probe", *JOB, "--out", str(out), "-q"]) == 2
    assert "does not match" in capsys.readouterr().err


# ----------------------------------------------------------------------------- image folders
def test_probe_on_an_image_folder_streams_caches_in_bf16_and_skips_bad_files(tmp_path):
    from nclayers.data.imagefolder import load_folder_split
    from nclayers.data.make_folder import make_image_folder

    make_image_folder(tmp_path / "f", per_class=6, val_per_class=2, size=40, classes=K)
    victim = sorted((tmp_path / "f" / "train").glob("*/*_3.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated
    opts = dict(image_size=32, resize=36, workers=0, skip_bad=True)
    train = load_folder_split(tmp_path / "f", "train", **opts)
    test = load_folder_split(tmp_path / "f", "test", **opts)
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=K, width=4).eval()
    kw = dict(epochs=2, batch_size=8, milestones=(1,), **FAST)
    stream = fit(model, train, test, K, augment=True, **kw)  # random resized crops
    assert stream.mode == "stream" and stream.skipped == 1 and stream.train_samples == 24
    assert len(stream.history) == 2 * 8 and stream.test_samples == 8
    bf16 = fit(model, train, test, K, augment=False, **kw)
    f32 = fit(model, train, test, K, augment=False, cache_dtype=torch.float32, **kw)
    assert bf16.mode == f32.mode == "cache" and bf16.skipped == f32.skipped == 1
    # bf16 keeps 8 significant bits of every feature: heads agree to about that.
    for (w, b), (w1, b1) in zip(linear_weights(bf16), linear_weights(f32), strict=True):
        torch.testing.assert_close(w, w1, rtol=0.05, atol=0.02)
        torch.testing.assert_close(b, b1, rtol=0.05, atol=0.02)
    assert bf16.summary()["skipped"] == 1 and heads_state(bf16)["meta"]["mode"] == "cache"
