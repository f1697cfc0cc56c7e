"""Vision Transformers (timm's `VisionTransformer`), small and base, for 32 or 224 inputs.

At `img_size=32` (any side up to 64) the patches are 4x4 (an 8x8 grid of 64 tokens plus
the class token), at 224 (any larger side) the standard 16x16. Module names are timm's,
so timm state_dicts of the same architecture load as they are. Blocks are the 12
transformer `Block`s, each pooled as the model's head pools the last one (`find_blocks`
follows timm's `global_pool`): the class token by default (`global_pool="token"`), the
mean of the patch tokens with `global_pool="avg"`; `token_pool="mean"` or `"cls"`
overrides it. Every other option of timm's `VisionTransformer` passes through
(embed_dim, depth, num_heads, drop_path_rate, global_pool, ...).
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from nclayers.errors import NCLayersError
from nclayers.models.registry import register_model

_ARCHS: dict[str, dict] = {
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}
TOKEN_POOLS = ("mean", "cls")


def vit(
    arch: str,
    num_classes: int = 10,
    img_size: int = 32,
    token_pool: str | None = None,
    **options,
) -> VisionTransformer:
    """Build a ViT of `arch` (a key of `_ARCHS`) for square `img_size` inputs."""
    if arch not in _ARCHS:
        raise NCLayersError(
            f"arch={arch!r} is not a ViT architecture; choose one of {list(_ARCHS)}"
        )
    if token_pool is not None and token_pool not in TOKEN_POOLS:
        raise NCLayersError(
            f"token_pool={token_pool!r}: choose 'mean' (average of the patch tokens), "
            "'cls' (the class token) or null (as the model's global_pool)"
        )
    if not isinstance(img_size, int) or img_size < 1:
        raise NCLayersError(f"img_size={img_size!r}: pass the input side in pixels, 32 or 224")
    settings = {**_ARCHS[arch], "patch_size": 4 if img_size <= 64 else 16, **options}
    patch = settings["patch_size"]
    if img_size % patch:
        raise NCLayersError(
            f"img_size={img_size} is not a multiple of patch_size={patch}; pick a patch_size "
            "that divides the image side (4 for 32x32, 16 for 224x224)"
        )
    model = VisionTransformer(img_size=img_size, num_classes=num_classes, **settings)
    if token_pool is not None:  # find_blocks reads this before the model's global_pool
        model.nclayers_token_pool = token_pool
    return model


def _register(arch: str) -> None:
    depth = _ARCHS[arch]["depth"]

    @register_model(arch, input_size=32, family="vit", blocks=depth)
    def build(
        num_classes: int = 10, img_size: int = 32, token_pool: str | None = None, **options
    ) -> VisionTransformer:
        return vit(arch, num_classes, img_size=img_size, token_pool=token_pool, **options)

    build.__name__ = arch
    build.__doc__ = (
        f"{arch}: timm ViT, {depth} blocks; img_size 32 (patch 4) or 224 (patch 16); blocks "
        "pooled as its global_pool (class token by default), or token_pool 'mean' / 'cls'."
    )


for _arch in _ARCHS:
    _register(_arch)
