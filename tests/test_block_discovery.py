"""`find_blocks(model, "auto")` on torchvision and timm models nclayers did not build.

No weights are loaded (weights=None, pretrained=False). The zoo below is built on the meta
device: blocks, their order and output shapes are all the test needs, and shape inference
there skips the seconds of weight initialisation and convolution a CPU would spend.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision.models as tvm

from nclayers.models import find_blocks
from nclayers.taps import probe_shapes

# (builder, input side, block count, block class, pooling, first pooled dims)
CASES = {
    "tv_resnet18": (lambda: tvm.resnet18(weights=None), 64, 8, "BasicBlock", "nchw", [64, 64]),
    "tv_resnet50": (lambda: tvm.resnet50(weights=None), 64, 16, "Bottleneck", "nchw", [256] * 3),
    "tv_vit_b_16": (
        lambda: tvm.vit_b_16(weights=None, image_size=64),
        64,
        12,
        "EncoderBlock",
        "cls",  # torchvision's ViT classifies its class token
        [768],
    ),
    "tv_swin_t": (lambda: tvm.swin_t(weights=None), 64, 12, "SwinTransformerBlock", "nhwc", [96]),
    "tv_convnext_tiny": (lambda: tvm.convnext_tiny(weights=None), 64, 18, "CNBlock", "nchw", [96]),
    "tv_vgg11_bn": (
        lambda: tvm.vgg11_bn(weights=None),
        64,
        8,
        "ReLU",
        "nchw",
        [64, 128, 256],
    ),
    "tv_efficientnet_b0": (
        lambda: tvm.efficientnet_b0(weights=None),
        64,
        16,
        "MBConv",
        "nchw",
        [16],
    ),
    "timm_resnet18": (
        lambda: timm.create_model("resnet18", pretrained=False),
        64,
        8,
        "BasicBlock",
        "nchw",
        [64, 64, 128],
    ),
    "timm_vit_tiny": (
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64),
        64,
        12,
        "Block",
        "cls",  # timm's global_pool="token": the head reads the class token
        [192],
    ),
    "timm_swin_tiny": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112),
        112,
        12,
        "SwinTransformerBlock",
        "nhwc",
        [96, 96, 192],
    ),
    "timm_convnext_atto": (
        lambda: timm.create_model("convnext_atto", pretrained=False),
        64,
        12,
        "ConvNeXtBlock",
        "nchw",
        [40, 40, 80],
    ),
    "timm_mixer": (
        lambda: timm.create_model("mixer_s16_224", pretrained=False, img_size=64),
        64,
        8,
        "MixerBlock",
        "tokens",
        [512],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_auto_finds_the_repeated_blocks(case):
    build, side, count, cls, pool, dims = CASES[case]
    with torch.device("meta"):
        model = build()
        blocks = find_blocks(model, "auto")
        shapes = probe_shapes(model, blocks, torch.empty(1, 3, side, side))
    assert len(blocks) == count
    assert {type(b.module).__name__ for b in blocks} == {cls}
    assert {b.pool for b in blocks} == {pool}
    assert [d for _, d in shapes[: len(dims)]] == dims


@pytest.mark.parametrize(
    "build",
    [lambda: tvm.resnet18(weights=None), lambda: timm.create_model("resnet18", pretrained=False)],
    ids=["torchvision", "timm"],
)
def test_auto_blocks_run_on_the_cpu(build):
    torch.manual_seed(0)
    model = build()
    shapes = probe_shapes(model, find_blocks(model), torch.randn(2, 3, 64, 64))
    assert shapes[0] == ((2, 64, 16, 16), 64)
    assert shapes[-1] == ((2, 512, 2, 2), 512)


def test_vit_blocks_skip_the_class_token():
    with torch.device("meta"):
        tv = find_blocks(tvm.vit_b_16(weights=None, image_size=32))
        tm = find_blocks(timm.create_model("vit_tiny_patch16_224", img_size=32))
    assert tv[0].prefix_tokens == 1 and tm[0].prefix_tokens == 1


@pytest.mark.parametrize(("global_pool", "pool"), [("token", "cls"), ("avg", "tokens")])
def test_vit_blocks_are_pooled_as_the_head_pools(global_pool, pool):
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, global_pool=global_pool)
        assert {b.pool for b in find_blocks(model)} == {pool}
        wrapped = torch.nn.Sequential(torch.nn.Identity(), model)  # a ViT inside a wrapper
        assert {b.pool for b in find_blocks(wrapped)} == {pool}
        assert {b.pool for b in find_blocks(model, pool="tokens")} == {"tokens"}  # override


def test_timm_blocks_of_the_same_name_as_torchvision_ones_are_found_in_order():
    # timm's ResNet blocks are also called BasicBlock/Bottleneck: names must be timm's.
    with torch.device("meta"):
        model = timm.create_model("resnet50", pretrained=False)
    names = [b.name for b in find_blocks(model)]
    assert names[:4] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert len(names) == 16


def test_plain_conv_net_units_exclude_the_classifier():
    with torch.device("meta"):
        names = [b.name for b in find_blocks(tvm.alexnet(weights=None))]
    assert names == ["features.1", "features.4", "features.7", "features.9", "features.11"]


def test_a_convolutional_block_named_Block_pools_as_a_map():
    class Block(torch.nn.Module):  # same class name as timm's ViT block, but NCHW output
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), Block(), Block())
    blocks = find_blocks(model)
    assert [b.pool for b in blocks] == ["nchw", "nchw"]
    assert [d for _, d in probe_shapes(model, blocks, torch.randn(1, 3, 8, 8))] == [4, 4]


def test_no_blocks_names_the_fix():
    with pytest.raises(ValueError, match="name the modules to tap"):
        find_blocks(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)))
