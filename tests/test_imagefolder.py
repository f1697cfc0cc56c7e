"""Image folders: scanning, decoding every kind of file ImageNet holds, the transforms
against torchvision's PIL pipeline, reproducible augmentation, skipped files, and the
folder path against the in-memory path through `analyze`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from nclayers.data import (
    DeviceBatches,
    FolderBatches,
    FolderDataset,
    load_dataset,
    make_batches,
)
from nclayers.data.batches import epoch_order
from nclayers.data.corrupt import corrupt
from nclayers.data.folderbatches import to_arrays
from nclayers.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_bytes,
    device_decodable,
    jpeg_header,
    load_folder_split,
    read_image,
)
from nclayers.data.imagetransforms import eval_plan, sample_rng, train_plan
from nclayers.data.make_folder import make_image_folder, wnid

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, RESIZE = 32, 40  # small stand-ins for 224 and 256: same code, less work


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("folder")
    manifest = make_image_folder(root, per_class=3, val_per_class=2, size=48, classes=4,
                                 grain=8.0)  # fmt: skip
    return root, manifest


def split(root: Path, name: str = "train", **kw) -> FolderDataset:
    return load_folder_split(root, name, image_size=SIZE, resize=RESIZE, workers=0, **kw)


def data_cfg(root: Path, **kw) -> SimpleNamespace:
    base = dict(name="folder", dir=root and str(root), noise=None, noise_seed=0,
                noise_mode="shuffle", train_subset=None, test_subset=None, subset_seed=0,
                corruption=None, severity=None, corrupt_test=False, corruption_seed=0,
                image_size=SIZE, resize=RESIZE, workers=0)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def pil_rgb(path: Path) -> torch.Tensor:
    """An independent decode: PIL's own conversion to RGB."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------- scanning
def test_class_index_is_the_position_of_the_sorted_wnid(folder):
    root, manifest = folder
    ds = split(root)
    assert ds.classes == sorted(manifest["wnids"]) != manifest["wnids"]
    assert len(ds) == 12 and ds.num_classes == 4
    for position in range(len(ds)):
        parent = Path(ds.path(position)).parent.name
        assert ds.labels["clean"][position] == sorted(manifest["wnids"]).index(parent)
    test = load_dataset(data_cfg(root), "test")
    assert test.split == "test" and len(test) == 8 and test.classes == ds.classes
    assert all("/val/" in test.path(i) for i in range(len(test)))


def test_first_n_classes_and_balanced_subsets(folder):
    root, _ = folder
    ds = load_dataset(data_cfg(root, classes=3, train_subset=6), "train")
    assert ds.classes == sorted(wnid(k) for k in range(4))[:3]
    assert sorted(ds.labels["clean"].tolist()) == [0, 0, 1, 1, 2, 2]
    assert ds.index.tolist() == sorted(ds.index.tolist()) and len(set(ds.index.tolist())) == 6


def test_label_noise_and_views_apply_to_folders(folder):
    root, _ = folder
    ds = load_dataset(data_cfg(root, noise=0.5), "train")
    assert ds.views == ["clean", "noisy"]
    assert ds.meta["noise_changed"] > 0
    batches = make_batches(ds, 5, "cpu")
    ys = [y for _, y in batches]
    assert set(ys[0]) == {"clean", "noisy"}
    assert torch.equal(torch.cat([y["noisy"] for y in ys]), ds.labels["noisy"])


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("kind", ["cmyk", "grey", "png"])
def test_odd_files_load_as_rgb_like_pil(folder, kind):
    root, manifest = folder
    path = root / manifest["special"]["train"][kind]
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert torch.equal(image, pil_rgb(path))
    if kind == "grey":
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    header = jpeg_header(path.read_bytes())
    assert (header[3] if header else None) == {"cmyk": 4, "grey": 1, "png": None}[kind]
    assert device_decodable(path.read_bytes()) is None  # left to the CPU on the GPU path


def test_a_16_bit_greyscale_png_loads_as_pil_converts_it(folder, tmp_path):
    """torchvision decodes a 16-bit PNG to uint16; nclayers takes PIL's convert("RGB")
    (values above 255 saturate), in a batch too, where uint16 pixels failed in a worker."""
    root, _ = folder
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = sorted((copy / "val").glob("*/*.JPEG"))[0]
    ramp = (np.arange(48 * 48).reshape(48, 48) * 7 % 700).astype(np.uint16)
    Image.fromarray(ramp).save(victim, "PNG")  # a PNG under a .JPEG name, as ImageNet has
    assert Image.open(victim).mode == "I;16"
    image = read_image(victim)
    assert image.dtype == torch.uint8 and torch.equal(image, pil_rgb(victim))
    assert torch.equal(image[0], torch.from_numpy(np.minimum(ramp, 255).astype(np.uint8)))
    for decoder in ("torchvision", "device"):
        batches = FolderBatches(split(copy, "test"), 4, decoder=decoder)
        assert sum(len(y) for _, y in batches) == 8 and batches.skipped == 0


def test_device_decodable_takes_baseline_rgb_jpegs_only(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 20, 3), np.uint8))
    image.save(tmp_path / "base.jpg", quality=90)
    image.save(tmp_path / "prog.jpg", quality=90, progressive=True)
    assert device_decodable((tmp_path / "base.jpg").read_bytes()) == (30, 20)
    assert jpeg_header((tmp_path / "prog.jpg").read_bytes())[0] == 0xC2
    assert device_decodable((tmp_path / "prog.jpg").read_bytes()) is None
    assert device_decodable(b"\xff\xd8garbage") is None


def truncated_copy(root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the folder whose first RGB validation JPEG is cut in half."""
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = next(p for p in sorted((copy / "val").glob("*/*.JPEG"))
                  if device_decodable(p.read_bytes()))  # fmt: skip
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return copy, victim


def test_a_truncated_file_fails_naming_it_or_is_skipped_and_counted(folder, tmp_path, caplog):
    root, _ = folder
    copy, victim = truncated_copy(root, tmp_path)
    with pytest.raises(ValueError, match=rf"{victim}: cannot be read.*data\.skip_bad=true"):
        list(FolderBatches(split(copy, "test"), 4))
    with pytest.raises(ValueError, match=str(victim)):
        list(FolderBatches(split(copy, "test"), 4, decoder="device"))
    for decoder in ("torchvision", "device"):
        batches = FolderBatches(split(copy, "test", skip_bad=True), 3, decoder=decoder)
        with caplog.at_level(logging.WARNING, logger="nclayers.data"):
            sizes = [len(y) for _, y in batches]
        assert sum(sizes) == 7 and batches.skipped == 1
        assert list(batches.bad_files) == [str(victim)]
        assert str(victim) in caplog.text
        assert sum(len(y) for _, y in batches) == 7 and batches.skipped == 1  # counted once


# ----------------------------------------------------------------------------- transforms
def test_eval_batches_match_torchvision_pil_pipeline(folder):
    """Resize(short side) + CenterCrop + ToTensor + Normalize, in PIL: within one grey
    level (Pillow's and torch's antialiased bilinear kernels round differently)."""
    from torchvision import transforms as T

    root, _ = folder
    ds = split(root, "test")
    reference = T.Compose([T.Resize(RESIZE), T.CenterCrop(SIZE), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip
    x, y = next(iter(FolderBatches(ds, len(ds))))
    assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.equal(y, ds.labels["clean"])
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i in range(len(ds)):
        with Image.open(ds.path(i)) as image:
            want = reference(image.convert("RGB"))
        levels = ((x[i] - want) * std * 255).abs()
        assert levels.max() <= 1.01, (ds.path(i), levels.max())


def test_eval_plan_follows_mmpretrain_resize_edge_and_centre_crop():
    plan = eval_plan(375, 500, 224, 256)
    assert (plan.out_h, plan.out_w) == (256, 341)  # int(256 * 500 / 375) = 341
    assert (plan.crop_top, plan.crop_left) == (16, 58)  # round(32 / 2), round(117 / 2)
    plan = eval_plan(500, 333, 224, 256)
    assert (plan.out_h, plan.out_w, plan.crop_top, plan.crop_left) == (384, 256, 80, 16)


def test_random_resized_crop_properties():
    flips, areas = [], []
    for i in range(400):
        h, w = (375, 500) if i % 2 else (500, 333)
        plan = train_plan(h, w, 224, sample_rng(0, 0, i))
        assert 0 <= plan.top and plan.top + plan.height <= h
        assert 0 <= plan.left and plan.left + plan.width <= w
        assert 3 / 4 - 0.02 <= plan.width / plan.height <= 4 / 3 + 0.02
        assert (plan.out_h, plan.out_w, plan.crop_top, plan.crop_left) == (224, 224, 0, 0)
        areas.append(plan.width * plan.height / (h * w))
        flips.append(plan.flip)
    assert 0.07 <= min(areas) < 0.2 and max(areas) > 0.8
    assert 0.4 < np.mean(flips) < 0.6
    # A sliver has no box of the allowed shapes: the central crop, aspect ratio clamped.
    plan = train_plan(10, 1000, 224, sample_rng(0, 0, 0))
    assert (plan.top, plan.height, plan.width) == (0, 10, 13)
    assert plan.left == (1000 - 13) // 2


def indexed(ds: FolderDataset) -> FolderDataset:
    return ds.with_views({"clean": ds.labels["clean"], "index": ds.index})


def per_sample(batches) -> dict[int, torch.Tensor]:
    return {int(i): img for x, y in batches for i, img in zip(y["index"], x, strict=True)}


def test_augmentation_depends_on_seed_epoch_and_sample_only(folder):
    root, _ = folder
    ds = indexed(split(root))
    one = FolderBatches(ds, 4, train=True, seed=3, workers=0)
    two = FolderBatches(ds, 5, train=True, seed=3, workers=2, decoder="device")
    first = per_sample(one)
    assert first.keys() == set(range(12))
    again = per_sample(two)
    assert all(torch.equal(first[i], again[i]) for i in first)
    two.set_epoch(1)
    assert any(not torch.equal(first[i], img) for i, img in per_sample(two).items())
    # The epoch's order is DeviceBatches' order: the same permutation of the same seed.
    order = torch.cat([y["index"] for _, y in one])
    assert torch.equal(order, epoch_order(12, True, 3, 0, (0, 1), True))


def test_shards_split_an_evaluation_pass_disjointly(folder):
    root, _ = folder
    ds = indexed(split(root))
    seen = [torch.cat([y["index"] for _, y in FolderBatches(ds, 5, shard=(r, 3))])
            for r in range(3)]  # fmt: skip
    assert sorted(torch.cat(seen).tolist()) == list(range(12))
    assert [len(s) for s in seen] == [4, 4, 4]


def test_device_decoder_on_the_cpu_equals_the_worker_decoder(folder):
    """The GPU path's flow (bytes from workers, a batched decode in the main process,
    crops there) on the CPU: bit for bit what the workers compute themselves."""
    root, _ = folder
    ds = split(root)
    for train in (False, True):
        a = list(FolderBatches(ds, 5, train=train, decoder="torchvision"))
        b = list(FolderBatches(ds, 5, train=train, decoder="device", workers=1))
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decoding_matches_cpu_decoding(folder):
    root, _ = folder
    ds = split(root, "test")
    (x_cpu, y_cpu), = list(FolderBatches(ds, len(ds), "cpu"))  # fmt: skip
    batches = FolderBatches(ds, len(ds), "cuda", decoder="device")
    (x_gpu, y_gpu), = list(batches)  # fmt: skip
    assert torch.equal(y_gpu.cpu(), y_cpu)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    levels = ((x_gpu.cpu() - x_cpu) * std).abs()
    # nvJPEG and libjpeg-turbo upsample chroma differently: a few grey levels apart.
    assert levels.mean() < 1.5 and levels.max() <= 24


def test_corruptions_apply_to_the_decoded_image_by_sample_index(folder):
    root, _ = folder
    clean = load_dataset(data_cfg(root, train_subset=8), "train")
    noisy = load_dataset(data_cfg(root, train_subset=8, corruption="gaussian_noise",
                                  severity=5), "train")  # fmt: skip
    assert noisy.corruption == ("gaussian_noise", 5, 0) and clean.corruption is None
    x, _ = next(iter(FolderBatches(noisy, 8, decoder="device")))
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    for i in range(8):
        image = read_image(noisy.path(i))
        hit = corrupt(image[None], "gaussian_noise", 5, index=noisy.index[i : i + 1])[0]
        plan = eval_plan(image.shape[1], image.shape[2], SIZE, RESIZE)
        from nclayers.data.imagetransforms import apply_plan

        want = (apply_plan(hit, plan, SIZE).float() - mean) / std
        assert torch.equal(x[i], want)
    x_clean, _ = next(iter(FolderBatches(noisy.clean_twin(), 8)))
    assert torch.equal(x_clean, next(iter(FolderBatches(clean, 8)))[0])


# ----------------------------------------------------------------------------- analysis
def test_folder_and_array_paths_give_the_same_metrics(folder):
    import nclayers
    from nclayers.models import build_model

    root, _ = folder
    train, test = split(root), split(root, "test")
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=4, width=4).eval()
    kw = dict(progress=False, amp=False)
    ref = nclayers.analyze(model, FolderBatches(train, 6, workers=2), 4, **kw)
    by_folder = nclayers.analyze(model, FolderBatches(test, 3), 4, reference=ref, **kw)
    arrays = to_arrays(test)
    assert arrays.images.shape == (8, 3, SIZE, SIZE) and torch.equal(arrays.index, test.index)
    ref_arrays = nclayers.analyze(model, DeviceBatches(to_arrays(train), 6), 4, **kw)
    by_array = nclayers.analyze(model, DeviceBatches(arrays, 3), 4, reference=ref_arrays, **kw)
    assert len(by_folder) == len(by_array) == 8
    for a, b in zip(by_folder, by_array, strict=True):
        for key in ("nc1", "nc2", "ncc_acc", "cdnv_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        assert a["n"] == b["n"] == 8


# ----------------------------------------------------------------------------- bad input
def test_bad_folders_and_settings_name_the_fix(folder, tmp_path):
    root, _ = folder
    with pytest.raises(ValueError, match=r"data\.dir is not set"):
        load_dataset(data_cfg(None), "train")
    with pytest.raises(ValueError, match=r"no folder val/.*holds \['train'\]"):
        (tmp_path / "a" / "train" / "n1").mkdir(parents=True)
        load_folder_split(tmp_path / "a", "test")
    gone = tmp_path / "mini"  # a -cpu-mini sweep before its folder was made
    with pytest.raises(ValueError, match=rf"data.dir='{gone}' does not exist.*`nclayers "
                       rf"make-folder {gone}`"):  # fmt: skip
        load_dataset(data_cfg(gone), "train")
    flat = tmp_path / "flat" / "val"
    flat.mkdir(parents=True)
    (flat / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"loose images.*val/<wnid>/"):
        load_folder_split(tmp_path / "flat", "test")
    with pytest.raises(ValueError, match=r"data\.classes=9: .* has 4 class folders"):
        load_folder_split(root, "train", classes=9)
    with pytest.raises(ValueError, match="image_size <= resize"):
        load_folder_split(root, "train", image_size=64, resize=32)
    with pytest.raises(ValueError, match=r"data\.decoder='nvjpg'"):
        load_folder_split(root, "train", decoder="nvjpg")
    with pytest.raises(ValueError, match=r"data\.mean=\[0\.5\]"):
        load_folder_split(root, "train", mean=[0.5])
    mismatch = tmp_path / "mismatch"
    shutil.copytree(root, mismatch)
    shutil.rmtree(sorted((mismatch / "val").iterdir())[0])
    with pytest.raises(ValueError, match="val/ and train/ hold different class folders"):
        load_folder_split(mismatch, "test")
    empty = tmp_path / "empty"
    shutil.copytree(root, empty)
    for f in sorted((empty / "train").iterdir())[1].iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="holds no image"):
        load_folder_split(empty, "train")


def test_make_batches_picks_the_batches_for_the_data_set(folder):
    from nclayers.data.digits import load_digits_split

    root, _ = folder
    arrays = load_digits_split("test")
    b = make_batches(arrays, 8, augment=False, train=True, workers=3)
    assert isinstance(b, DeviceBatches) and b.crop_padding == 0 and not b.flip
    f = make_batches(split(root), 8, augment=False, train=True)
    assert isinstance(f, FolderBatches) and not f.augment and f.shuffle
    assert isinstance(make_batches(split(root), 8, train=True), FolderBatches)
    with pytest.raises(ValueError, match="expected an ArrayDataset or a FolderDataset"):
        make_batches([1, 2], 8)


# ----------------------------------------------------------------------------- generation
def test_generated_folder_from_real_cifar10(shared_data, tmp_path):
    from nclayers.data.cifar import load_cifar_split

    manifest = make_image_folder(tmp_path / "c", "cifar10", shared_data, per_class=2,
                                 val_per_class=1, size=40, classes=3)  # fmt: skip
    assert (manifest["train_files"], manifest["val_files"], manifest["classes"]) == (6, 3, 3)
    assert set(manifest["special"]["val"]) == {"cmyk", "grey", "png"}
    ds = load_folder_split(tmp_path / "c", "train")
    assert ds.classes == sorted(manifest["wnids"])
    # Each image is a real CIFAR-10 training image of its class, upscaled.
    cifar = load_cifar_split("cifar10", "train", shared_data)
    for i in range(len(ds)):
        path = Path(ds.path(i))
        if path.name.endswith("_0.JPEG") and manifest["wnids"].index(path.parent.name) < 3:
            continue  # the odd files (CMYK, grey, PNG) change the colours
        small = torch.nn.functional.interpolate(read_image(path)[None].float(), size=(32, 32),
                                                mode="area")[0]  # fmt: skip
        k = manifest["wnids"].index(path.parent.name)
        errors = (cifar.images[cifar.labels["clean"] == k].float() - small).abs().mean((1, 2, 3))
        assert errors.min() < 12  # grey levels: resampling and JPEG, not another image


def test_make_folder_without_options_makes_the_mini_sweeps_folder(tmp_path, monkeypatch):
    """`nclayers make-folder OUT` (the command the -cpu-mini sweeps name) writes the
    library's default folder: 50 training and 20 validation images per class, 80 px."""
    import inspect

    import nclayers.data.make_folder as mf
    from nclayers.cli import main

    params = inspect.signature(mf.make_image_folder).parameters
    defaults = {k: p.default for k, p in params.items()}
    calls = []
    monkeypatch.setattr(mf, "make_image_folder", lambda out, **kw: calls.append(kw) or {})
    assert main(["make-folder", str(tmp_path / "m")]) == 0
    assert main(["make-folder", str(tmp_path / "n"), "--per-class", "3", "--size", "40"]) == 0
    assert (defaults["per_class"], defaults["val_per_class"], defaults["size"]) == (50, 20, 80)
    assert not {"per_class", "val_per_class", "size"} & set(calls[0])
    assert (calls[1]["per_class"], calls[1]["size"]) == (3, 40)


def test_generation_refuses_a_used_folder_and_bad_sizes(folder, tmp_path):
    root, _ = folder
    with pytest.raises(ValueError, match="is not empty"):
        make_image_folder(root)
    with pytest.raises(ValueError, match=r"size=4 \(--size\): expected at least 8 pixels"):
        make_image_folder(tmp_path / "x", size=4)
    with pytest.raises(ValueError, match="source='cifar10' needs data_dir"):
        make_image_folder(tmp_path / "y", "cifar10")


def test_importing_nclayers_installs_no_warnings_filter():
    """A library leaves its users' warnings alone: importing nclayers (its image decoding
    and command line too) adds no filter. A fresh interpreter; torch, torchvision and
    numpy imported first (they install their own)."""
    import subprocess
    import sys

    code = (
        "import warnings, torch, torchvision, torchvision.io, numpy\n"
        "before = list(warnings.filters)\n"
        "import nclayers, nclayers.cli, nclayers.env, nclayers.data.imagefolder, "
        "nclayers.data.folderbatches\n"
        "added = [f for f in warnings.filters if f not in before]\n"
        "assert warnings.filters == before, added\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_decoding_says_no_torchvision_deprecation_and_leaves_the_filters():
    import io
    import warnings

    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(png, "PNG")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")  # every warning, as a user's -W always shows it
        before = list(warnings.filters)
        assert decode_bytes(png.getvalue()).shape == (3, 4, 5)
        assert warnings.filters == before
    assert not [w for w in said if "decoding and encoding capabilities" in str(w.message)]
