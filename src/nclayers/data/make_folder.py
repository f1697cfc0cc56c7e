"""Generated ImageNet-style folders, for tests, benchmarks and the CPU-mini sweeps.

`make_image_folder(out, source="digits" | "cifar10")` writes real images (scikit-learn's
bundled handwritten digits, no download; or CIFAR-10 from a local `data_dir`), upscaled
to about `size` pixels with varied aspect ratios, as JPEG files in the ImageFolder layout
of ImageNet:

    out/train/<wnid>/<wnid>_<i>.JPEG        training images (CIFAR: its training split)
    out/val/<wnid>/ILSVRC2012_val_<n>.JPEG  validation images (CIFAR: its test split)
    out/make_folder.json                    what was written, and the special files

Class folders carry WordNet-like ids ("n" and 8 digits) whose sorted order differs from
the source's label order, so a reader that does not sort the class folders is caught.
Like real ImageNet, each split holds one CMYK JPEG, one greyscale JPEG and one PNG file
named `.JPEG` (same image content, other encodings). `grain` adds seeded Gaussian noise
(in grey levels) so that files decode about as slowly as photographs do.

`make_k1000_folder(out)` writes 1,000 classes of tiny images (each class the source's
images tinted with its own colour, so classes differ) to exercise K = 1000 end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nclayers.errors import NCLayersError

SOURCES = ("digits", "cifar10")
_ASPECTS = (1.0, 0.75, 4.0 / 3.0, 0.8, 1.25)  # height / width, cycled over the images


def wnid(k: int) -> str:
    """A WordNet-like id for class k; distinct for k < 10**8, not in k's order."""
    return f"n{(k * 37_000_001 + 1_234_567) % 100_000_000:08d}"


def _source_images(source: str, data_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x 3 images and their labels, from the source's split."""
    if source == "digits":
        from nclayers.data.digits import load_digits_split

        ds = load_digits_split("train" if split == "train" else "test", size=32)
    elif source == "cifar10":
        if not data_dir:
            raise NCLayersError(
                "source='cifar10' needs data_dir: the folder holding cifar-10-batches-py/ "
                "(or use source='digits', bundled with scikit-learn)"
            )
        from nclayers.data.cifar import load_cifar_split

        ds = load_cifar_split("cifar10", "train" if split == "train" else "test", data_dir)
    else:
        raise NCLayersError(f"source={source!r}: expected one of {SOURCES}")
    return ds.images.permute(0, 2, 3, 1).numpy(), ds.labels["clean"].numpy()


def _render(pixels: np.ndarray, size: int, aspect: float, grain: float, rng) -> np.ndarray:
    """One image upscaled to `size` wide and `size * aspect` high, with optional grain."""
    from PIL import Image

    height = max(1, round(size * aspect))
    image = np.asarray(Image.fromarray(pixels).resize((size, height), Image.Resampling.BICUBIC))
    if grain > 0:
        noisy = image.astype(np.float32) + rng.normal(0.0, grain, image.shape)
        image = noisy.clip(0, 255).astype(np.uint8)
    return image


def _save(image: np.ndarray, path: Path, kind: str, quality: int) -> None:
    """Write as an RGB JPEG, or as one of the odd files real ImageNet holds."""
    from PIL import Image

    picture = Image.fromarray(image)
    if kind == "cmyk":
        picture.convert("CMYK").save(path, "JPEG", quality=quality)
    elif kind == "grey":
        picture.convert("L").save(path, "JPEG", quality=quality)
    elif kind == "png":
        picture.save(path, "PNG")  # a PNG with a .JPEG name, as n02105855_2933.JPEG
    else:
        picture.save(path, "JPEG", quality=quality)


def _pick(labels: np.ndarray, classes: int, per_class: int, split: str, rng) -> list[int]:
    """`per_class` source indices of each class k (of source class k modulo the source's
    classes; cycled when a class has fewer images)."""
    picks = []
    for k in range(classes):
        idx = np.flatnonzero(labels == k % (int(labels.max()) + 1))
        if len(idx) == 0:
            raise NCLayersError(f"the {split} split of the source has no image of class {k}")
        picks += [int(i) for i in rng.permutation(idx)[np.arange(per_class) % len(idx)]]
    return picks


def _write_split(
    out: Path, split: str, pixels, labels, names, per_class, size, grain, quality, rng,
    tint=None,
) -> tuple[int, dict[str, str]]:  # fmt: skip
    """Write one split; returns (files written, {kind: relative path} of the odd files)."""
    classes = len(names)
    picks = _pick(labels, classes, per_class, split, rng)
    special = {"cmyk": 0, "grey": 1, "png": 2}  # the first images of the first three classes
    written: dict[str, str] = {}
    for n, src in enumerate(picks):
        k = n // per_class
        folder = out / split / names[k]
        folder.mkdir(parents=True, exist_ok=True)
        base = pixels[src]
        if tint is not None:  # K = 1000: the class's own colour on the source image
            base = (base.astype(np.float32) * tint[k]).clip(0, 255).astype(np.uint8)
        image = _render(base, size, _ASPECTS[n % len(_ASPECTS)], grain, rng)
        if split == "train":
            name = f"{names[k]}_{n % per_class}.JPEG"
        else:
            name = f"ILSVRC2012_val_{n + 1:08d}.JPEG"
        kind = next((kind for kind, c in special.items() if c == k and n % per_class == 0), "rgb")
        _save(image, folder / name, kind, quality)
        if kind != "rgb":
            written[kind] = f"{split}/{names[k]}/{name}"
    return len(picks), written


def make_image_folder(
    out: str | Path,
    source: str = "digits",
    data_dir: str | Path | None = None,
    per_class: int = 50,
    val_per_class: int | None = 20,
    size: int = 80,
    classes: int | None = None,
    grain: float = 0.0,
    quality: int = 90,
    seed: int = 0,
) -> dict:
    """Write an ImageNet-style folder of `source` images under `out` (see the module
    docstring); returns the manifest also written to `out/make_folder.json`: the class
    ids in label order (`wnids[k]` is source class k), file counts, the odd files.

    The defaults make the folder of the ImageNet -cpu-mini sweeps (500 training and 200
    validation images of 80 px wide, for their 64 px crops): `nclayers make-folder OUT`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise NCLayersError(f"out={str(out)!r} is not empty; pass a new or empty folder")
    _check_counts(per_class, val_per_class, size, quality)
    val_per_class = per_class if val_per_class is None else val_per_class
    rng = np.random.default_rng(seed)
    manifest: dict = {"source": source, "size": size, "grain": grain, "special": {}}
    for split, count in (("train", per_class), ("val", val_per_class)):
        pixels, labels = _source_images(source, data_dir, split)
        k = int(labels.max()) + 1 if classes is None else int(classes)
        if not 2 <= k <= int(labels.max()) + 1:
            raise NCLayersError(f"classes={classes}: {source} has {int(labels.max()) + 1} classes")
        names = [wnid(i) for i in range(k)]
        n, special = _write_split(out, split, pixels, labels, names, count, size, grain,
                                  quality, rng)  # fmt: skip
        manifest.update(wnids=names, classes=k)
        manifest[f"{split}_files"] = n
        manifest["special"][split] = special
    (out / "make_folder.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_counts(per_class: int, val_per_class: int | None, size: int, quality: int) -> None:
    """Refuse a count or size that writes no image (0, negative), naming the option."""
    checks = (("per_class", per_class, per_class >= 1, "at least 1 image per class"),
              ("val_per_class", val_per_class, val_per_class is None or val_per_class >= 1,
               "at least 1 image per class"),
              ("size", size, size >= 8, "at least 8 pixels"),
              ("quality", quality, 1 <= quality <= 100, "a JPEG quality in 1..100"))  # fmt: skip
    for name, value, ok, need in checks:
        if not ok:
            # the command line's spelling (quality has none)
            option = "" if name == "quality" else f" (--{name.replace('_', '-')})"
            raise NCLayersError(f"{name}={value}{option}: expected {need}")


def make_k1000_folder(
    out: str | Path,
    per_class: int = 2,
    val_per_class: int = 1,
    size: int = 16,
    classes: int = 1000,
    quality: int = 90,
    seed: int = 0,
) -> dict:
    """A 1,000-class ImageNet-style folder of tiny images (digits, each class tinted with
    its own colour), with the same odd files; returns the manifest (as above)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise NCLayersError(f"out={str(out)!r} is not empty; pass a new or empty folder")
    _check_counts(per_class, val_per_class, size, quality)
    rng = np.random.default_rng(seed)
    tint = rng.uniform(0.3, 1.7, size=(classes, 1, 1, 3)).astype(np.float32)
    names = [wnid(i) for i in range(classes)]
    manifest: dict = {"source": "digits-k1000", "size": size, "classes": classes,
                      "wnids": names, "special": {}}  # fmt: skip
    for split, count in (("train", per_class), ("val", val_per_class)):
        pixels, labels = _source_images("digits", None, split)
        # The source label cycles 0..9 over the classes, so each class has its digits.
        n, special = _write_split(
            out, split, pixels, labels, names, count, size, 0.0, quality, rng, tint=tint
        )
        manifest[f"{split}_files"] = n
        manifest["special"][split] = special
    (out / "make_folder.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


__all__ = ["SOURCES", "make_image_folder", "make_k1000_folder", "wnid"]
