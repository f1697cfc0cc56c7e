"""Metrics against an independent float64 two-pass reference, and their properties."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from nclayers import metrics
from nclayers.metrics import BlockNCC, BlockStats, ClassStats, LabelViews, NCCAccuracy, merge_all


# --------------------------------------------------------------- independent reference
def two_pass(features: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    """Textbook two-pass float64 NC1/NC2, written from the paper's equations directly."""
    h = features.astype(np.float64)
    means = np.stack([h[labels == c].mean(axis=0) for c in range(k)])
    var = np.array([((h[labels == c] - means[c]) ** 2).sum(axis=1).mean() for c in range(k)])
    nc1 = 0.0
    for a in range(k):
        for b in range(k):
            if a != b:
                nc1 += (var[a] + var[b]) / (2 * np.sum((means[a] - means[b]) ** 2))
    mu_g = h.mean(axis=0)
    m = (means - mu_g).T  # D x K
    g = m.T @ m
    etf = (np.eye(k) - np.ones((k, k)) / k) / math.sqrt(k - 1)
    nc2 = np.linalg.norm(g / np.linalg.norm(g) - etf)
    sw = sum((h[labels == c] - means[c]).T @ (h[labels == c] - means[c]) for c in range(k))
    sw = sw / len(h)
    sb = (means - mu_g).T @ (means - mu_g) / k
    classic = np.trace(sw @ np.linalg.pinv(sb)) / k
    return {"nc1": nc1, "nc2": nc2, "var": var, "means": means, "classic": classic}


def make_data(n=300, d=12, k=5, seed=0, spread=1.0, offset=0.0, balanced=False):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3 + offset
    labels = np.tile(np.arange(k), n // k) if balanced else rng.integers(0, k, size=n)
    labels[:k] = np.arange(k)  # every class present
    feats = centres[labels] + rng.normal(size=(n, d)) * spread
    return feats, labels


# --------------------------------------------------------------- golden values
def test_golden_by_hand():
    # Two classes in 1-D: {0, 2} (mean 1, var 1) and {10} (mean 10, var 0).
    feats = np.array([[0.0], [2.0], [10.0]])
    labels = np.array([0, 0, 1])
    # Ordered pairs: 2 x (1 + 0) / (2 * 81)
    assert metrics.nc1(feats, labels) == pytest.approx(2 * 1 / 162, rel=1e-15)
    assert metrics.cdnv_mean(feats, labels) == pytest.approx(1 / 162, rel=1e-15)
    # Global mean over samples is 4, so M = [-3, 6] and G = [[9, -18], [-18, 36]]:
    # G/||G||_F - [[1, -1], [-1, 1]]/2 = [[-0.3, 0.1], [0.1, 0.3]], norm sqrt(0.2).
    assert metrics.nc2(feats, labels) == pytest.approx(math.sqrt(0.2), rel=1e-14)
    # Balanced two classes: centred means are antipodal, the K=2 simplex ETF exactly.
    balanced = np.array([[0.0], [2.0], [9.0], [11.0]])
    assert metrics.nc2(balanced, np.array([0, 0, 1, 1])) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_two_pass_reference(seed):
    feats, labels = make_data(seed=seed)
    ref = two_pass(feats, labels, 5)
    stats = ClassStats(5, feats.shape[1], scatter=True)
    for chunk in np.array_split(np.arange(len(feats)), 7):
        stats.update(torch.from_numpy(feats[chunk]), torch.from_numpy(labels[chunk]))
    np.testing.assert_allclose(stats.variances.numpy(), ref["var"], rtol=1e-12)
    np.testing.assert_allclose(stats.means.numpy(), ref["means"], rtol=1e-12, atol=1e-13)
    assert stats.nc1() == pytest.approx(ref["nc1"], rel=1e-12)
    assert stats.nc2() == pytest.approx(ref["nc2"], rel=1e-12)
    assert stats.nc1_classic() == pytest.approx(ref["classic"], rel=1e-9)
    assert metrics.nc1(feats, labels) == pytest.approx(ref["nc1"], rel=1e-12)
    assert metrics.nc2(torch.from_numpy(feats), torch.from_numpy(labels)) == pytest.approx(
        ref["nc2"], rel=1e-12
    )
    assert metrics.nc1_classic(feats, labels) == pytest.approx(ref["classic"], rel=1e-9)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_collapsed_far_from_origin(offset):
    """Class means near 1e3-1e4, spread 1e-2: float32 input, exact float64 statistics."""
    rng = np.random.default_rng(3)
    k, d, n = 4, 16, 2000
    centres = offset + rng.normal(size=(k, d)) * 0.5
    labels = rng.integers(0, k, size=n)
    feats32 = (centres[labels] + rng.normal(size=(n, d)) * 1e-2).astype(np.float32)
    ref = two_pass(feats32.astype(np.float64), labels, k)
    stats = ClassStats(k, d)
    for chunk in np.array_split(np.arange(n), 13):
        stats.update(torch.from_numpy(feats32[chunk]), torch.from_numpy(labels[chunk]))
    assert stats.nc1() == pytest.approx(ref["nc1"], rel=1e-6)
    assert stats.nc2() == pytest.approx(ref["nc2"], rel=1e-6)
    # The shortcut E[h^2] - E[h]^2 in float32 is far off here: the reason for Chan's update.
    x = torch.from_numpy(feats32[labels == 0])
    naive = ((x * x).mean(0) - x.mean(0) ** 2).sum().item()
    assert abs(naive - ref["var"][0]) / ref["var"][0] > 1e-2


def test_bfloat16_features():
    feats, labels = make_data(seed=5)
    x = torch.from_numpy(feats).to(torch.bfloat16)
    ref = two_pass(x.double().numpy(), labels, 5)
    stats = ClassStats(5, feats.shape[1]).update(x, torch.from_numpy(labels))
    assert stats.nc1() == pytest.approx(ref["nc1"], rel=1e-12)


# --------------------------------------------------------------- properties
def test_sample_order_invariance():
    feats, labels = make_data(seed=7)
    perm = np.random.default_rng(0).permutation(len(labels))
    assert metrics.nc1(feats[perm], labels[perm]) == pytest.approx(
        metrics.nc1(feats, labels), rel=1e-12
    )
    assert metrics.nc2(feats[perm], labels[perm]) == pytest.approx(
        metrics.nc2(feats, labels), rel=1e-12
    )


def test_class_relabelling_invariance():
    feats, labels = make_data(seed=8)
    relabel = np.array([3, 0, 4, 1, 2])
    assert metrics.nc1(feats, relabel[labels]) == pytest.approx(
        metrics.nc1(feats, labels), rel=1e-12
    )
    assert metrics.nc2(feats, relabel[labels]) == pytest.approx(
        metrics.nc2(feats, labels), rel=1e-12
    )


def test_rotation_scale_translation_invariance():
    feats, labels = make_data(seed=9)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(12, 12)))
    moved = 3.7 * feats @ q + 42.0
    assert metrics.nc1(moved, labels) == pytest.approx(metrics.nc1(feats, labels), rel=1e-10)
    assert metrics.nc2(moved, labels) == pytest.approx(metrics.nc2(feats, labels), rel=1e-10)


def test_simplex_etf_gives_zero_nc2():
    k, d = 6, 10
    etf = np.eye(k) - 1.0 / k  # centred simplex vertices, rows of norm sqrt((k-1)/k)
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(d, d)))
    means = np.pad(etf, ((0, 0), (0, d - k))) @ q * 5.0 + 7.0
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(k), 30)
    noise = rng.normal(size=(len(labels), d))
    noise -= np.stack([noise[labels == c].mean(0) for c in range(k)])[labels]  # keep means exact
    feats = means[labels] + 0.1 * noise
    assert metrics.nc2(feats, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.nc2(means[labels] + 0.0 * noise, labels) == pytest.approx(0.0, abs=1e-12)
    # Not an ETF: one class moved off the simplex.
    skew = means.copy()
    skew[0] += 3.0
    assert metrics.nc2(skew[labels], labels) > 0.05


def test_zero_spread_gives_zero_nc1():
    feats, labels = make_data(seed=10, spread=0.0)
    assert metrics.nc1(feats, labels) == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("seed", range(4))
def test_merge_of_random_splits_equals_one_pass(seed):
    feats, labels = make_data(n=400, seed=seed)
    rng = np.random.default_rng(seed)
    one = ClassStats(5, 12, scatter=True).update(torch.from_numpy(feats), torch.from_numpy(labels))
    parts = []
    cuts = np.sort(rng.choice(np.arange(1, 400), size=5, replace=False))
    for idx in np.split(rng.permutation(400), cuts):
        parts.append(
            ClassStats(5, 12, scatter=True).update(
                torch.from_numpy(feats[idx]), torch.from_numpy(labels[idx])
            )
        )
    for order in (list(range(len(parts))), list(rng.permutation(len(parts)))):
        merged = merge_all(parts[i] for i in order)
        torch.testing.assert_close(merged.counts, one.counts, rtol=0, atol=0)
        torch.testing.assert_close(merged.means, one.means, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(merged.m2, one.m2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(merged.scatter, one.scatter, rtol=1e-12, atol=1e-11)
        assert merged.nc1() == pytest.approx(one.nc1(), rel=1e-12)
    # Tree-shaped merge: ((a+b)+(c+d))+...
    left = merge_all(parts[:3])
    right = merge_all(parts[3:])
    assert left.merge(right).nc2() == pytest.approx(one.nc2(), rel=1e-12)


def test_merge_with_empty_and_missing_classes():
    feats, labels = make_data(seed=11)
    a = ClassStats(5, 12)
    b = ClassStats(5, 12).update(torch.from_numpy(feats), torch.from_numpy(labels))
    a.merge(b)  # into an empty state
    assert a.nc1() == pytest.approx(b.nc1(), rel=1e-15)
    only0 = labels == 0
    c = ClassStats(5, 12).update(torch.from_numpy(feats[only0]), torch.from_numpy(labels[only0]))
    d = ClassStats(5, 12).update(torch.from_numpy(feats[~only0]), torch.from_numpy(labels[~only0]))
    assert c.merge(d).nc1() == pytest.approx(b.nc1(), rel=1e-12)


def test_state_dict_round_trip():
    feats, labels = make_data(seed=12)
    s = ClassStats(5, 12).update(torch.from_numpy(feats), torch.from_numpy(labels))
    t = ClassStats.from_state_dict(s.state_dict())
    assert t.nc1() == s.nc1() and t.nc2() == s.nc2()


# --------------------------------------------------------------- NCC accuracy
def test_ncc_accuracy_against_brute_force():
    all_feats, all_labels = make_data(n=600, seed=13, spread=3.0)
    feats, labels = all_feats[:300], all_labels[:300]
    test_feats, test_labels = all_feats[300:], all_labels[300:]
    ref = two_pass(feats, labels, 5)
    dists = ((test_feats[:, None, :] - ref["means"][None]) ** 2).sum(-1)
    expected = (dists.argmin(1) == test_labels).mean()
    assert 0.2 < expected < 1.0  # the data set is neither trivial nor hopeless
    got = metrics.ncc_accuracy(test_feats, test_labels, feats, labels)
    assert got == pytest.approx(expected, abs=1e-12)
    stats = ClassStats(5, 12).update(torch.from_numpy(feats), torch.from_numpy(labels))
    acc = NCCAccuracy(stats)
    for chunk in np.array_split(np.arange(len(test_labels)), 4):
        acc.update(
            torch.from_numpy(test_feats[chunk]).float(), torch.from_numpy(test_labels[chunk])
        )
    assert acc.compute() == pytest.approx(expected, abs=1e-12)


def test_ncc_far_from_origin():
    rng = np.random.default_rng(15)
    centres = 1e4 + rng.normal(size=(3, 8)) * 0.1
    labels = rng.integers(0, 3, size=600)
    feats = (centres[labels] + rng.normal(size=(600, 8)) * 1e-2).astype(np.float32)
    assert metrics.ncc_accuracy(feats, labels) == 1.0


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("feats", "labels", "match"),
    [
        (np.array([[np.nan, 1.0], [1.0, 2.0]]), np.array([0, 1]), "NaN or inf"),
        (np.array([[np.inf, 1.0], [1.0, 2.0]]), np.array([0, 1]), "NaN or inf"),
        (np.ones((3, 2)), np.array([0, 1, 5]), "outside"),
        (np.ones((3, 2)), np.array([0, -1, 1]), "outside"),
        (np.ones((3, 2)), np.array([0, 1]), "shape"),
        (np.ones(3), np.array([0, 1, 1]), "2-D"),
        (np.ones((3, 2)), np.array([0.0, 1.0, 1.0]), "integer"),
    ],
)
def test_bad_input_is_refused(feats, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.nc1(feats, labels, num_classes=3)


def test_the_empty_class_advice_names_real_settings():
    """A class without a sample, and labels that skip numbers ({0, 2, 4}): the advice
    names the settings that exist (data.classes, the subsets), and the skipped numbers."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 4))
    with pytest.raises(ValueError) as top:
        metrics.nc1(feats, np.arange(30) % 3, num_classes=4)
    assert "class(es) [3] have no sample" in str(top.value) and "skip" not in str(top.value)
    with pytest.raises(ValueError) as gaps:
        metrics.nc1(feats, np.arange(30) % 3 * 2, num_classes=5)
    text = str(gaps.value)
    assert "class(es) [1, 3] have no sample" in text and "classes with samples: [0, 2, 4]" in text
    for advice in (str(top.value), text):
        assert "data.classes=N" in advice and "data.test_subset" in advice
        assert "set num_classes to the classes present" not in advice


def test_empty_class_and_too_few_classes():
    feats, labels = make_data(seed=16)
    with pytest.raises(ValueError, match=r"class\(es\) \[5\] have no sample"):
        metrics.nc1(feats, labels, num_classes=6)
    with pytest.raises(ValueError, match="at least two classes"):
        metrics.nc1(feats, np.zeros(len(feats), dtype=int))
    with pytest.raises(ValueError, match=r"expected shape \(N, 12\)"):
        ClassStats(5, 12).update(torch.ones(4, 11), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="identical feature means"):
        metrics.nc1(np.ones((4, 2)), np.array([0, 0, 1, 1]))
    # Only classes 0 and 2 coincide: the error names that pair.
    three = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="classes 0 and 2 have identical"):
        metrics.nc1(three, np.array([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="all class means coincide"):
        metrics.nc2(np.ones((4, 2)), np.array([0, 0, 1, 1]))


def test_bad_batch_leaves_state_untouched():
    feats, labels = make_data(seed=17)
    s = ClassStats(5, 12).update(torch.from_numpy(feats), torch.from_numpy(labels))
    before = s.nc1()
    bad = torch.from_numpy(feats[:4]).clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError):
        s.update(bad, torch.from_numpy(labels[:4]))
    assert s.nc1() == before


# --------------------------------------------------------------- labels views: -1, fused path
def test_minus_one_leaves_the_sample_out():
    """A label of -1 skips the sample: the state equals the one of the kept samples."""
    feats, labels = make_data(n=400, seed=18)
    rng = np.random.default_rng(18)
    marked = labels.copy()
    marked[rng.random(len(labels)) < 0.3] = -1
    marked[:5] = np.arange(5)  # every class keeps a sample
    keep = marked >= 0
    ref = two_pass(feats[keep], labels[keep], 5)
    full = ClassStats(5, 12, scatter=True)
    for chunk in np.array_split(np.arange(len(feats)), 6):
        full.update(torch.from_numpy(feats[chunk]), torch.from_numpy(marked[chunk]))
    kept = ClassStats(5, 12, scatter=True).update(
        torch.from_numpy(feats[keep]), torch.from_numpy(labels[keep])
    )
    assert full.counts.sum().item() == keep.sum() < len(labels)
    torch.testing.assert_close(full.counts, kept.counts, rtol=0, atol=0)
    torch.testing.assert_close(full.means, kept.means, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(full.m2, kept.m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(full.scatter, kept.scatter, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(full.variances.numpy(), ref["var"], rtol=1e-12)
    assert full.nc1() == pytest.approx(ref["nc1"], rel=1e-12)
    assert full.nc2() == pytest.approx(ref["nc2"], rel=1e-12)
    # NCC accuracy counts only the samples of the view.
    acc = NCCAccuracy(kept).update(torch.from_numpy(feats), torch.from_numpy(marked))
    alone = NCCAccuracy(kept).update(torch.from_numpy(feats[keep]), torch.from_numpy(labels[keep]))
    assert int(acc.total) == keep.sum() and acc.compute() == alone.compute()


@pytest.mark.parametrize("bad", [-2, -7, 5, 9])
def test_labels_below_minus_one_or_from_k_are_refused(bad):
    feats, labels = make_data(seed=19)
    labels = labels.copy()
    labels[7] = bad
    with pytest.raises(ValueError, match=rf"value {bad} is outside \[0, 5\)"):
        ClassStats(5, 12).update(torch.from_numpy(feats), torch.from_numpy(labels))
    # The streaming path counts them on the device and raises when a metric is computed.
    views = LabelViews(["v"], 5)
    block = BlockStats(views, 12).update(
        torch.from_numpy(feats), views.plan([torch.from_numpy(labels)])
    )
    stats = block.class_stats()["v"]
    with pytest.raises(ValueError, match=r"1 values are outside \[0, 5\) and not -1"):
        stats.nc1()


def make_views(n=360, d=12, k=5, seed=20, offset=0.0, spread=1.0):
    """Features and three labels views: true labels, shuffled ones, and true labels with
    some samples left out (-1). The first 40 samples hold no sample of class 4 in any view,
    so that class gets its shift from a later rule than the others."""
    feats, labels = make_data(n=n, d=d, k=k, seed=seed, offset=offset, spread=spread)
    rng = np.random.default_rng(seed)
    labels = labels.copy()
    labels[:40] = rng.integers(0, k - 1, size=40)
    shuffled = labels.copy()
    shuffled[40:] = rng.permutation(labels[40:])
    part = labels.copy()
    part[rng.random(n) < 0.25] = -1
    part[:40][part[:40] == 3] = -1  # and class 3 is left out of the first batch too
    views = {"clean": labels, "noisy": shuffled, "part": part}
    return feats, views


@pytest.mark.parametrize(("offset", "spread", "rel"), [(0.0, 1.0, 1e-12), (1e4, 1e-2, 1e-6)])
def test_fused_views_equal_one_state_per_view(offset, spread, rel):
    """BlockStats over stacked views equals one ClassStats per view on the kept samples,
    including classes missing from the first batch and features far from the origin."""
    feats, views = make_views(offset=offset, spread=spread)
    x = torch.from_numpy(feats).float()
    space = LabelViews(list(views), 5)
    block = BlockStats(space, 12, scatter=True)
    for chunk in np.array_split(np.arange(len(x)), 9):  # first chunk: samples 0..39
        plan = space.plan([torch.from_numpy(y[chunk]) for y in views.values()])
        block.update(x[chunk], plan)
    got = block.class_stats()
    torch.testing.assert_close(space.kept(), torch.tensor(
        [float((y >= 0).sum()) for y in views.values()], dtype=torch.float64))  # fmt: skip
    for name, y in views.items():
        keep = y >= 0
        ref = two_pass(x.double().numpy()[keep], y[keep], 5)
        s = got[name]
        assert s.counts.tolist() == np.bincount(y[keep], minlength=5).tolist()
        np.testing.assert_allclose(s.means.numpy(), ref["means"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s.variances.numpy(), ref["var"], rtol=rel)
        assert s.nc1() == pytest.approx(ref["nc1"], rel=rel)
        assert s.nc2() == pytest.approx(ref["nc2"], rel=rel)
        if offset == 0.0:
            assert s.nc1_classic() == pytest.approx(ref["classic"], rel=1e-9)


def test_fused_path_defers_bad_features_to_compute_time():
    """No error and no device read during updates; the view that holds a NaN sample fails
    at compute time, a view that leaves that sample out (-1) does not."""
    feats, labels = make_data(seed=21)
    x = torch.from_numpy(feats)
    x[3, 2] = float("nan")
    without = labels.copy()
    without[3] = -1
    space = LabelViews(["with", "without"], 5)
    block = BlockStats(space, 12)
    block.update(x, space.plan([torch.from_numpy(labels), torch.from_numpy(without)]))
    stats = block.class_stats()
    with pytest.raises(ValueError, match="NaN or inf"):
        stats["with"].nc1()
    keep = without >= 0
    assert stats["without"].nc1() == pytest.approx(
        metrics.nc1(feats[keep], labels[keep]), rel=1e-12
    )


def test_block_ncc_counts_every_view():
    feats, views = make_views(seed=22, spread=3.0)
    ref = ClassStats(5, 12).update(
        torch.from_numpy(feats[:200]), torch.from_numpy(views["clean"][:200])
    )
    space = LabelViews(list(views), 5)
    ncc = BlockNCC(ref)
    test = torch.from_numpy(feats[200:]).float()
    for chunk in np.array_split(np.arange(len(test)), 3):
        ncc.update(
            test[chunk], space.plan([torch.from_numpy(y[200:][chunk]) for y in views.values()])
        )
    means = ref.means.numpy()
    pred = ((feats[200:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    for v, y in enumerate(views.values()):
        y = y[200:]
        keep = y >= 0
        assert int(ncc.correct[v]) == int((pred[keep] == y[keep]).sum())
        assert int(space.kept()[v]) == keep.sum()


@pytest.mark.filterwarnings("error")  # e.g. torch resizing a buffer given as out=
def test_batches_that_shrink_and_grow_reuse_the_buffers_exactly():
    """BlockStats and BlockNCC write each batch into buffers kept between batches; batch
    sizes that shrink and grow again (a last short batch, a loader with uneven batches)
    give the two-pass statistics and the brute-force NCC hits, nothing left over."""
    feats, labels = make_data(n=300, seed=23, spread=2.0)
    x = torch.from_numpy(feats).float()
    y = torch.from_numpy(labels)
    ref = ClassStats(5, 12).update(x[:100], y[:100])
    space = LabelViews(["clean"], 5)
    block, ncc = BlockStats(space, 12), BlockNCC(ref)
    edges = np.cumsum([0, 7, 60, 3, 90, 1, 139])  # sizes 7, 60, 3, 90, 1, 139
    assert edges[-1] == len(x)
    for a, b in itertools.pairwise(edges):
        plan = space.plan([y[a:b]])
        block.update(x[a:b], plan)
        ncc.update(x[a:b], plan)
    got = block.class_stats()["clean"]
    want = two_pass(x.double().numpy(), labels, 5)
    np.testing.assert_allclose(got.means.numpy(), want["means"], rtol=1e-12)
    np.testing.assert_allclose(got.variances.numpy(), want["var"], rtol=1e-12)
    means = ref.means.numpy()
    pred = ((x.double().numpy()[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert int(ncc.correct[0]) == int((pred == labels).sum())


def test_state_dict_keeps_the_invalid_count():
    """A state that saw a bad label stays refused after a save and a load (it was valid
    again once `state_dict` dropped the count)."""
    feats, labels = make_data(seed=14)
    labels = torch.from_numpy(labels)
    labels[3] = 7  # out of range for 5 classes: counted on the device, raised at compute
    views = LabelViews(("clean",), 5, torch.device("cpu"))
    block = BlockStats(views, 12).update(torch.from_numpy(feats).float(), views.plan([labels]))
    state = block.class_stats()["clean"]
    with pytest.raises(ValueError, match="label"):
        state.nc1()
    loaded = ClassStats.from_state_dict(state.state_dict())
    with pytest.raises(ValueError, match="label"):
        loaded.nc1()


# --------------------------------------------------------------- nc1's distances on the CPU
def exact_distances(means: torch.Tensor) -> torch.Tensor:
    return torch.cdist(means, means, compute_mode="donot_use_mm_for_euclid_dist").square()


def centred_gram(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centred = means - means.mean(1, keepdim=True)
    return centred, centred @ centred.transpose(1, 2)


def test_gram_distances_equal_exact_differences_on_spread_means():
    """Well-separated means (the usual case): every pair from the Gram, none recomputed,
    each within DIST_RTOL of the exact differences (in practice ~1e-15)."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(2, 300, 512, dtype=torch.float64, generator=gen) + 50.0
    _, gram = centred_gram(means)
    dists, redo = metrics.gram_distances(gram, 512)
    assert len(redo) == 0
    want = exact_distances(means)
    off = ~torch.eye(300, dtype=torch.bool)
    assert ((dists - want).abs()[:, off] <= metrics.DIST_RTOL * want[:, off]).all()
    assert ((dists - want).abs()[:, off] <= 1e-13 * want[:, off]).all()


def test_close_means_far_from_the_centre_are_recomputed_exactly():
    """Pairs 1e-6 apart on means 1e3 from their centre: the Gram alone cancels (its error
    ~ 1e6 u relative to the distance), so exactly those pairs take exact differences, and
    identical means keep their exact zero (an infinite CDNV, reported)."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 40, 64, dtype=torch.float64, generator=gen) * 1e3
    means = base.clone()
    means[0, 1] = means[0, 0] + 1e-6 * torch.randn(64, dtype=torch.float64, generator=gen)
    means[0, 3] = means[0, 2]  # identical
    _, gram = centred_gram(means)
    naive, redo = metrics.gram_distances(gram, 64)
    pairs = {tuple(p) for p in redo[:, 1:].tolist()}
    assert {(0, 1), (2, 3)} <= pairs and len(pairs) < 10
    want = exact_distances(means)
    assert abs(naive[0, 0, 1] - want[0, 0, 1]) > 1e-3 * want[0, 0, 1]  # the Gram alone: wrong
    got = metrics.square_distances(means, gram)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    assert got[0, 2, 3] == 0.0 and got[0, 3, 2] == 0.0
    y = torch.arange(40).repeat(3)
    x = means[0][y] + 1e-3 * torch.randn(120, 64, dtype=torch.float64, generator=gen)
    x[y == 3] = x[y == 2]  # classes 2 and 3: the same samples, so the same mean
    with pytest.raises(ValueError, match="identical feature means"):
        metrics.nc1(x, y, 40)


def test_when_most_pairs_cancel_all_distances_are_exact_differences():
    """Means all within 1e-6 of one point 1e3 from the origin, and a class absent (its
    mean 0): nearly every pair's Gram value cancels; the distances are then all taken
    from exact differences at once, equal to the two-pass reference, zeros kept."""
    gen = torch.Generator().manual_seed(2)
    point = torch.randn(64, dtype=torch.float64, generator=gen) * 1e3
    means = point + 1e-6 * torch.randn(2, 30, 64, dtype=torch.float64, generator=gen)
    means[1, 5] = 0.0
    means[0, 7] = means[0, 6]
    _, gram = centred_gram(means)
    _, redo = metrics.gram_distances(gram, 64)
    assert len(redo) > metrics._DENSE_REDO * 2 * 30 * 29 // 2
    got = metrics.square_distances(means, gram)
    want = (means[:, :, None] - means[:, None]).square().sum(-1)  # every difference, float64
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0.0)
    assert got[0, 6, 7] == 0.0
