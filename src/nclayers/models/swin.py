"""Swin Transformers (timm's `SwinTransformer`) for 32x32 and 224x224 inputs.

At `img_size=32` (CIFAR; any side up to 64) the patch embedding is 2x2 and the window
4x4, so the four stages see 16x16, 8x8, 4x4 and 2x2 token grids (timm shrinks a window
that is larger than its grid and then stops shifting it). At `img_size=224` (any larger
side) the settings are the standard ImageNet ones (patch 4, window 7). Module names are
timm's, so timm state_dicts of the same architecture load as they are.

`swin_base_deep` and `swin_large_deep` are the paper's deeper variants (appendix A.1),
given there only by depths ([2,2,30,2], [2,2,42,2]) and heads ([3,6,12,24]). Those are
Swin-T's heads, whose 96-d embedding gives exact 32-d heads, so the embedding is 96 here;
Base's 128 does not divide by 3 heads (timm would floor the head width to 42).

Every option of timm's `SwinTransformer` passes through (embed_dim, depths, num_heads,
patch_size, window_size, drop_path_rate, ...), e.g. a CPU-sized Swin-T:
`build_model("swin_tiny", embed_dim=48, patch_size=4, window_size=4)`.
Blocks are the `SwinTransformerBlock`s in forward order; their outputs are N x H x W x C.
"""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer

from nclayers.errors import NCLayersError
from nclayers.models.registry import register_model

# Architecture per name: embedding width, blocks per stage, heads per stage.
_ARCHS: dict[str, dict] = {
    "swin_tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    "swin_small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)},
    "swin_base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
    "swin_large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)},
    # The paper's deeper variants: more blocks in stage 3, Swin-T's heads.
    "swin_base_deep": {"embed_dim": 96, "depths": (2, 2, 30, 2), "num_heads": (3, 6, 12, 24)},
    "swin_large_deep": {"embed_dim": 96, "depths": (2, 2, 42, 2), "num_heads": (3, 6, 12, 24)},
}

# Patch and window per input size: small patches keep a 16x16 grid on 32x32 images.
_CIFAR = {"patch_size": 2, "window_size": 4}
_IMAGENET = {"patch_size": 4, "window_size": 7}


def swin(
    arch: str,
    num_classes: int = 10,
    img_size: int = 32,
    **options,
) -> SwinTransformer:
    """Build a Swin of `arch` (a key of `_ARCHS`) for square `img_size` inputs."""
    if arch not in _ARCHS:
        raise NCLayersError(
            f"arch={arch!r} is not a Swin architecture; choose one of {list(_ARCHS)}"
        )
    if not isinstance(img_size, int) or img_size < 1:
        raise NCLayersError(f"img_size={img_size!r}: pass the input side in pixels, 32 or 224")
    settings = {**_ARCHS[arch], **(_CIFAR if img_size <= 64 else _IMAGENET), **options}
    patch = settings["patch_size"]
    if img_size % patch:
        raise NCLayersError(
            f"img_size={img_size} is not a multiple of patch_size={patch}; pick a patch_size "
            "that divides the image side (2 or 4 for 32x32, 4 for 224x224)"
        )
    grid = img_size // patch
    if grid < 2 ** (len(settings["depths"]) - 1):
        raise NCLayersError(
            f"patch_size={patch} leaves a {grid}x{grid} token grid at img_size={img_size}, too "
            f"small for {len(settings['depths'])} stages that each halve it; use a smaller patch"
        )
    settings.setdefault("drop_path_rate", 0.1)
    return SwinTransformer(img_size=img_size, num_classes=num_classes, **settings)


def _register(arch: str) -> None:
    depths = _ARCHS[arch]["depths"]

    @register_model(arch, input_size=32, family="swin", blocks=sum(depths))
    def build(num_classes: int = 10, img_size: int = 32, **options) -> SwinTransformer:
        return swin(arch, num_classes=num_classes, img_size=img_size, **options)

    build.__name__ = arch
    build.__doc__ = (
        f"{arch}: timm Swin, depths {list(depths)}, {sum(depths)} blocks; img_size 32 (patch 2, "
        "window 4) or 224 (patch 4, window 7)."
    )


for _arch in _ARCHS:
    _register(_arch)
