"""Label noise: shuffled random labels and CIFAR-10N human labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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


def shuffle_labels(labels: torch.Tensor, rate: float, seed: int = 0) -> torch.Tensor:
    """Shuffle the labels of a random fraction `rate` of samples among themselves, once.

    The paper's "randomly shuffled and fixed" noise: class counts stay the same; a shuffled
    sample may keep its label by chance, so the share that differs is a little under `rate`.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"data.noise={rate}: a noise rate must lie in [0, 1]")
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    chosen = torch.randperm(n, generator=gen)[: round(rate * n)]
    noisy = labels.clone()
    noisy[chosen] = labels[chosen][torch.randperm(len(chosen), generator=gen)]
    return noisy


def cifar10n_labels(kind: str, data_dir: str | Path) -> torch.Tensor:
    """CIFAR-10N labels (50,000, original training order) from CIFAR-10_human.npz/.pt."""
    if kind not in CIFAR10N_KEYS:
        raise ValueError(f"data.noise={kind!r}: CIFAR-10N sets are {sorted(CIFAR10N_KEYS)}")
    data_dir = Path(data_dir).expanduser()
    for cand in (data_dir / "cifar-10n", data_dir):
        npz, pt = cand / "CIFAR-10_human.npz", cand / "CIFAR-10_human.pt"
        if npz.is_file():
            with np.load(npz) as f:
                return torch.from_numpy(f[CIFAR10N_KEYS[kind]].astype(np.int64))
        if pt.is_file():
            # The official file is a pickled dict of numpy arrays, not a tensor file.
            obj = torch.load(pt, weights_only=False)
            return torch.as_tensor(np.asarray(obj[CIFAR10N_KEYS[kind]]), dtype=torch.long)
    raise FileNotFoundError(
        f"data.dir={str(data_dir)!r} holds no cifar-10n/CIFAR-10_human.npz; put the CIFAR-10N "
        "label file there"
    )
