"""Label noise: shuffled or uniform random labels, CIFAR-10N and CIFAR-100N human labels.

`shuffle_labels` (the paper's noise, `data.noise_mode=shuffle`) and `uniform_labels`
(`data.noise_mode=uniform`) both pick the same `round(rate * n)` samples for a given
seed (`noise_selection`); CIFAR-10N/100N label files are read by index in the original
training order. `changed_views` gives the labels views that single out the samples
whose training label differs from the true one (label -1: sample left out of the view).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from nclayers.config import CLEAN_LABELS
from nclayers.errors import NCLayersError

NOISE_MODES = ("shuffle", "uniform")

# CIFAR-10N label sets by their names in the paper (and the file's own keys).
CIFAR10N_KEYS = {
    "aggre": "aggre_label",
    "random1": "random_label1",
    "randn1": "random_label1",
    "random2": "random_label2",
    "random3": "random_label3",
    "worse": "worse_label",
    "worst": "worse_label",
}
# CIFAR-100N: one human label per image (fine classes).
CIFAR100N_KEYS = {"noisy": "noisy_label", "noisy100": "noisy_label"}
CIFARN_SOURCE = "https://github.com/UCSC-REAL/cifar-10-100n (folder data/)"

# Labels views of a noisy training split, beside "clean" and "noisy" (-1 = left out).
CHANGED_CLEAN = "changed_clean"  # true labels of the samples whose label was changed
CHANGED_NOISY = "changed_noisy"  # training labels of those samples
UNCHANGED = "unchanged"  # labels of the other samples (true = training label there)
LEFT_OUT = -1


def has_label_noise(noise) -> bool:
    """Whether a `data.noise` value asks for noisy labels (None, "", 0 and "clean" do not)."""
    return noise not in CLEAN_LABELS


def _check_rate(rate: float) -> float:
    if not 0.0 <= rate <= 1.0:
        raise NCLayersError(f"data.noise={rate}: a noise rate must lie in [0, 1]")
    return float(rate)


def noise_selection(n: int, rate: float, seed: int = 0) -> torch.Tensor:
    """The `round(rate * n)` sample indices whose labels are redrawn (both noise modes)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[: round(_check_rate(rate) * n)]


def shuffle_labels(labels: torch.Tensor, rate: float, seed: int = 0) -> torch.Tensor:
    """Shuffle the labels of a random fraction `rate` of samples among themselves, once.

    The paper's "randomly shuffled and fixed" noise: class counts stay the same; a shuffled
    sample may keep its label by chance, so the share that differs is a little under `rate`.
    """
    _check_rate(rate)
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    chosen = torch.randperm(n, generator=gen)[: round(rate * n)]  # == noise_selection
    noisy = labels.clone()
    noisy[chosen] = labels[chosen][torch.randperm(len(chosen), generator=gen)]
    return noisy


def uniform_labels(
    labels: torch.Tensor, rate: float, num_classes: int, seed: int = 0
) -> torch.Tensor:
    """Give `round(rate * n)` random samples a class drawn uniformly from the OTHER classes.

    The drawn class never equals the true one, so exactly `round(rate * n)` labels change
    (the "symmetric" noise of e.g. Co-teaching); class counts change a little.
    """
    if num_classes < 2:
        raise NCLayersError(f"num_classes={num_classes}: uniform label noise needs >= 2 classes")
    chosen = noise_selection(len(labels), rate, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    shift = torch.randint(1, num_classes, (len(chosen),), generator=gen)  # 1..K-1
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


def changed_views(clean: torch.Tensor, noisy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of a noisy split that keep only changed (or only unchanged) samples.

    changed_clean: true labels where the training label differs, -1 elsewhere;
    changed_noisy: the training labels of the same samples, -1 elsewhere;
    unchanged: the labels of the other samples, -1 on the changed ones.
    """
    changed = clean != noisy
    left_out = torch.full_like(clean, LEFT_OUT)
    return {
        CHANGED_CLEAN: torch.where(changed, clean, left_out),
        CHANGED_NOISY: torch.where(changed, noisy, left_out),
        UNCHANGED: torch.where(changed, left_out, clean),
    }


def _bad_file(path: Path, err: Exception, how: str) -> ValueError:
    return NCLayersError(
        f"{path}: truncated or unreadable ({type(err).__name__}: "
        f"{(str(err).strip().splitlines() or [''])[0]}); replace it with a "
        f"good copy: {how}"
    )


try:  # numpy >= 2 keeps it in numpy._core; pickles name it numpy.core either way
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

_NUMPY_ARRAY_GLOBALS = [
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    _reconstruct,  # the name numpy 2 writes
    np.ndarray,
    np.dtype,
    *(type(np.dtype(t)) for t in ("int64", "int32", "int16", "int8", "uint8", "bool")),
]


def _load_label_file(path: Path, keys: dict[str, str], kind: str) -> dict[str, np.ndarray]:
    """The arrays of a CIFAR-N label file (.npz, or the official pickled .pt)."""
    how = f"download it again from {CIFARN_SOURCE}"
    try:
        if path.suffix == ".npz":
            with np.load(path) as f:
                return {k: np.asarray(f[k]) for k in f.files}
        # The official file is a pickled dict of numpy arrays: allow exactly those types,
        # so loading it never runs code from it.
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            obj = torch.load(path, weights_only=True)
    except (
        OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError,
        zipfile.BadZipFile, KeyError,
    ) as err:  # fmt: skip
        raise _bad_file(path, err, how) from err
    if not isinstance(obj, dict) or keys[kind] not in obj:
        raise NCLayersError(f"{path}: expected a dict with {keys[kind]!r}; {how}")
    return {k: np.asarray(v) for k, v in obj.items()}


def _human_labels(
    kind: str, data_dir: str | Path, keys: dict[str, str], folder: str, stem: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    data_dir = Path(data_dir).expanduser()
    for cand in (data_dir / folder, data_dir):
        for path in (cand / f"{stem}.npz", cand / f"{stem}.pt"):
            if path.is_file():
                arrays = _load_label_file(path, keys, kind)
                if keys[kind] not in arrays:
                    raise NCLayersError(
                        f"{path}: holds no {keys[kind]!r}; download it again from {CIFARN_SOURCE}"
                    )
                labels = torch.as_tensor(arrays[keys[kind]].astype(np.int64))
                clean = arrays.get("clean_label")
                clean = torch.as_tensor(clean.astype(np.int64)) if clean is not None else None
                return labels, clean
    raise NCLayersError(
        f"data.dir={str(data_dir)!r} holds no {folder}/{stem}.npz or .pt; put the label file "
        f"there (from {CIFARN_SOURCE})"
    )


def cifar10n_labels(kind: str, data_dir: str | Path) -> torch.Tensor:
    """CIFAR-10N labels (50,000, original training order) from CIFAR-10_human.npz/.pt."""
    return cifarn_labels("cifar10", kind, data_dir)[0]


def cifar100n_labels(kind: str, data_dir: str | Path) -> torch.Tensor:
    """CIFAR-100N fine labels (50,000, original training order) from CIFAR-100_human.pt."""
    return cifarn_labels("cifar100", kind, data_dir)[0]


def cifarn_labels(
    dataset: str, kind: str, data_dir: str | Path
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(human labels, the file's clean_label or None) of CIFAR-10N or CIFAR-100N."""
    if dataset == "cifar10":
        keys, folder, stem = CIFAR10N_KEYS, "cifar-10n", "CIFAR-10_human"
    elif dataset == "cifar100":
        keys, folder, stem = CIFAR100N_KEYS, "cifar-100n", "CIFAR-100_human"
    else:
        raise NCLayersError(f"data.noise={kind!r}: human label sets exist for cifar10 and cifar100")
    if kind not in keys:
        raise NCLayersError(
            f"data.noise={kind!r}: the {dataset.upper()}N label sets are {sorted(keys)} "
            "(or give a rate in [0, 1])"
        )
    return _human_labels(kind, data_dir, keys, folder, stem)
