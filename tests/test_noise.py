"""Label noise: exact rates of both modes, changed-sample views, CIFAR-N files, bad files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from nclayers.config import DataConfig
from nclayers.data import (
    changed_views,
    cifar100n_labels,
    load_dataset,
    shuffle_labels,
    uniform_labels,
    with_changed_views,
)
from nclayers.data.noise import noise_selection
from nclayers.memorization import memorized_fraction


def test_uniform_noise_changes_exactly_the_chosen_samples():
    y = torch.arange(1000) % 10
    for rate in (0.0, 0.13, 0.4, 1.0):
        noisy = uniform_labels(y, rate, 10, seed=7)
        changed = (noisy != y).nonzero().flatten()
        chosen = noise_selection(1000, rate, seed=7)
        assert len(changed) == round(rate * 1000)  # never redrawn onto the true class
        assert sorted(changed.tolist()) == sorted(chosen.tolist())
        assert torch.equal(noisy, uniform_labels(y, rate, 10, seed=7))
    assert not torch.equal(uniform_labels(y, 0.4, 10, seed=1), uniform_labels(y, 0.4, 10, seed=2))
    # The drawn class is uniform over the 9 other classes: chi-square, 8 d.o.f.
    big = torch.zeros(90_000, dtype=torch.long)
    offsets = torch.bincount(uniform_labels(big, 1.0, 10, seed=0), minlength=10)
    assert offsets[0] == 0
    chi2 = (((offsets[1:] - 10_000.0) ** 2) / 10_000.0).sum().item()
    assert chi2 < 26.1  # p = 0.001
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        uniform_labels(y, -0.1, 10)


def test_shuffle_noise_redraws_exactly_the_chosen_samples():
    y = torch.arange(1000) % 10
    noisy = shuffle_labels(y, 0.4, seed=3)
    chosen = set(noise_selection(1000, 0.4, seed=3).tolist())
    assert len(chosen) == 400
    changed = set((noisy != y).nonzero().flatten().tolist())
    assert changed <= chosen and len(changed) > 300  # some keep their label by chance
    assert torch.equal(torch.bincount(noisy[sorted(chosen)]), torch.bincount(y[sorted(chosen)]))


def test_load_dataset_stores_the_measured_rate_and_mode():
    cfg = DataConfig(name="digits", noise=0.3, noise_mode="uniform", noise_seed=2)
    ds = load_dataset(cfg, "train")
    n = len(ds)
    assert ds.meta["noise_changed"] == round(0.3 * n) and ds.meta["noise_source"] == "uniform:0.3"
    assert ds.meta["noise_rate"] == pytest.approx(round(0.3 * n) / n)
    shuffled = load_dataset(DataConfig(name="digits", noise=0.3, noise_seed=2), "train")
    got = int((shuffled.labels["noisy"] != shuffled.labels["clean"]).sum())
    assert shuffled.meta["noise_changed"] == got and got < round(0.3 * n)
    with pytest.raises(ValueError, match=r"data\.noise_mode='flip'.*shuffle"):
        load_dataset(DataConfig(name="digits", noise=0.3, noise_mode="flip"), "train")
    with pytest.raises(ValueError, match="human label sets exist for cifar10"):
        load_dataset(DataConfig(name="digits", noise="worse"), "train")


def test_changed_views_hold_exactly_the_changed_samples():
    ds = with_changed_views(load_dataset(DataConfig(name="digits", noise=0.5), "train"))
    clean, noisy = ds.labels["clean"], ds.labels["noisy"]
    assert ds.views == ["clean", "noisy", "changed_clean", "changed_noisy", "unchanged"]
    changed = (clean != noisy).nonzero().flatten()
    kept = (ds.labels["changed_clean"] != -1).nonzero().flatten()
    assert torch.equal(kept, changed)
    assert torch.equal((ds.labels["changed_noisy"] != -1).nonzero().flatten(), changed)
    assert torch.equal(ds.labels["changed_clean"][changed], clean[changed])
    assert torch.equal(ds.labels["changed_noisy"][changed], noisy[changed])
    rest = (ds.labels["unchanged"] != -1).nonzero().flatten()
    assert sorted(rest.tolist() + changed.tolist()) == list(range(len(ds)))
    assert torch.equal(ds.labels["unchanged"][rest], noisy[rest])
    views = changed_views(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3]))
    assert views["changed_clean"].tolist() == [-1, 2, -1]
    assert views["changed_noisy"].tolist() == [-1, 0, -1]
    assert views["unchanged"].tolist() == [1, -1, 3]
    with pytest.raises(ValueError, match="no 'noisy' labels view"):
        with_changed_views(load_dataset(DataConfig(name="digits"), "train"))


class _Lookup(nn.Module):
    """Predicts a fixed class per sample; the sample's position is coded in pixel 0."""

    def __init__(self, predictions: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", nn.functional.one_hot(predictions, 10).float())
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):  # normalisation (mean 0, std 1/255) keeps pixel values
        return self.table[x[:, 0, 0, 0].round().long()] * self.scale


def test_memorized_fraction_counts_changed_samples_under_training_labels():
    from nclayers.data.arrays import ArrayDataset

    n = 40
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    clean = torch.arange(n) % 10
    noisy = clean.clone()
    noisy[:10] = (clean[:10] + 1) % 10  # samples 0..9 changed
    pred = clean.clone()
    pred[:6] = noisy[:6]  # 6 of the 10 changed fitted to their training label
    pred[6] = clean[6]  # one predicted as its true class
    pred[7:10] = (clean[7:10] + 5) % 10  # three neither
    pred[10:15] = (clean[10:15] + 3) % 10  # 5 of 30 unchanged wrong
    ds = ArrayDataset(images, {"clean": clean, "noisy": noisy}, list("abcdefghij"), (0.0,) * 3,
                      (1 / 255,) * 3)  # fmt: skip
    got = memorized_fraction(_Lookup(pred), ds, batch_size=7)
    assert got == {"memorized": 0.6, "changed_true_acc": 0.1, "changed": 10,
                   "unchanged_acc": 25 / 30}  # fmt: skip


# ------------------------------------------------------------------ real label files
@pytest.mark.parametrize("kind, rate", [("aggre", 0.0901), ("random1", 0.1723), ("worse", 0.4021)])
def test_cifar10n_rates_on_the_real_file(shared_data, kind, rate):
    ds = load_dataset(DataConfig(name="cifar10", dir=str(shared_data), noise=kind), "train")
    assert ds.meta["noise_rate"] == pytest.approx(rate, abs=5e-4)
    assert ds.meta["noise_source"] == f"cifar10n:{kind}"


def test_cifar10n_subset_keeps_each_image_its_own_labels(shared_data):
    cfg = DataConfig(name="cifar10", dir=str(shared_data), noise="worse", train_subset=500,
                     subset_seed=3)  # fmt: skip
    ds = load_dataset(cfg, "train")
    with np.load(shared_data / "cifar-10n" / "CIFAR-10_human.npz") as f:
        worse, clean = f["worse_label"], f["clean_label"]
    idx = ds.index.numpy()
    assert not np.array_equal(idx, np.arange(500))  # a real subset, not a prefix
    np.testing.assert_array_equal(ds.labels["noisy"].numpy(), worse[idx])
    np.testing.assert_array_equal(ds.labels["clean"].numpy(), clean[idx])
    full = load_dataset(DataConfig(name="cifar10", dir=str(shared_data)), "train")
    assert torch.equal(ds.images, full.images[ds.index])


def test_cifar100n_labels_on_the_real_file(shared_data):
    if not (shared_data / "cifar-100n" / "CIFAR-100_human.pt").is_file():
        pytest.skip("no CIFAR-100N file")
    noisy = cifar100n_labels("noisy", shared_data)
    obj = torch.load(shared_data / "cifar-100n" / "CIFAR-100_human.pt", weights_only=False)
    assert noisy.shape == (50000,) and int(noisy.max()) == 99
    rate = (noisy.numpy() != np.asarray(obj["clean_label"])).mean()
    assert rate == pytest.approx(0.4020, abs=5e-4)
    with pytest.raises(ValueError, match="CIFAR100N label sets are"):
        cifar100n_labels("worse", shared_data)


# ------------------------------------------------------------------ bad files
def _fake_cifar10(root, n: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, n))}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"c{k}" for k in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_truncated_cifar_batch_names_the_file_and_a_good_copy(tmp_path):
    _fake_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", dir=str(tmp_path))
    assert len(load_dataset(cfg, "train")) == 100
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"data_batch_1: truncated or unreadable.*cifar-10-python"):
        load_dataset(cfg, "train")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").unlink()
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data_batch_1: truncated"):
        load_dataset(cfg, "train")


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_truncated_label_file_names_the_file_and_its_source(tmp_path, suffix):
    _fake_cifar10(tmp_path)
    folder = tmp_path / "cifar-10n"
    folder.mkdir()
    cfg = DataConfig(name="cifar10", dir=str(tmp_path), noise="worse")
    clean = load_dataset(DataConfig(name="cifar10", dir=str(tmp_path)), "train").labels["clean"]
    arrays = {"clean_label": clean.numpy(), "worse_label": (clean.numpy() + 1) % 10}
    path = folder / f"CIFAR-10_human{suffix}"
    if suffix == ".npz":
        np.savez_compressed(path, **arrays)
    else:
        torch.save(arrays, path)
    assert load_dataset(cfg, "train").meta["noise_rate"] == 1.0
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=rf"CIFAR-10_human\{suffix}: truncated or unreadable.*UCSC"
    ):
        load_dataset(cfg, "train")


class _Payload:
    """A pickled object that runs code when unpickled without weights_only."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_label_file_is_loaded_with_weights_only(tmp_path, monkeypatch):
    """The CIFAR-N .pt file is read with weights_only=True: arrays load, code does not
    run (torch.load(weights_only=False) ran the payload)."""
    _fake_cifar10(tmp_path)
    folder = tmp_path / "cifar-10n"
    folder.mkdir()
    clean = load_dataset(DataConfig(name="cifar10", dir=str(tmp_path)), "train").labels["clean"]
    labels = (clean.numpy() + 1) % 10
    torch.save({"clean_label": clean.numpy(), "worse_label": labels, "x": _Payload()},
               folder / "CIFAR-10_human.pt")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"CIFAR-10_human\.pt: truncated or unreadable"):
        load_dataset(DataConfig(name="cifar10", dir=str(tmp_path), noise="worse"), "train")
    assert not (tmp_path / "pwned").exists()
    torch.save({"clean_label": clean.numpy(), "worse_label": labels}, folder / "CIFAR-10_human.pt")
    ds = load_dataset(DataConfig(name="cifar10", dir=str(tmp_path), noise="worse"), "train")
    assert ds.labels["noisy"].tolist() == labels.tolist()


def test_label_file_of_other_images_is_refused(tmp_path):
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10n").mkdir()
    other = np.zeros(100, dtype=np.int64) + 3
    np.savez(tmp_path / "cifar-10n" / "CIFAR-10_human.npz", clean_label=other, worse_label=other)
    with pytest.raises(ValueError, match="do not match the training images"):
        load_dataset(DataConfig(name="cifar10", dir=str(tmp_path), noise="worse"), "train")


# ------------------------------------------------------------------ memorization
def test_fitted_random_labels_make_the_last_block_memorize():
    """A small MLP fitted to 100% shuffled labels: Delta = nc1(true) / nc1(noisy) > 1 at
    its narrow last hidden layer, < 1 at its first (flipping the ratio's sides fails)."""
    from nclayers.analysis import analyze
    from nclayers.data import DeviceBatches
    from nclayers.memorization import memorization_layers, memorization_ratio

    torch.manual_seed(0)
    ds = load_dataset(DataConfig(name="digits", noise=1.0, train_subset=200), "train")
    x, y = next(iter(DeviceBatches(ds, 200)))
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(3072, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y["noisy"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (model(x).argmax(1) == y["noisy"]).all()  # fitted the shuffled labels
        assert (y["noisy"] != y["clean"]).float().mean() > 0.8
    table = analyze(model, DeviceBatches(ds, 64), 10, blocks=["2", "4", "6"], split="train",
                    progress=False)  # fmt: skip
    ratios = memorization_ratio(table)
    assert ratios[-1]["ratio"] > 1.0 and ratios[0]["ratio"] < 1.0
    assert memorization_layers(ratios) == [3]
    assert ratios[-1]["ratio"] == pytest.approx(ratios[-1]["nc1_clean"] / ratios[-1]["nc1_noisy"])


def _run_folder(tmp_path, *overrides: str):
    from nclayers.config import load_config
    from nclayers.jobs.common import build_from_config
    from nclayers.jobs.folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    cfg = load_config(None, [
        "data.name=digits", "data.train_subset=60", "model.name=resnet18", "model.width=4",
        "device=cpu", "run=r", *overrides,
    ])  # fmt: skip
    folder.save_config(cfg)
    torch.manual_seed(0)
    model = build_from_config(cfg.model, 10)
    torch.save(model.state_dict(), folder.file("checkpoint.pt"))
    return folder, cfg, model


def test_memorization_job_on_a_label_noise_run(tmp_path):
    from nclayers.analysis import analyze
    from nclayers.data import DeviceBatches
    from nclayers.jobs.memorization import memorization_job

    folder, cfg, model = _run_folder(tmp_path, "data.noise=0.5", "data.train_subset=200")
    result = memorization_job(cfg, folder, progress=False)
    ratios, info = result.ratios, result.info
    assert info["changed_views"] is True
    assert [r["layer"] for r in ratios] == list(range(1, 9))
    ds = load_dataset(cfg.data, "train")
    ref = analyze(model.eval(), DeviceBatches(ds, 500), 10, split="train", progress=False)
    for r in ratios:
        clean = ref.where(view="clean", layer=r["layer"])[0]["nc1"]
        noisy = ref.where(view="noisy", layer=r["layer"])[0]["nc1"]
        assert r["nc1_clean"] == pytest.approx(clean) and r["nc1_noisy"] == pytest.approx(noisy)
        assert r["ratio"] == pytest.approx(clean / noisy)
    # The changed samples alone, measured in the same pass, against a pass over them only.
    changed = ds.subset((ds.labels["clean"] != ds.labels["noisy"]).nonzero().flatten())
    alone = analyze(model, DeviceBatches(changed, 500), 10, split="train", progress=False)
    last = ratios[-1]
    assert last["nc1_changed_clean"] == pytest.approx(alone.where(view="clean", layer=8)[0]["nc1"])
    assert last["nc1_changed_noisy"] == pytest.approx(alone.where(view="noisy", layer=8)[0]["nc1"])
    assert info["memorized"] == pytest.approx(memorized_fraction(model, ds)["memorized"])
    assert info["changed"] == len(changed)
    written = folder.read_json("summary.json")["memorization"]
    assert written["memorization_layers"] == [r["layer"] for r in ratios if r["ratio"] > 1]
    assert folder.exists("memorization.csv") and folder.exists("memorization.png")
    assert folder.done("memorization", cfg)
    # Too few changed samples for every class: those views are left out, not an error.
    few, cfg, model = _run_folder(tmp_path / "few", "data.noise=0.05")
    result = memorization_job(cfg, few, progress=False)
    ratios, info = result.ratios, result.info
    assert info["changed_views"] is False and "ratio_changed" not in ratios.columns
    ds = load_dataset(cfg.data, "train")
    assert info["memorized"] == pytest.approx(memorized_fraction(model, ds)["memorized"])


def test_every_spelling_of_clean_labels_means_no_noise():
    from nclayers.data import has_label_noise

    assert not any(has_label_noise(v) for v in (None, "", 0, 0.0, "clean"))
    assert all(has_label_noise(v) for v in (0.2, 1, "worse", "aggre", "noisy"))
