"""ImageNet-style image folders: `root/train/<class>/<image>`, `root/val/<class>/<image>`.

`load_folder_split(root, "train")` scans one split and returns a `FolderDataset`: the
same API as `ArrayDataset` (labels views, `classes`, `index`, `subset`, `with_views`,
`mean`/`std`, ...) but holding file paths instead of pixels; `FolderBatches` (or
`nclayers.data.make_batches`) reads, decodes and transforms them batch by batch.

- Class index = position of the class folder's name in sorted order (the convention of
  torchvision's ImageFolder, timm and mmpretrain, so a pretrained head's output k is
  class k). `classes=N` keeps the first N sorted classes.
- Splits: "train" is `train/`; "test" (the split nclayers measures) is `val/`.
- Files: the extensions torchvision's ImageFolder reads (.jpg, .jpeg, .png, .ppm, .bmp,
  .pgm, .tif, .tiff, .webp, any case), sorted by name within a class.
- Whatever a file holds (RGB, CMYK or greyscale JPEG, a PNG named .JPEG, a palette or
  16-bit PNG), it is decoded by its content, not its name, to 3 x H x W uint8 RGB
  (`decode_image`). A file no decoder can read raises an `NCLayersError` naming it,
  unless the data set has `skip_bad`, in which case batches leave it out and count it.
- Corruptions (`corrupted`) are applied per sample, seeded by its `index`, to the
  decoded full-size image before any crop, so a sample is corrupted the same way in
  every epoch and crop; `clean_twin()` drops them again.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from nclayers.errors import NCLayersError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = {"train": "train", "test": "val", "val": "val"}
DECODERS = ("auto", "torchvision", "pil", "device")
# torchvision 0.29 warns on every decode that its decoders will move to TorchCodec.
_TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"
_VAL_HINT = (
    "ImageNet's official validation tarball unpacks flat (ILSVRC2012_val_*.JPEG); move "
    "each image into val/<wnid>/ by the ground truth (e.g. with the widely used "
    "valprep.sh script), as in the training split"
)


@dataclass
class FolderDataset:
    """An image-folder split: file paths (relative to `root`) and labels views.

    files: numpy bytes array of the relative paths (no per-file Python objects, so forked
        worker processes share it without copying). `index`: each sample's position in
        the full split (kept through subsets): it seeds corruptions and augmentation.
    image_size / resize: the evaluation transform (short side to `resize`, central
        `image_size` square) and the training crop size. skip_bad, workers, decoder:
        how `FolderBatches` reads the files (see there). corruption: (name, severity,
        seed) applied to every decoded image, or None.
    """

    root: str
    files: np.ndarray
    labels: dict[str, torch.Tensor]
    classes: list[str]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    name: str = "folder"
    split: str = ""
    meta: dict = field(default_factory=dict)
    index: torch.Tensor | None = None
    image_size: int = 224
    resize: int = 256
    skip_bad: bool = False
    workers: int | None = None
    decoder: str = "auto"
    corruption: tuple[str, int, int] | None = None

    def __post_init__(self) -> None:
        self.files = np.asarray(self.files, dtype=np.bytes_)
        for view, y in self.labels.items():
            if y.shape != (len(self.files),):
                raise NCLayersError(
                    f"labels view {view!r}: shape {tuple(y.shape)} != ({len(self)},)"
                )
        if self.index is None:
            self.index = torch.arange(len(self))
        if self.index.shape != (len(self),):
            raise NCLayersError(f"index: shape {tuple(self.index.shape)} != ({len(self)},)")
        check_sizes(self.image_size, self.resize)
        if self.decoder not in DECODERS:
            raise NCLayersError(f"data.decoder={self.decoder!r}: expected one of {DECODERS}")
        if self.workers is not None and int(self.workers) < 0:
            raise NCLayersError(
                f"data.workers={self.workers}: 0 reads in the main process, N > 0 uses N "
                "worker processes, null picks a default"
            )

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def views(self) -> list[str]:
        return list(self.labels)

    def path(self, position: int) -> str:
        """The full path of the sample at `position` of this (sub)set."""
        return os.path.join(self.root, self.files[position].decode())

    def subset(self, index: torch.Tensor) -> FolderDataset:
        index = torch.as_tensor(index, dtype=torch.long)
        labels = {k: v[index] for k, v in self.labels.items()}
        return replace(
            self, files=self.files[index.numpy()], labels=labels, meta=dict(self.meta),
            index=self.index[index],
        )  # fmt: skip

    def with_views(self, views: dict[str, torch.Tensor]) -> FolderDataset:
        return replace(self, labels=dict(views), meta=dict(self.meta))

    def corrupted(self, name: str, severity: int, seed: int = 0) -> FolderDataset:
        """The same samples, each decoded image corrupted (by its `index`) before cropping."""
        meta = dict(self.meta, corruption=name, corruption_severity=severity, corruption_seed=seed)
        return replace(self, corruption=(name, int(severity), int(seed)), meta=meta)

    def clean_twin(self) -> FolderDataset:
        """The same samples without the corruption (a corrupted data set only)."""
        if self.corruption is None:
            raise NCLayersError(
                f"{self.name} {self.split}: is not corrupted, so it has no clean twin; load it "
                "with data.corruption=NAME"
            )
        meta = {k: v for k, v in self.meta.items() if not k.startswith("corruption")}
        return replace(self, corruption=None, meta=meta)


def check_sizes(image_size: int, resize: int) -> None:
    if int(image_size) < 1 or int(resize) < int(image_size):
        raise NCLayersError(
            f"data.image_size={image_size}, data.resize={resize}: need 1 <= image_size <= "
            "resize (the short side is resized to `resize`, then the central image_size "
            "square is kept; ImageNet: 224 and 256)"
        )


# ----------------------------------------------------------------------------- scanning
def split_folder(root: str | Path, split: str) -> Path:
    """`root/train` or `root/val` (for split "test"), checked to exist."""
    if split not in SPLIT_FOLDERS:
        raise NCLayersError(f"split={split!r}: expected one of {sorted(SPLIT_FOLDERS)}")
    root = Path(root)
    folder = root / SPLIT_FOLDERS[split]
    if not root.exists():
        raise NCLayersError(
            f"data.dir={str(root)!r} does not exist: pass the folder holding train/<class>/ "
            "and val/<class>/ image folders (ImageNet: docs/imagenet.md says how to arrange "
            "the official tarballs). If it is the generated folder of a -cpu-mini sweep, "
            f"make it first: `nclayers make-folder {root}` (the command in the sweep file's "
            "header)"
        )
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise NCLayersError(
            f"data.dir={str(root)!r}: no folder {folder.name}/ for split {split!r} (it holds "
            f"{found or 'nothing'}); expected data.dir/train/<class>/<image> and "
            "data.dir/val/<class>/<image>"
        )
    return folder


def class_names(folder: Path) -> list[str]:
    """The sorted class folder names of a split folder."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not names:
        loose = [e.name for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_EXTENSIONS)]
        hint = f"; {_VAL_HINT}" if loose else ""
        raise NCLayersError(
            f"{folder}: holds no class folder (expected {folder}/<class>/<image>)"
            f"{' but ' + str(len(loose)) + ' loose images' if loose else ''}{hint}"
        )
    return names


def scan_split(
    root: str | Path, split: str, classes: int | None = None
) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    """(relative paths, labels, class names) of a split, classes in sorted order."""
    folder = split_folder(root, split)
    names = class_names(folder)
    if classes is not None:
        if not 2 <= int(classes) <= len(names):
            raise NCLayersError(
                f"data.classes={classes}: {folder} has {len(names)} class folders; keep "
                f"between 2 and {len(names)} (the first N in sorted order), or null for all"
            )
        names = names[: int(classes)]
    files: list[str] = []
    labels: list[int] = []
    for k, name in enumerate(names):
        entries = sorted(
            e.name for e in os.scandir(folder / name)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )  # fmt: skip
        if not entries:
            raise NCLayersError(
                f"{folder / name}: class folder {name!r} holds no image "
                f"({', '.join(IMAGE_EXTENSIONS)}); add its images or remove the folder"
            )
        prefix = f"{folder.name}/{name}/"
        files += [prefix + e for e in entries]
        labels += [k] * len(entries)
    return np.array(files, dtype=np.bytes_), torch.tensor(labels, dtype=torch.long), names


def load_folder_split(
    root: str | Path,
    split: str,
    *,
    name: str = "folder",
    classes: int | None = None,
    image_size: int = 224,
    resize: int = 256,
    mean=None,
    std=None,
    skip_bad: bool = False,
    workers: int | None = None,
    decoder: str = "auto",
) -> FolderDataset:
    """One split of an image folder as a `FolderDataset` (labels view "clean").

    The test split's classes must be the training split's (when `root/train` exists):
    the class index of a label is its position among the sorted training classes.
    """
    if not root:
        raise NCLayersError(
            f"data.dir is not set: {name} is read from a local folder; pass data.dir=PATH "
            "(the folder holding train/ and val/)"
        )
    files, labels, names = scan_split(root, split, classes)
    train_folder = Path(root) / "train"
    if SPLIT_FOLDERS[split] != "train" and train_folder.is_dir():
        train_names = class_names(train_folder)
        if classes is not None:
            train_names = train_names[: int(classes)]
        if train_names != names:
            only = sorted(set(names) ^ set(train_names))[:5]
            raise NCLayersError(
                f"data.dir={str(root)!r}: val/ and train/ hold different class folders "
                f"(e.g. {only}); both splits need the same classes, so class k means the same "
                "in both"
            )
    mean = _constants("mean", mean, IMAGENET_MEAN)
    std = _constants("std", std, IMAGENET_STD)
    return FolderDataset(
        root=str(root), files=files, labels={"clean": labels}, classes=names,
        mean=mean, std=std, name=name, split=split, image_size=int(image_size),
        resize=int(resize), skip_bad=bool(skip_bad), workers=workers, decoder=decoder,
    )  # fmt: skip


def _constants(key: str, value, default: tuple[float, ...]) -> tuple[float, ...]:
    value = default if value is None else tuple(float(v) for v in value)
    if len(value) != 3 or (key == "std" and min(value) <= 0):
        raise NCLayersError(
            f"data.{key}={list(value)}: expected 3 per-channel values in [0, 1] units "
            f"(ImageNet's: {list(default)})"
        )
    return value


# ----------------------------------------------------------------------------- decoding
class BadImage(Exception):
    """A file that no decoder could read; the reason is the message."""


@contextlib.contextmanager
def torchvision_io() -> Iterator[None]:
    """Around nclayers' own calls of torchvision's decoders and encoders: their
    deprecation warning (torchvision 0.29, on every call: they move to TorchCodec) is
    left out. They are what nclayers measured fastest, and PIL is the fallback if they
    go away. Scoped by `warnings.catch_warnings`, so importing nclayers installs no
    filter (like any `catch_warnings`, not safe to enter from several threads at once:
    nclayers decodes in worker processes or on one thread)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=_TORCHVISION_IO_DEPRECATION, category=DeprecationWarning
        )
        yield


def decode_bytes(data: bytes, decoder: str = "torchvision") -> torch.Tensor:
    """A file's bytes as 3 x H x W uint8 RGB, by its content (JPEG of any colour space,
    PNG, ...). torchvision's decoders first (libjpeg-turbo and libpng, no copies), PIL
    for what they refuse (other formats, older torchvision without CMYK); raises
    `BadImage` when neither can read it (truncated, not an image)."""
    if decoder != "pil":
        try:
            from torchvision.io import ImageReadMode, decode_image
        except ImportError:  # torchvision deprecates its decoders (0.29): PIL stays
            return _decode_pil(data)
        try:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            with torchvision_io():
                image = decode_image(buf, mode=ImageReadMode.RGB)
            if image.dtype == torch.uint8:  # a 16-bit PNG comes as uint16: PIL below
                return image
        except (RuntimeError, ValueError):
            pass  # PIL below says whether the file is really unreadable
    return _decode_pil(data)


def _decode_pil(data: bytes) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")  # CMYK, L, P, I;16, RGBA ... -> RGB
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise BadImage(f"{type(err).__name__}: {err}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise BadImage(f"{type(err).__name__}: {err.strerror or err}") from None


def read_image(path: str | Path, decoder: str = "torchvision") -> torch.Tensor:
    """One file as 3 x H x W uint8 RGB; an unreadable file raises `NCLayersError`."""
    try:
        return decode_bytes(read_bytes(str(path)), decoder)
    except BadImage as err:
        raise bad_image_error(str(path), str(err)) from None


def bad_image_error(path: str, reason: str) -> NCLayersError:
    return NCLayersError(
        f"{path}: cannot be read as an image ({reason}); replace or delete the file, or set "
        "data.skip_bad=true to leave unreadable files out (they are counted and logged)"
    )


# The JPEG start-of-frame markers: baseline and extended sequential (what GPU decoders take
# in batches), and the rest (progressive, lossless, arithmetic), decoded on the CPU.
_SOF_DEVICE = (0xC0, 0xC1)
_SOF_OTHER = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(SOF marker, height, width, components) of a JPEG, or None if `data` is not one
    (or its header is damaged). Reads the marker segments up to the frame header only."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):  # markers without a length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_DEVICE or marker in _SOF_OTHER:
            if pos + 10 > end:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return marker, height, width, data[pos + 9]
        if marker == 0xDA or length < 2:  # scan data before a frame header: damaged
            return None
        pos += 2 + length
    return None


def device_decodable(data: bytes) -> tuple[int, int] | None:
    """(height, width) if a GPU decoder takes this file in a batch (a baseline or extended
    sequential 3-component JPEG), else None: greyscale, CMYK, progressive JPEGs and other
    formats are decoded on the CPU."""
    header = jpeg_header(data)
    if header is None or header[0] not in _SOF_DEVICE or header[3] != 3:
        return None
    if header[1] == 0 or header[2] == 0:
        return None
    return header[1], header[2]


__all__ = [
    "DECODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "FolderDataset",
    "bad_image_error",
    "check_sizes",
    "decode_bytes",
    "device_decodable",
    "jpeg_header",
    "load_folder_split",
    "read_image",
    "scan_split",
    "torchvision_io",
]
