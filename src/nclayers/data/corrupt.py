"""Corrupted inputs: the noise corruptions of CIFAR-10-C, reproducible per sample.

Definitions and CIFAR severity constants follow Hendrycks & Dietterich, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations" (ICLR 2019), as
published in `ImageNet-C/create_c/make_cifar_c.py` of github.com/hendrycks/robustness.
With x the image in [0, 1] and c the severity's constant:

    gaussian_noise  clip(x + c z, 0, 1),        z ~ N(0, 1)         c = .04 .06 .08 .09 .10
    shot_noise      clip(k / c, 0, 1),          k ~ Poisson(c x)    c = 500 250 100 75 50
    impulse_noise   salt & pepper, amount c                         c = .01 .02 .03 .05 .07
    speckle_noise   clip(x + x c z, 0, 1),      z ~ N(0, 1)         c = .06 .10 .12 .16 .20

every value drawn independently per pixel and channel. Impulse noise is scikit-image's
`random_noise(mode="s&p", amount=c)` (salt_vs_pepper 0.5), written here in torch: each
value is hit with probability c, and a hit value becomes 1 or 0 with probability 1/2
each. The release stores `np.uint8(255 * result)`, which truncates; so do we.

Every sample's noise comes from its own generator, seeded from (seed, the sample's index
in its data set), so an image is corrupted the same way in every epoch, on every rank,
in every batch order and in every subset. The paper's levels 1/2/3 are severities 1/3/5.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nclayers.errors import NCLayersError

# CIFAR constants of make_cifar_c.py, severities 1..5.
SEVERITY_CONSTANTS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
}
CORRUPTIONS = tuple(SEVERITY_CONSTANTS)
PAPER_LEVELS = {"L1": 1, "L2": 3, "L3": 5}  # the paper's levels 1/2/3 (appendix A.3)
_CHUNK = 2048  # samples corrupted at once: bounds the float32 working memory


def check_corruption(name: str) -> str:
    if name not in SEVERITY_CONSTANTS:
        raise NCLayersError(
            f"data.corruption={name!r}: unknown corruption; valid ones are {', '.join(CORRUPTIONS)}"
        )
    return name


def parse_severity(value) -> int:
    """1..5, or the paper's level 'L1'/'L2'/'L3' (= severity 1/3/5)."""
    if isinstance(value, str):
        text = value.strip()
        if text.upper() in PAPER_LEVELS:
            return PAPER_LEVELS[text.upper()]
        value = int(text) if text.isdigit() else text
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
        raise NCLayersError(
            f"data.severity={value!r}: expected a severity 1, 2, 3, 4 or 5, or the paper's "
            "level L1, L2 or L3 (= severity 1, 3, 5)"
        )
    return value


def sample_seed(seed: int, index: int) -> int:
    """The seed of one sample's generator, from (seed, the sample's index).

    torch's CPU generator (mt19937) keeps only 32 bits of a seed, so the pair is folded
    into 32 bits: index + seed * golden ratio (distinct for all indices < 2**32 under one
    seed), then murmur3's bijective finaliser so that neighbouring keys share no bits.
    """
    if not 0 <= index < 2**32 or seed < 0:
        raise NCLayersError(f"seed={seed}, index={index}: need seed >= 0 and 0 <= index < 2**32")
    h = (index + seed * 0x9E3779B9) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


# The random draws of one sample (one value per pixel and channel, written into `out`)
# and the formula that turns clean values x in [0, 1] and the draws into corrupted values.
def _draw_normal(x: torch.Tensor, c: float, gen: torch.Generator, out: torch.Tensor) -> None:
    torch.randn(x.shape, generator=gen, out=out)


def _draw_poisson(x: torch.Tensor, c: float, gen: torch.Generator, out: torch.Tensor) -> None:
    out.copy_(torch.poisson(x * c, generator=gen))


def _draw_impulse(x: torch.Tensor, c: float, gen: torch.Generator, out: torch.Tensor) -> None:
    # Two uniforms per value: hit if u[0] < c, then salt if u[1] < 0.5.
    torch.rand(out.shape, generator=gen, out=out)


def _gaussian(x: torch.Tensor, c: float, z: torch.Tensor) -> torch.Tensor:
    return (x + c * z).clamp(0.0, 1.0)


def _shot(x: torch.Tensor, c: float, k: torch.Tensor) -> torch.Tensor:
    return (k / c).clamp(0.0, 1.0)


def _impulse(x: torch.Tensor, c: float, u: torch.Tensor) -> torch.Tensor:
    hit, salt = u[..., 0, :] < c, u[..., 1, :] < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def _speckle(x: torch.Tensor, c: float, z: torch.Tensor) -> torch.Tensor:
    return (x + x * c * z).clamp(0.0, 1.0)


_KINDS: dict[str, tuple[Callable, Callable]] = {  # name -> (draw, formula)
    "gaussian_noise": (_draw_normal, _gaussian),
    "shot_noise": (_draw_poisson, _shot),
    "impulse_noise": (_draw_impulse, _impulse),
    "speckle_noise": (_draw_normal, _speckle),
}


def corruption_formula(
    x: torch.Tensor, name: str, severity: int, draws: torch.Tensor
) -> torch.Tensor:
    """The published formula on values `x` in [0, 1] for given random `draws`.

    draws: standard normals (gaussian, speckle), Poisson counts (shot), or for impulse
    a tensor (..., 2, n) of uniforms in [0, 1): hit where draws[..., 0, :] < c, then salt
    where draws[..., 1, :] < 0.5 (x: (..., n)). Returns values in [0, 1].
    """
    c = SEVERITY_CONSTANTS[check_corruption(name)][parse_severity(severity) - 1]
    return _KINDS[name][1](x, c, draws)


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int | str,
    seed: int = 0,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Corrupt uint8 images N x C x H x W; returns uint8 images of the same shape.

    index: each sample's position in its data set (default 0..N-1): with `seed` it fixes
    the sample's noise, so a subset or a shuffled batch gets the same corrupted images.
    Runs on the CPU (per-sample generators); the result is put on the images' device.
    """
    check_corruption(name)
    severity = parse_severity(severity)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise NCLayersError(
            f"images: expected uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}"
        )
    n = images.shape[0]
    index = torch.arange(n) if index is None else torch.as_tensor(index, dtype=torch.long)
    if index.shape != (n,):
        raise NCLayersError(f"index: shape {tuple(index.shape)} != ({n},), one per image")
    c = SEVERITY_CONSTANTS[name][severity - 1]
    draw, formula = _KINDS[name]
    flat = images.detach().cpu().reshape(n, -1)
    values = flat.shape[1]
    shape = (2, values) if name == "impulse_noise" else (values,)
    out = torch.empty_like(flat)
    gen = torch.Generator()
    keys = index.tolist()  # once per data set, not per batch
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        x32 = flat[start:stop].to(torch.float32) / 255.0
        draws = torch.empty((stop - start, *shape))
        for i, key in enumerate(keys[start:stop]):
            gen.manual_seed(sample_seed(seed, key))
            draw(x32[i], c, gen, draws[i])
        # float64 as the reference's numpy arithmetic.
        y = formula(flat[start:stop].to(torch.float64) / 255.0, c, draws.to(torch.float64))
        # The release's np.uint8(255 * y) truncates (y lies in [0, 1]).
        out[start:stop] = (y * 255.0).to(torch.uint8)
    return out.reshape(images.shape).to(images.device)
