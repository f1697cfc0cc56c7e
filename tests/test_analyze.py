"""The one-pass analysis against features collected by hand and measured independently."""

from __future__ import annotations

import pytest
import torch

import nclayers
from nclayers import metrics
from nclayers.models import build_model, find_blocks
from nclayers.taps import Taps, pool_output

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=10, width=8).eval()
    return net


def batches(n=120, bs=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.arange(n) % 10
    noisy = y[torch.randperm(n, generator=gen)]
    return [(x[i : i + bs], {"clean": y[i : i + bs], "noisy": noisy[i : i + bs]})
            for i in range(0, n, bs)]  # fmt: skip


def collect(model, data, blocks):
    """All pooled features of every block, kept in memory (what analyze avoids)."""
    feats = [[] for _ in blocks]
    with torch.no_grad(), Taps(blocks, lambda i, f: feats[i].append(f)):
        for x, _ in data:
            model(x)
    return [torch.cat(f).double().numpy() for f in feats]


def test_analyze_matches_collected_features(model):
    data = batches()
    blocks = find_blocks(model)
    feats = collect(model, data, blocks)
    table = nclayers.analyze(model, data, num_classes=10, progress=False)
    assert len(table) == 2 * len(blocks) == 16
    for view in ("clean", "noisy"):
        labels = torch.cat([y[view] for _, y in data]).numpy()
        rows = table.where(view=view)
        assert [r["layer"] for r in rows] == list(range(1, 9))
        for r, f, b in zip(rows, feats, blocks, strict=True):
            assert r["block"] == b.name and r["dim"] == f.shape[1] and r["n"] == 120
            assert r["nc1"] == pytest.approx(metrics.nc1(f, labels), rel=1e-10)
            assert r["nc2"] == pytest.approx(metrics.nc2(f, labels), rel=1e-10)
            assert r["cdnv_mean"] == pytest.approx(r["nc1"] / 90, rel=1e-12)
            assert r["ncc_acc"] is None
    logits = torch.cat([model(x) for x, _ in data]).argmax(1)
    clean = torch.cat([y["clean"] for _, y in data])
    assert table.accuracy["clean"] == pytest.approx((logits == clean).float().mean().item())


def test_ncc_from_reference(model):
    ref_data, test_data = batches(seed=1), batches(seed=2)
    blocks = find_blocks(model)
    ref_feats, test_feats = collect(model, ref_data, blocks), collect(model, test_data, blocks)
    ref_labels = torch.cat([y["clean"] for _, y in ref_data]).numpy()
    test_labels = torch.cat([y["clean"] for _, y in test_data]).numpy()
    table = nclayers.analyze(model, test_data, 10, reference=ref_data, progress=False)
    for r, rf, tf in zip(table.where(view="clean"), ref_feats, test_feats, strict=True):
        expected = metrics.ncc_accuracy(tf, test_labels, rf, ref_labels)
        assert r["ncc_acc"] == pytest.approx(expected, abs=1e-12)


def test_pooling_rules():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    torch.testing.assert_close(pool_output(x, "nchw"), x.mean(dim=(2, 3)))
    torch.testing.assert_close(pool_output(x, "nhwc"), x.mean(dim=(1, 2)))
    t = torch.randn(2, 7, 6)
    torch.testing.assert_close(pool_output(t, "tokens", prefix_tokens=1), t[:, 1:].mean(1))
    torch.testing.assert_close(pool_output(t, "cls"), t[:, 0])
    bf = x.to(torch.bfloat16)
    assert pool_output(bf, "nchw").dtype == torch.float32
    with pytest.raises(ValueError, match="pool='tokens'"):
        pool_output(x, "tokens")


def test_explicit_blocks_and_globs(model):
    assert [b.name for b in find_blocks(model, "layer2.*")] == ["layer2.0", "layer2.1"]
    assert [b.name for b in find_blocks(model, ["layer4.1", "layer1.0"])] == [
        "layer1.0", "layer4.1",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="matches no module"):
        find_blocks(model, "layer9.*")
    table = nclayers.analyze(model, batches(), 10, blocks="layer3.*", progress=False)
    assert {r["block"] for r in table} == {"layer3.0", "layer3.1"}


@pytest.mark.parametrize(("name", "count"), [("resnet18", 8), ("resnet34", 16), ("resnet50", 16),
                                             ("resnet101", 33), ("resnet152", 50)])  # fmt: skip
def test_resnet_block_counts(name, count):
    net = build_model(name, 10, width=4)
    assert len(find_blocks(net)) == count
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_minus_one_view_equals_the_kept_samples_alone(model):
    """A view whose label is -1 on some samples measures the other samples only: its
    rows (statistics, NCC accuracy, model accuracy) equal those of a pass over them."""
    data, ref = batches(seed=3), batches(seed=4)
    gen = torch.Generator().manual_seed(5)
    part = []
    for x, y in data:
        p = y["clean"].clone()
        p[torch.rand(len(p), generator=gen) < 0.3] = -1
        part.append((x, {"clean": y["clean"], "part": p}))
    part[0][1]["part"][:10] = torch.arange(10)  # every class keeps a sample
    kept = []
    for x, y in part:
        keep = y["part"] >= 0
        kept.append((x[keep], {"part": y["part"][keep]}))
    ref_table = nclayers.analyze(model, ref, 10, progress=False)
    both = nclayers.analyze(model, part, 10, reference=ref_table, progress=False)
    alone = nclayers.analyze(model, kept, 10, reference=ref_table, progress=False)
    n = sum(len(y["part"]) for _, y in kept)
    assert n < 120
    for r, a in zip(both.where(view="part"), alone, strict=True):
        assert r["n"] == a["n"] == n
        for key in ("nc1", "nc2", "cdnv_mean"):
            assert r[key] == pytest.approx(a[key], rel=1e-9)
        assert r["ncc_acc"] == a["ncc_acc"]
    assert both.accuracy["part"] == alone.accuracy["part"]
    assert {r["n"] for r in both.where(view="clean")} == {120}


def test_invalid_labels_raise_after_the_pass(model):
    data = batches()
    data[1][1]["noisy"][4] = 10
    with pytest.raises(ValueError, match=r"1 values are outside \[0, 10\) and not -1"):
        nclayers.analyze(model, data, 10, progress=False)


def test_classic_nc1_over_views(model):
    data = batches()
    blocks = find_blocks(model, "layer2.*")
    feats = collect(model, data, blocks)
    table = nclayers.analyze(model, data, 10, blocks=blocks, classic_nc1=True, progress=False)
    for view in ("clean", "noisy"):
        labels = torch.cat([y[view] for _, y in data]).numpy()
        for r, f in zip(table.where(view=view), feats, strict=True):
            assert r["nc1_classic"] == pytest.approx(metrics.nc1_classic(f, labels), rel=1e-8)
