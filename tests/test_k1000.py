"""1,000 classes: NC1, NC2 and NCC accuracy against an independent float64 reference on
random features; the streaming path's cost does not grow with the class pairs; and the
whole chain (generated 1,000-class folder, analyze, probe) runs end to end."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nclayers
from nclayers.metrics import (
    BlockStats,
    ClassStats,
    LabelViews,
    collapse_metrics,
    nc1,
    nc2,
    ncc_accuracy,
)

pytestmark = pytest.mark.usefixtures("one_thread")

K, D, PER_CLASS = 1000, 6, 3


def random_split(seed: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """PER_CLASS samples of each of K classes around random class centres, float64."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, D)) * 2.0 + offset
    y = np.repeat(np.arange(K), PER_CLASS)
    rng.shuffle(y)
    return centres[y] + rng.normal(size=(len(y), D)), y


def reference_metrics(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Paper Eqs. 4-5 written out with numpy in float64: per-class means and variances,
    every ordered pair's CDNV from explicit differences, the Gram of centred means."""
    means = np.stack([x[y == k].mean(0) for k in range(K)])
    var = np.array([((x[y == k] - means[k]) ** 2).sum(1).mean() for k in range(K)])
    dist = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    off = ~np.eye(K, dtype=bool)
    value_nc1 = ((var[:, None] + var[None, :])[off] / (2 * dist[off])).sum()
    counts = np.bincount(y, minlength=K)
    centred = means - (counts[:, None] * means).sum(0) / counts.sum()
    gram = centred @ centred.T
    etf = (np.eye(K) - 1.0 / K) / np.sqrt(K - 1)
    value_nc2 = np.linalg.norm(gram / np.linalg.norm(gram) - etf)
    return value_nc1, value_nc2


def reference_ncc(x, y, ref_x, ref_y) -> float:
    means = np.stack([ref_x[ref_y == k].mean(0) for k in range(K)])
    pred = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == y).mean())


def test_functional_metrics_with_1000_classes_equal_a_float64_reference():
    x, y = random_split(0)
    want_nc1, want_nc2 = reference_metrics(x, y)
    assert nc1(x, y, K) == pytest.approx(want_nc1, rel=1e-10)
    assert nc2(x, y, K) == pytest.approx(want_nc2, rel=1e-10)
    ref_x, ref_y = random_split(0)  # same centres, other noise: not a trivial accuracy
    ref_x = ref_x + np.random.default_rng(5).normal(size=ref_x.shape)
    want_ncc = reference_ncc(x, y, ref_x, ref_y)
    assert 0.05 < want_ncc < 0.95
    assert ncc_accuracy(x, y, ref_x, ref_y, K) == pytest.approx(want_ncc, abs=1e-12)


def test_streaming_block_statistics_with_1000_classes_and_two_views():
    """analyze's path: float32 features far from the origin in batches, two labels views
    (one with a sample left out), merged statistics, the metrics of both views at once."""
    x, y = random_split(1, offset=1e3)
    noisy = y.copy()
    noisy[:1500] = np.random.default_rng(2).permutation(noisy[:1500])  # shuffled labels
    noisy[7] = -1  # not part of this view
    feats = torch.from_numpy(x).float()  # float32 as the taps give them
    views = LabelViews(["clean", "noisy"], K)
    stats = BlockStats(views, D)
    for i in range(0, len(y), 256):
        labels = [torch.from_numpy(y[i : i + 256]), torch.from_numpy(noisy[i : i + 256])]
        stats.update(feats[i : i + 256], views.plan(labels))
    assert stats.s1.shape == stats.s2.shape == (2 * (K + 3), D)  # K x D sums per view
    assert stats.s1.dtype == torch.float64
    per_view = stats.class_stats()
    got = collapse_metrics(list(per_view.values()))
    x32 = feats.double().numpy()
    keep = noisy >= 0
    for row, (xs, ys) in enumerate([(x32, y), (x32[keep], noisy[keep])]):
        want_nc1, want_nc2 = reference_metrics(xs, ys)
        assert got[row, 0] == len(ys)
        assert float(got[row, 1]) == pytest.approx(want_nc1, rel=1e-6)
        assert float(got[row, 2]) == pytest.approx(want_nc2, rel=1e-6)
    merged = ClassStats(K, D)
    merged.update(feats[:1000], torch.from_numpy(y[:1000])).update(
        feats[1000:], torch.from_numpy(y[1000:])
    )
    assert merged.nc1() == pytest.approx(float(got[0, 1]), rel=1e-9)


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def metric_ops(k: int) -> tuple[int, int]:
    """(operations of one BlockStats update, of the end-of-pass metrics) with k classes."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(64, D, generator=gen)
    labels = torch.arange(64) % k
    views = LabelViews(["clean"], k)
    stats = BlockStats(views, D)
    stats.update(feats, views.plan([labels]))  # the first batch also fixes the shift
    with CountOps() as update:
        stats.update(feats, views.plan([labels]))
    extra = torch.arange(k)  # every class present
    stats.update(torch.randn(k, D, generator=gen), views.plan([extra]))
    with CountOps() as metrics:
        collapse_metrics(list(stats.class_stats().values()))
    return sum(update.ops.values()), sum(metrics.ops.values())


def test_cost_in_operations_does_not_grow_with_the_classes():
    """No Python loop over classes or pairs: the same operations for 10 and 1000 classes
    (a loop over the 999,000 pairs, or over row chunks, would multiply them)."""
    assert metric_ops(10) == metric_ops(1000)


def test_1000_class_folder_end_to_end(tmp_path):
    from nclayers.data import FolderBatches
    from nclayers.data.imagefolder import load_folder_split
    from nclayers.data.make_folder import make_k1000_folder
    from nclayers.models import build_model

    manifest = make_k1000_folder(tmp_path / "k1000", per_class=2, val_per_class=1, size=16)
    assert manifest["classes"] == K and manifest["train_files"] == 2 * K
    assert set(manifest["special"]["train"]) == {"cmyk", "grey", "png"}
    opts = dict(image_size=16, resize=16, workers=0)
    train = load_folder_split(tmp_path / "k1000", "train", **opts)
    test = load_folder_split(tmp_path / "k1000", "test", **opts)
    assert train.num_classes == test.num_classes == K and len(test) == K
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=K, width=4).eval()
    kw = dict(progress=False, amp=False)
    ref = nclayers.analyze(model, FolderBatches(train, 500), K, **kw)
    table = nclayers.analyze(model, FolderBatches(test, 500), K, reference=ref, **kw)
    assert len(table) == 8 and all(r["n"] == K for r in table)
    assert all(np.isfinite(r["nc1"]) and 0 < r["nc2"] < 2 for r in table)
    assert all(0.0 <= r["ncc_acc"] <= 1.0 for r in table)
    settings = nclayers.ProbeSettings(epochs=1, batch_size=250, augment=False, lrs=[0.1],
                                      eval_batch_size=500)  # fmt: skip
    probes = nclayers.probe(model, train, test, K, settings=settings)
    assert len(probes) == 8 and all(r["n"] == K for r in probes)
    assert probes.heads.num_classes == K
