"""Every ImageNet form loads every weight layout it has and computes the reference's logits.

Each reference is the library's own module with random weights (torchvision's ResNet and
VGG-BN, timm's ResNet, Swin and ViT; narrow widths where the architecture allows), its
state_dict saved as that library saves it, or renamed to mmpretrain's key names
(mmpretrain is not installed here: the names are those of its ResNet, VGG, SwinTransformer
and VisionTransformer backbones and its LinearClsHead / VisionTransformerClsHead, written
out below). Loaded into the registry's `*_in1k` model, the logits must equal the
reference's on the same input.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision.models as tvm
from torch import nn

from nclayers.models import build_model, load_weights
from test_weights import mm_checkpoint, mm_resnet_key, swin_mm_state

pytestmark = pytest.mark.usefixtures("one_thread")

K = 10
_RESET = {"weight_init": "reset"}  # timm: PyTorch's default init, faster than timm's own


def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Random batch-norm statistics and affine parameters (a fresh module has ones and
    zeros there, which would hide a norm loaded into the wrong place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or t.ndim != 1:
                continue
            if name.endswith("running_var"):
                t.mul_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return model.eval()


def scramble(model: nn.Module) -> nn.Module:
    """Overwrite every weight, so that what a load leaves out shows in the logits."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    return model.eval()


def check(reference: nn.Module, ours: nn.Module, path: Path, side: int) -> None:
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    load_weights(scramble(ours), path)
    with torch.no_grad():
        want, got = reference.eval()(x), ours.eval()(x)
    assert want.shape == (2, K)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- ResNet
@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_resnet_in1k_loads_torchvision_mmpretrain_and_timm(depth, tmp_path):
    torch.manual_seed(depth)
    reference = perturb(getattr(tvm, f"resnet{depth}")(weights=None, num_classes=K), 0)
    ours = build_model(f"resnet{depth}_in1k", num_classes=K)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    check(reference, ours, tmp_path / "tv.pth", 64)
    mm = mm_checkpoint(reference.state_dict(), mm_resnet_key)
    assert "head.fc.weight" in mm["state_dict"] and "backbone.bn1.weight" in mm["state_dict"]
    torch.save(mm, tmp_path / "mm.pth")
    check(reference, ours, tmp_path / "mm.pth", 64)
    if depth in (101, 152):
        return  # timm's deep ResNets repeat the Bottleneck of ResNet50: saves 10 s of I/O
    timm_ref = perturb(timm.create_model(f"resnet{depth}", num_classes=K), 1)
    torch.save(timm_ref.state_dict(), tmp_path / "timm.pth")
    check(timm_ref, ours, tmp_path / "timm.pth", 64)


# ----------------------------------------------------------------------------- VGG
def narrow_classifier(model: nn.Module) -> nn.Module:
    """torchvision's VGG head, 4096 wide, at width 16: the same modules and key names
    (classifier.0/3/6), 100 M fewer weights."""
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(),
        nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, K),
    )  # fmt: skip
    return model


def built_small(make) -> nn.Module:
    """A VGG built on the meta device (no 100 M-weight init), its head narrowed, then
    given real random weights."""
    with torch.device("meta"):
        model = narrow_classifier(make())
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.zero_()
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.ndim == 1:
                t.copy_(0.1 * torch.randn(t.shape, generator=gen) + (name.endswith("weight")))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    return model.eval()


def mm_vgg_state(model: nn.Module) -> dict:
    """torchvision VGG-BN -> mmpretrain's VGG: features.J is the J-th ConvModule (conv, bn)
    or MaxPool2d of the backbone; the classifier sits in the backbone; ClsHead has none."""
    unit, rename = 0, {}
    for i, m in enumerate(model.features):
        if isinstance(m, nn.Conv2d):
            rename[f"features.{i}."] = f"backbone.features.{unit}.conv."
        elif isinstance(m, nn.BatchNorm2d):
            rename[f"features.{i}."] = f"backbone.features.{unit}.bn."
        elif isinstance(m, (nn.ReLU, nn.MaxPool2d)):
            unit += 1  # a ReLU closes a ConvModule; a pool is a unit of its own

    def key(k: str, v):
        prefix = re.match(r"^features\.\d+\.", k)
        if prefix:
            return rename[prefix[0]] + k[prefix.end() :], v
        return "backbone." + k, v

    return mm_checkpoint(model.state_dict(), key)


@pytest.mark.parametrize("depth", [13, 16, 19])
def test_vgg_in1k_loads_torchvision_and_mmpretrain(depth, tmp_path):
    reference = built_small(lambda: getattr(tvm, f"vgg{depth}_bn")(weights=None))
    with torch.device("meta"):
        ours = narrow_classifier(build_model(f"vgg{depth}_in1k", num_classes=K))
    ours = ours.to_empty(device="cpu")
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    check(reference, ours, tmp_path / "tv.pth", 32)
    mm = mm_vgg_state(reference)
    assert "backbone.features.2.conv.weight" not in mm["state_dict"]  # unit 2: a pool
    assert "backbone.features.3.bn.running_var" in mm["state_dict"]
    assert "backbone.classifier.6.weight" in mm["state_dict"]
    torch.save(mm, tmp_path / "mm.pth")
    check(reference, ours, tmp_path / "mm.pth", 32)


# ----------------------------------------------------------------------------- Swin
SWINS = {"swin_tiny": ("swin_tiny_patch4_window7_224", 24),
         "swin_small": ("swin_small_patch4_window7_224", 24),
         "swin_base": ("swin_base_patch4_window7_224", 32)}  # fmt: skip


@pytest.mark.parametrize("arch", list(SWINS))
def test_swin_in1k_loads_timm_and_mmpretrain(arch, tmp_path):
    timm_name, embed = SWINS[arch]
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, num_classes=K, embed_dim=embed, **_RESET)
    perturb(reference, 0)
    with torch.no_grad():  # non-trivial merge norms, so a channel-order slip would show
        for layer in reference.layers[1:]:
            layer.downsample.norm.weight.normal_()
    ours = build_model(f"{arch}_in1k", num_classes=K, embed_dim=embed, **_RESET)
    assert ours.patch_embed.patch_size == (4, 4)
    assert ours.layers[0].blocks[0].window_size == (7, 7)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    check(reference, ours, tmp_path / "timm.pth", 224)
    torch.save(swin_mm_state(reference), tmp_path / "mm.pth")
    check(reference, ours, tmp_path / "mm.pth", 224)


# ----------------------------------------------------------------------------- ViT
_VIT_TO_MM = [
    (r"^patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"backbone.layers.\1.ln1."),
    (r"^blocks\.(\d+)\.norm2\.", r"backbone.layers.\1.ln2."),
    (r"^blocks\.(\d+)\.attn\.", r"backbone.layers.\1.attn."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"backbone.layers.\1.ffn.layers.0.0."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"backbone.layers.\1.ffn.layers.1."),
    (r"^norm\.", "backbone.ln1."),
    (r"^head\.", "head.layers.head."),
    (r"^(cls_token|pos_embed)$", r"backbone.\1"),
]


def mm_vit_key(key: str, value):
    """timm ViT -> mmpretrain VisionTransformer + VisionTransformerClsHead."""
    for pattern, repl in _VIT_TO_MM:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key), value
    raise AssertionError(f"no mmpretrain name for {key}")


VITS = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


@pytest.mark.parametrize("arch", list(VITS))
def test_vit_in1k_loads_timm_and_mmpretrain(arch, tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model(VITS[arch], num_classes=K, embed_dim=48, **_RESET)
    perturb(reference, 0)
    with torch.no_grad():
        reference.cls_token.normal_()
        reference.pos_embed.normal_()
    ours = build_model(f"{arch}_in1k", num_classes=K, embed_dim=48, **_RESET)
    assert ours.patch_embed.patch_size == (16, 16)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    check(reference, ours, tmp_path / "timm.pth", 224)
    mm = mm_checkpoint(reference.state_dict(), mm_vit_key)
    assert "backbone.layers.11.ffn.layers.0.0.weight" in mm["state_dict"]
    torch.save(mm, tmp_path / "mm.pth")
    check(reference, ours, tmp_path / "mm.pth", 224)


# ----------------------------------------------------------------------------- no file
def test_a_missing_file_says_where_weights_come_from(tmp_path):
    with torch.device("meta"):
        model = build_model("resnet50_in1k")
    with pytest.raises(ValueError) as info:
        load_weights(model, tmp_path / "resnet50_8xb32_in1k.pth")
    msg = str(info.value)
    assert "model.checkpoint=FILE" in msg and "downloads nothing" in msg
    assert all(source in msg for source in ("mmpretrain", "torchvision", "timm"))
