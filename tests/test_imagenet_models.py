"""The 224-px ImageNet forms: registered apart from the CIFAR forms, torchvision's and
timm's architectures, their blocks found as for CIFAR, pooled as their heads pool."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm

from nclayers.models import build_model, find_blocks, get_entry, list_models
from nclayers.taps import Taps, probe_shapes


def stages(widths: list[int], counts: list[int]) -> list[int]:
    return [w for w, n in zip(widths, counts, strict=True) for _ in range(n)]


R18, R50 = [64, 128, 256, 512], [256, 512, 1024, 2048]
SWIN_T, SWIN_B = [96, 192, 384, 768], [128, 256, 512, 1024]
# name: (family, blocks, block class, pooling, pooled width of every block)
IN1K = {
    "resnet18_in1k": ("resnet", 8, "BasicBlock", "nchw", stages(R18, [2, 2, 2, 2])),
    "resnet34_in1k": ("resnet", 16, "BasicBlock", "nchw", stages(R18, [3, 4, 6, 3])),
    "resnet50_in1k": ("resnet", 16, "Bottleneck", "nchw", stages(R50, [3, 4, 6, 3])),
    "resnet101_in1k": ("resnet", 33, "Bottleneck", "nchw", stages(R50, [3, 4, 23, 3])),
    "resnet152_in1k": ("resnet", 50, "Bottleneck", "nchw", stages(R50, [3, 8, 36, 3])),
    "swin_tiny_in1k": ("swin", 12, "SwinTransformerBlock", "nhwc", stages(SWIN_T, [2, 2, 6, 2])),
    "swin_small_in1k": ("swin", 24, "SwinTransformerBlock", "nhwc", stages(SWIN_T, [2, 2, 18, 2])),
    "swin_base_in1k": ("swin", 24, "SwinTransformerBlock", "nhwc", stages(SWIN_B, [2, 2, 18, 2])),
    "vgg13_in1k": ("vgg", 10, "ReLU", "nchw", stages([64, 128, 256, 512], [2, 2, 2, 4])),
    "vgg16_in1k": ("vgg", 13, "ReLU", "nchw", stages([64, 128, 256, 512], [2, 2, 3, 6])),
    "vgg19_in1k": ("vgg", 16, "ReLU", "nchw", stages([64, 128, 256, 512], [2, 2, 4, 8])),
    "vit_small_in1k": ("vit", 12, "Block", "cls", [384] * 12),
    "vit_base_in1k": ("vit", 12, "Block", "cls", [768] * 12),
}


def test_the_imagenet_forms_are_registered_at_224():
    assert set(list_models("*_in1k")) == set(IN1K)
    for name, (family, blocks, *_) in IN1K.items():
        entry = get_entry(name)
        assert (entry.family, entry.blocks, entry.input_size) == (family, blocks, 224), name


@pytest.mark.parametrize("name", list(IN1K))
def test_blocks_classes_pooling_and_widths(name):
    _, count, cls, pool, dims = IN1K[name]
    with torch.device("meta"):  # shapes only: no weights initialised, no arithmetic
        model = build_model(name, 1000)
        blocks = find_blocks(model)
        shapes = probe_shapes(model, blocks, torch.empty(1, 3, 224, 224))
        assert model(torch.empty(1, 3, 224, 224)).shape == (1, 1000)
    assert len(blocks) == count
    assert {type(b.module).__name__ for b in blocks} == {cls}
    assert {b.pool for b in blocks} == {pool}
    assert [d for _, d in shapes] == dims


def test_resnet_in1k_is_torchvisions_architecture():
    with torch.device("meta"):
        ours, theirs = build_model("resnet50_in1k", 1000), tvm.resnet50(weights=None)
    assert type(ours) is type(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert ours.conv1.kernel_size == (7, 7) and isinstance(ours.maxpool, torch.nn.MaxPool2d)


def test_vgg_in1k_blocks_are_its_units_before_the_classifier():
    with torch.device("meta"):
        model = build_model("vgg16_in1k", num_classes=7)
    names = [b.name for b in find_blocks(model)]
    assert names[:3] == ["features.2", "features.5", "features.9"]
    assert model.classifier[6].out_features == 7 and model.classifier[0].in_features == 25088


def test_vit_in1k_last_block_pools_what_the_head_reads():
    torch.manual_seed(0)
    model = build_model("vit_small_in1k", num_classes=5, embed_dim=48, depth=2,
                        weight_init="reset").eval()  # fmt: skip
    blocks = find_blocks(model)
    pooled = {}
    with torch.no_grad(), Taps(blocks, lambda i, x: pooled.__setitem__(i, x)):
        logits = model(torch.randn(2, 3, 224, 224))
    # timm's head: final norm, then the class token (global_pool="token").
    torch.testing.assert_close(model.head(model.norm(pooled[1][:, None])[:, 0]), logits)
    mean = build_model("vit_small_in1k", embed_dim=48, depth=2, token_pool="mean")
    assert {b.pool for b in find_blocks(mean)} == {"tokens"}


def test_resnet18_in1k_runs_at_224_on_the_cpu():
    torch.manual_seed(0)
    model = build_model("resnet18_in1k", num_classes=3).eval()
    shapes = probe_shapes(model, find_blocks(model), torch.randn(1, 3, 224, 224))
    assert shapes[0][0] == (1, 64, 56, 56) and shapes[-1][0] == (1, 512, 7, 7)


@pytest.mark.parametrize(("name", "widths"), [
    ("resnet18_in1k", stages([16, 32, 64, 128], [2, 2, 2, 2])),
    ("resnet50_in1k", stages([64, 128, 256, 512], [3, 4, 6, 3])),
    ("vgg13_in1k", stages([16, 32, 64, 128], [2, 2, 2, 4])),
])  # fmt: skip
def test_narrow_forms_keep_the_imagenet_architecture_a_quarter_as_wide(name, widths):
    """model.width=16 (the -cpu-mini sweeps): the 7x7 stem, max-pool, depths and module
    names of the ImageNet form, every stage a quarter as wide, at any input size."""
    with torch.device("meta"):
        narrow, full = build_model(name, 10, width=16), build_model(name, 10)
        blocks = find_blocks(narrow)
        shapes = probe_shapes(narrow, blocks, torch.empty(1, 3, 64, 64))
        assert narrow(torch.empty(2, 3, 64, 64)).shape == (2, 10)
    assert [b.name for b in blocks] == [b.name for b in find_blocks(full)]
    assert [d for _, d in shapes] == widths
    assert set(narrow.state_dict()) == set(full.state_dict())
    stem = narrow.conv1 if name.startswith("resnet") else narrow.features[0]
    assert stem.out_channels == 16 and stem.kernel_size == (7 if "resnet" in name else 3,) * 2


def test_width_64_or_none_is_the_standard_network_and_bad_widths_are_refused():
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in tvm.resnet50(weights=None).state_dict().items()}
        for width in (None, 64):
            model = build_model("resnet50_in1k", 1000, width=width)
            assert type(model) is tvm.ResNet
            assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        with pytest.raises(ValueError, match=r"model.width=0 for vgg16_in1k: an integer 1..64"):
            build_model("vgg16_in1k", 10, width=0)


def test_transformer_forms_take_a_smaller_image_size():
    with torch.device("meta"):
        swin = build_model("swin_tiny_in1k", 10, img_size=64, embed_dim=24, patch_size=4,
                           window_size=4)  # fmt: skip
        vit = build_model("vit_small_in1k", 10, img_size=64, embed_dim=96, patch_size=8)
        for model, dim in ((swin, 24), (vit, 96)):
            blocks = find_blocks(model)
            assert len(blocks) == 12
            assert probe_shapes(model, blocks, torch.empty(1, 3, 64, 64))[0][1] == dim
            assert model(torch.empty(1, 3, 64, 64)).shape == (1, 10)
