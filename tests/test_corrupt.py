"""Corrupted inputs: published formulas, per-sample determinism, severities, CIFAR-10-C."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nclayers.config import DataConfig
from nclayers.data import DeviceBatches, corrupt, load_dataset
from nclayers.data.corrupt import (
    CORRUPTIONS,
    SEVERITY_CONSTANTS,
    corruption_formula,
    parse_severity,
    sample_seed,
)


def _images(n: int = 12, side: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=gen, dtype=torch.uint8)


def test_cifar_severity_constants_of_make_cifar_c():
    # Typed from make_cifar_c.py (hendrycks/robustness), not the ImageNet-C constants.
    assert SEVERITY_CONSTANTS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert SEVERITY_CONSTANTS["shot_noise"] == (500, 250, 100, 75, 50)
    assert SEVERITY_CONSTANTS["impulse_noise"] == (0.01, 0.02, 0.03, 0.05, 0.07)
    assert SEVERITY_CONSTANTS["speckle_noise"] == (0.06, 0.10, 0.12, 0.16, 0.20)


def test_formulas_on_hand_computed_pixels():
    x = torch.tensor([100.0, 250.0, 101.0, 3.0], dtype=torch.float64) / 255
    # gaussian, severity 5 (c = 0.10): 100 + 255 * 0.10 * 1.5 = 138.25 -> 138; 250 + 25.5 clips.
    z = torch.tensor([1.5, 1.0, 0.0, -1.0], dtype=torch.float64)
    out = corruption_formula(x, "gaussian_noise", 5, z) * 255
    assert torch.floor(out).tolist() == [138, 255, 101, 0]
    # speckle, severity 2 (c = 0.10): x (1 + 0.1 z): 100 * 1.15 = 115, 101 * 1 = 101, 3 * 0.9.
    out = corruption_formula(x, "speckle_noise", 2, z) * 255
    assert out.tolist() == pytest.approx([115.0, 255.0, 101.0, 2.7])
    # shot, severity 5 (c = 50): k / 50 with counts k; 60 / 50 clips to 1.
    k = torch.tensor([20.0, 60.0, 0.0, 1.0], dtype=torch.float64)
    out = corruption_formula(x, "shot_noise", 5, k) * 255
    assert out.tolist() == pytest.approx([102.0, 255.0, 0.0, 5.1])
    # impulse, severity 3 (amount 0.03): hit if u0 < 0.03, then salt (1) if u1 < 0.5.
    u = torch.tensor([[0.01, 0.02, 0.5, 0.029], [0.4, 0.6, 0.1, 0.9]], dtype=torch.float64)
    out = corruption_formula(x, "impulse_noise", 3, u) * 255
    assert out.tolist() == pytest.approx([255.0, 0.0, 101.0, 0.0])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_applies_the_formula_to_its_per_sample_draws(name):
    """Rebuild one sample's draw from its documented generator; compare in float64 numpy."""
    images = _images(5)
    out = corrupt(images, name, 4, seed=3, index=torch.tensor([9, 2, 7, 0, 11]))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    c = SEVERITY_CONSTANTS[name][3]
    x = images[2].reshape(-1).numpy().astype(np.float64) / 255
    gen = torch.Generator().manual_seed(sample_seed(3, 7))
    if name == "shot_noise":
        k = torch.poisson(torch.from_numpy(x).float() * c, generator=gen).double().numpy()
        want = np.clip(k / c, 0, 1)
    elif name == "impulse_noise":
        u = torch.rand((2, x.size), generator=gen).double().numpy()
        want = np.where(u[0] < c, (u[1] < 0.5).astype(np.float64), x)
    else:
        z = torch.randn(x.size, generator=gen).double().numpy()
        want = np.clip(x + c * z if name == "gaussian_noise" else x + x * c * z, 0, 1)
    want = np.uint8(want * 255)  # the release truncates
    np.testing.assert_array_equal(out[2].reshape(-1).numpy(), want)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_image_whatever_the_order_subset_or_rank(name):
    images = _images(20)
    full = corrupt(images, name, 5, seed=1)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(corrupt(images[perm], name, 5, seed=1, index=perm), full[perm])
    sub = torch.tensor([3, 17, 4])
    assert torch.equal(corrupt(images[sub], name, 5, seed=1, index=sub), full[sub])
    assert torch.equal(corrupt(images, name, 5, seed=1), full)  # again: same noise
    assert not torch.equal(corrupt(images, name, 5, seed=2), full)  # the seed matters
    # Two samples with the same image get different noise (their own index).
    twins = images[[0, 0]]
    a, b = corrupt(twins, name, 5, seed=1)
    assert not torch.equal(a, b)


def test_corrupted_dataset_is_the_same_in_every_subset_shard_and_epoch():
    cfg = DataConfig(
        name="digits", corruption="gaussian_noise", severity="L3", train_subset=120,
        test_subset=30, corruption_seed=4,
    )  # fmt: skip
    sub = load_dataset(cfg, "train")
    clean = load_dataset(DataConfig(name="digits"), "train")
    assert sub.meta["corruption_severity"] == 5 and sub.meta["corruption_seed"] == 4
    # Each image is corrupted by its index in the full split, not its place in the subset.
    assert not torch.equal(sub.index, torch.arange(120))
    assert torch.equal(sub.clean_images, clean.images[sub.index])
    assert torch.equal(sub.clean_twin().images, clean.images[sub.index])
    want = corrupt(clean.images[sub.index], "gaussian_noise", 5, seed=4, index=sub.index)
    assert torch.equal(sub.images, want)
    half = sub.subset(torch.arange(0, 120, 2))
    assert torch.equal(half.images, sub.images[::2]) and torch.equal(half.index, sub.index[::2])
    # Every rank's shard and every shuffled epoch see the same corrupted images.
    keyed = sub.with_views({"clean": sub.labels["clean"], "pos": torch.arange(120)})
    for shard in [(r, 3) for r in range(3)] + [(0, 1)]:
        for epoch in (0, 1):
            batches = DeviceBatches(keyed, 32, shuffle=True, seed=5, shard=shard)
            batches.set_epoch(epoch)
            for x, y in batches:
                want = (sub.images[y["pos"]].float() - batches.mean) / batches.std
                torch.testing.assert_close(x, want, rtol=0, atol=0)
    # The test split stays clean unless corrupt_test.
    assert load_dataset(cfg, "test").clean_images is None
    both = load_dataset(DataConfig(**{**cfg.__dict__, "corrupt_test": True}), "test")
    assert both.clean_images is not None and not torch.equal(both.images, both.clean_images)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_noise_strength_grows_with_severity_and_stays_in_range(name):
    grey = torch.full((64, 3, 8, 8), 128, dtype=torch.uint8)
    strength = []
    for s in range(1, 6):
        out = corrupt(grey, name, s, seed=0)
        strength.append((out.float() - 128).abs().mean().item())
    assert all(a < b for a, b in itertools.pairwise(strength)), strength
    # Clipping, not wrapping: white and black images stay near their end of the range.
    white = corrupt(torch.full((8, 3, 8, 8), 255, dtype=torch.uint8), name, 5)
    black = corrupt(torch.zeros((8, 3, 8, 8), dtype=torch.uint8), name, 5)
    if name == "impulse_noise":  # pepper/salt may land anywhere, values stay 0 or 255
        assert set(white.unique().tolist()) <= {0, 255} and set(black.unique().tolist()) <= {
            0, 255,
        }  # fmt: skip
    else:
        # Wrapped values would pull a white image's mean far down (and a black one's up).
        assert white.float().mean() > 200 and black.float().mean() < 50
        assert white.max() == 255 and black.min() == 0


def test_bad_names_and_severities_list_the_valid_ones():
    x = _images(2)
    with pytest.raises(ValueError, match="gaussian_noise, shot_noise, impulse_noise"):
        corrupt(x, "fog", 3)
    for bad in (0, 6, "L4", "high", 2.5, True):
        with pytest.raises(ValueError, match=r"1, 2, 3, 4 or 5.*L1, L2 or L3"):
            parse_severity(bad)
    assert [parse_severity(v) for v in ("L1", "L2", "l3", "3", 4, 5.0)] == [1, 3, 5, 3, 4, 5]
    with pytest.raises(ValueError, match=r"needs data\.severity"):
        load_dataset(DataConfig(corruption="gaussian_noise"), "train")
    with pytest.raises(
        ValueError, match=r"data\.corruption=.gauss.: input should be .gaussian_noise"
    ):
        load_dataset(DataConfig(corruption="gauss", severity=1), "train")
    with pytest.raises(ValueError, match="holds no clean images"):
        load_dataset(DataConfig(), "train").clean_twin()


def _cifar10c_folder(root, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in of the release: 5 x n images per corruption, labels.npy (uint8)."""
    folder = root / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(rng.integers(0, 10, n, dtype=np.uint8), 5)
    np.save(folder / "gaussian_noise.npy", images)
    np.save(folder / "labels.npy", labels)
    return images, labels


def test_cifar10c_reads_the_release_layout(tmp_path):
    images, labels = _cifar10c_folder(tmp_path)
    base = {"name": "cifar10c", "dir": str(tmp_path), "corruption": "gaussian_noise"}
    for severity, rows in ((1, slice(0, 4)), ("L2", slice(8, 12)), (5, slice(16, 20))):
        cfg = DataConfig(**base, severity=severity)
        ds = load_dataset(cfg, "test")
        want = torch.from_numpy(images[rows]).permute(0, 3, 1, 2)
        assert torch.equal(ds.images, want) and ds.images.dtype == torch.uint8
        assert ds.labels["clean"].tolist() == labels[rows].tolist()
        assert ds.classes[0] == "airplane" and ds.meta["corruption"] == "gaussian_noise"
    cfg = DataConfig(**{**base, "corruption": "shot_noise"}, severity=1)
    with pytest.raises(ValueError, match=r"shot_noise\.npy is missing.*zenodo"):
        load_dataset(cfg, "test")


def test_truncated_npy_names_the_file_and_the_release(tmp_path):
    _cifar10c_folder(tmp_path)
    path = tmp_path / "CIFAR-10-C" / "gaussian_noise.npy"
    path.write_bytes(path.read_bytes()[:5000])
    cfg = DataConfig(name="cifar10c", dir=str(tmp_path), corruption="gaussian_noise", severity=1)
    with pytest.raises(ValueError, match=r"gaussian_noise\.npy: truncated or unreadable.*zenodo"):
        load_dataset(cfg, "test")


def test_memorization_job_on_a_corruption_run(tmp_path, capsys):
    """Delta = nc1(clean images) / nc1(corrupted images): the clean side is measured on the
    uncorrupted data set loaded independently (flipping the sides fails this test)."""
    from nclayers.analysis import analyze
    from nclayers.config import load_config
    from nclayers.jobs.common import build_from_config
    from nclayers.jobs.folder import RunFolder
    from nclayers.jobs.memorization import memorization_job
    from nclayers.table import Table

    folder = RunFolder(tmp_path / "run")
    cfg = load_config(None, [
        "data.name=digits", "data.train_subset=60", "model.name=resnet18", "model.width=4",
        "device=cpu", "data.corruption=speckle_noise",
        "data.severity=L3",
    ])  # fmt: skip
    folder.save_config(cfg)
    torch.manual_seed(0)
    model = build_from_config(cfg.model, 10).eval()
    torch.save(model.state_dict(), folder.file("checkpoint.pt"))
    result = memorization_job(cfg, folder, progress=False)
    ratios, info = result.ratios, result.info
    assert info["kind"] == "corruption" and info["severity"] == 5

    def nc1s(ds):
        t = analyze(model, DeviceBatches(ds, 500), 10, split="train", progress=False)
        return [r["nc1"] for r in t]

    clean = nc1s(load_dataset(DataConfig(name="digits", train_subset=60), "train"))
    corrupted = nc1s(load_dataset(cfg.data, "train"))
    assert clean != corrupted
    assert [r["nc1_clean"] for r in ratios] == pytest.approx(clean)
    assert [r["nc1_corrupted"] for r in ratios] == pytest.approx(corrupted)
    assert [r["ratio"] for r in ratios] == pytest.approx(
        [a / b for a, b in zip(clean, corrupted, strict=True)]
    )
    layers = folder.read_table("memorization_layers.csv")
    assert {r["input"] for r in layers} == {"clean", "corrupted"} and len(layers) == 16
    # The CLI verb on the run folder (and the saved table read back).
    from nclayers.cli import main

    assert main(["memorization", str(folder.path), "-q"]) == 0
    assert "nc1_corrupted" in capsys.readouterr().out
    written = Table.from_csv(folder.file("memorization.csv"))
    assert [r["ratio"] for r in written] == pytest.approx([r["ratio"] for r in ratios])
    # Label noise and corruption together are refused; so is a run with neither.
    with pytest.raises(ValueError, match=r"both data\.noise and data\.corruption"):
        memorization_job(cfg.updated({"data.noise": 0.2}), folder, progress=False)
