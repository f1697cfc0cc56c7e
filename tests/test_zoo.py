"""The registry's model zoo: every model builds, its blocks are found and run.

Big models keep their real depth but get narrower widths (and PyTorch's default
initialisation instead of timm's slower one) so the zoo runs in seconds on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch

from nclayers.models import build_model, find_blocks, get_entry, list_models
from nclayers.taps import Taps, probe_shapes

# The paper's zoo: (family, blocks).
ZOO = {
    "resnet18": ("resnet", 8),
    "resnet34": ("resnet", 16),
    "resnet50": ("resnet", 16),
    "resnet101": ("resnet", 33),
    "resnet152": ("resnet", 50),
    "swin_tiny": ("swin", 12),
    "swin_small": ("swin", 24),
    "swin_base": ("swin", 24),
    "swin_large": ("swin", 24),
    "swin_base_deep": ("swin", 36),
    "swin_large_deep": ("swin", 48),
    "vit_small": ("vit", 12),
    "vit_base": ("vit", 12),
    "vgg13": ("vgg", 10),
    "vgg16": ("vgg", 13),
    "vgg19": ("vgg", 16),
}

# Options that keep a model quick on a CPU without changing its depth.
_QUICK_INIT = {"weight_init": "reset"}  # PyTorch default init: timm's truncated normal is slow
_NARROW_SWIN = {"embed_dim": 48, "patch_size": 4, "window_size": 4, **_QUICK_INIT}
FAST = {
    "resnet34": {"width": 8},
    "resnet50": {"width": 8},
    "resnet101": {"width": 8},
    "resnet152": {"width": 8},
    "swin_tiny": _QUICK_INIT,
    "swin_small": _QUICK_INIT,
    "swin_base": _NARROW_SWIN,
    "swin_large": _NARROW_SWIN,
    "swin_base_deep": _NARROW_SWIN,
    "swin_large_deep": _NARROW_SWIN,
    "vit_small": _QUICK_INIT,
    "vit_base": _QUICK_INIT,
}

_RESNET_LAYERS = {
    "resnet18": (1, [2, 2, 2, 2]),
    "resnet34": (1, [3, 4, 6, 3]),
    "resnet50": (4, [3, 4, 6, 3]),
    "resnet101": (4, [3, 4, 23, 3]),
    "resnet152": (4, [3, 8, 36, 3]),
}
_SWIN_DEPTHS = {
    "swin_tiny": (96, [2, 2, 6, 2]),
    "swin_small": (96, [2, 2, 18, 2]),
    "swin_base": (128, [2, 2, 18, 2]),
    "swin_large": (192, [2, 2, 18, 2]),
    "swin_base_deep": (96, [2, 2, 30, 2]),
    "swin_large_deep": (96, [2, 2, 42, 2]),
}
_VGG_WIDTHS = {
    "vgg13": [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "vgg19": [64, 64, 128, 128] + [256] * 4 + [512] * 8,
}


def expected_dims(name: str, options: dict) -> list[int] | None:
    """Pooled width of every block, from the architecture's definition."""
    if name in _RESNET_LAYERS:
        expansion, layers = _RESNET_LAYERS[name]
        width = options.get("width", 64)
        return [width * 2**s * expansion for s, n in enumerate(layers) for _ in range(n)]
    if name in _SWIN_DEPTHS:
        embed, depths = _SWIN_DEPTHS[name]
        embed = options.get("embed_dim", embed)
        return [embed * 2**s for s, n in enumerate(depths) for _ in range(n)]
    if name == "vit_small":
        return [384] * 12
    if name == "vit_base":
        return [768] * 12
    return _VGG_WIDTHS.get(name)


def test_the_papers_zoo_is_registered():
    for name, (family, blocks) in ZOO.items():
        entry = get_entry(name)
        assert (entry.family, entry.blocks, entry.input_size) == (family, blocks, 32), name


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_with_its_blocks_found(name):
    torch.manual_seed(0)
    entry = get_entry(name)
    options = FAST.get(name, {})
    # The 224-px ImageNet forms are checked on the meta device (shapes, no arithmetic);
    # tests/test_imagenet_models.py runs them.
    place = torch.device("meta") if entry.input_size > 64 else torch.device("cpu")
    with place:
        model = build_model(name, num_classes=10, **options)
        blocks = find_blocks(model, "auto")
        assert len(blocks) == entry.blocks, (
            f"{name}: {len(blocks)} blocks, registry says {entry.blocks}"
        )
        if name in ZOO:
            assert len(blocks) == ZOO[name][1]
        sample = torch.randn(2, 3, entry.input_size, entry.input_size)
        shapes = probe_shapes(model, blocks, sample)
        assert all(raw[0] == 2 for raw, _ in shapes)
        dims = expected_dims(name, options)
        if dims is not None:
            assert [d for _, d in shapes] == dims
        with torch.no_grad():
            assert model.eval()(sample).shape == (2, 10)


def test_resnet18_standard_width_block_dims():
    model = build_model("resnet18")
    shapes = probe_shapes(model, find_blocks(model), torch.randn(2, 3, 32, 32))
    assert [d for _, d in shapes] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [raw[2] for raw, _ in shapes] == [32, 32, 16, 16, 8, 8, 4, 4]  # CIFAR stem keeps 32


def test_swin_cifar_default_grid_and_layout():
    # patch 2 keeps a 16x16 token grid; outputs are N x H x W x C and pooled over H, W.
    model = build_model("swin_tiny", **_QUICK_INIT)
    blocks = find_blocks(model)
    assert {b.pool for b in blocks} == {"nhwc"}
    shapes = probe_shapes(model, blocks, torch.randn(2, 3, 32, 32))
    assert [raw for raw, _ in shapes[::2]] == [
        (2, 16, 16, 96),
        (2, 8, 8, 192),
        (2, 4, 4, 384),
        (2, 4, 4, 384),
        (2, 4, 4, 384),
        (2, 2, 2, 768),
    ]


def test_narrow_cpu_swin():
    model = build_model("swin_tiny", embed_dim=48, patch_size=4, window_size=4)
    shapes = probe_shapes(model, find_blocks(model), torch.randn(2, 3, 32, 32))
    assert shapes[0] == ((2, 8, 8, 48), 48)
    assert shapes[-1] == ((2, 1, 1, 384), 384)


def test_swin_at_224_uses_imagenet_patches_and_windows():
    model = build_model("swin_tiny", img_size=224, embed_dim=24, **_QUICK_INIT)
    assert model.patch_embed.patch_size == (4, 4)
    assert model.layers[0].blocks[0].window_size == (7, 7)
    shapes = probe_shapes(model, find_blocks(model), torch.randn(1, 3, 224, 224))
    assert shapes[0][0] == (1, 56, 56, 24)
    assert shapes[-1][0] == (1, 7, 7, 192)


def test_swin_deep_variants_have_the_papers_heads():
    model = build_model("swin_base_deep", **_NARROW_SWIN)
    stage3 = model.layers[2]
    assert len(stage3.blocks) == 30
    assert [layer.blocks[0].attn.num_heads for layer in model.layers] == [3, 6, 12, 24]


@pytest.mark.parametrize(
    ("options", "pool"),
    [({}, "cls"), ({"global_pool": "avg"}, "tokens"), ({"token_pool": "mean"}, "tokens"),
     ({"global_pool": "avg", "token_pool": "cls"}, "cls")],
)  # fmt: skip
def test_vit_pools_as_its_head_by_default_or_as_asked(options, pool):
    """The class token where the head reads it (timm's default global_pool="token"), the
    patch-token mean where it averages; token_pool overrides either."""
    torch.manual_seed(0)
    model = build_model("vit_small", embed_dim=96, **options, **_QUICK_INIT).eval()
    blocks = find_blocks(model)
    assert len(blocks) == 12 and {b.pool for b in blocks} == {pool}
    assert blocks[0].prefix_tokens == 1  # the class token is not a patch
    raw, pooled = {}, {}
    handle = blocks[3].module.register_forward_hook(lambda m, i, o: raw.update(x=o))
    with torch.no_grad(), Taps(blocks, sink=lambda i, x: pooled.__setitem__(i, x)):
        model(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert raw["x"].shape == (2, 65, 96)  # 8x8 patches of 4x4 pixels, plus the class token
    want = raw["x"][:, 1:].mean(1) if pool == "tokens" else raw["x"][:, 0]
    torch.testing.assert_close(pooled[3], want)


def test_vit_at_224_uses_16_pixel_patches():
    model = build_model("vit_base", img_size=224, embed_dim=96, num_heads=12, **_QUICK_INIT)
    shapes = probe_shapes(model, find_blocks(model), torch.randn(1, 3, 224, 224))
    assert shapes[0] == ((1, 197, 96), 96)


def test_vgg_blocks_are_its_conv_units_with_torchvision_names():
    model = build_model("vgg16")
    blocks = find_blocks(model)
    assert [b.name for b in blocks][:3] == ["features.2", "features.5", "features.9"]
    assert all(isinstance(b.module, torch.nn.ReLU) for b in blocks)
    assert model.classifier.in_features == 512


@pytest.mark.parametrize(
    ("name", "options", "needle"),
    [
        ("swin_tiny", {"img_size": 33}, "patch_size"),
        ("swin_tiny", {"img_size": 32, "patch_size": 16}, "token grid"),
        ("vit_small", {"token_pool": "max"}, "token_pool='max'"),
        ("vit_small", {"img_size": 30}, "img_size=30"),
        ("swin_tiny", {"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_options_are_refused_with_the_fix(name, options, needle):
    with pytest.raises(ValueError, match=needle):
        build_model(name, **options)
