"""The paper's models in their ImageNet form, for 224 x 224 inputs (1,000 classes).

Named apart from the CIFAR forms (`resnet50_in1k` vs `resnet50`):

- `resnet18_in1k` ... `resnet152_in1k`: torchvision's ResNet (7x7 stride-2 stem, 3x3
  max-pool), which mmpretrain's ResNet shares; blocks are the residual blocks
  (8/16/16/33/50), as for CIFAR.
- `swin_tiny_in1k`, `swin_small_in1k`, `swin_base_in1k`: timm's Swin, patch 4, window 7
  (Swin-T/S/B of the Swin paper); blocks are the 12/24/24 transformer blocks.
- `vgg13_in1k`, `vgg16_in1k`, `vgg19_in1k`: torchvision's VGG with batch norm (7x7
  adaptive pool, the 4096-wide classifier); blocks are the 10/13/16 conv-BN-ReLU units.
- `vit_small_in1k`, `vit_base_in1k`: timm's ViT, patch 16 (ViT-S/16 = DeiT-S, ViT-B/16);
  blocks are the 12 transformer blocks, each pooled as the classifier pools the last one
  (the class token for timm's default `global_pool="token"`; `token_pool` overrides).

Module names are torchvision's or timm's, so their state_dicts load as they are, and
mmpretrain checkpoints are renamed by `load_weights` (`model.checkpoint=FILE`). Nothing is
downloaded: every constructor builds random weights.
"""

from __future__ import annotations

import torchvision.models as tvm
from torch import nn

from nclayers.models.registry import register_model
from nclayers.models.swin import swin
from nclayers.models.vit import vit

_RESNETS = {18: (tvm.resnet18, 8), 34: (tvm.resnet34, 16), 50: (tvm.resnet50, 16),
            101: (tvm.resnet101, 33), 152: (tvm.resnet152, 50)}  # fmt: skip
_VGGS = {13: (tvm.vgg13_bn, 10), 16: (tvm.vgg16_bn, 13), 19: (tvm.vgg19_bn, 16)}
_SWINS = {"swin_tiny": 12, "swin_small": 24, "swin_base": 24}
_VITS = ("vit_small", "vit_base")
SIZE = 224


def vgg_units(model: nn.Module) -> list[str]:
    """The ReLU that closes each conv-BN-ReLU unit of a torchvision VGG, in order."""
    features = model.features
    return [
        f"features.{i}"
        for i, m in enumerate(features)
        if isinstance(m, nn.ReLU) and i > 0 and isinstance(features[i - 1], nn.BatchNorm2d)
    ]


def _register_resnet(depth: int) -> None:
    make, blocks = _RESNETS[depth]

    @register_model(f"resnet{depth}_in1k", input_size=SIZE, family="resnet", blocks=blocks)
    def build(num_classes: int = 1000, **options) -> nn.Module:
        return make(weights=None, num_classes=num_classes, **options)

    build.__name__ = f"resnet{depth}_in1k"
    build.__doc__ = f"torchvision ResNet{depth} (ImageNet stem): {blocks} residual blocks."


def _register_vgg(depth: int) -> None:
    make, units = _VGGS[depth]

    @register_model(f"vgg{depth}_in1k", input_size=SIZE, family="vgg", blocks=units)
    def build(num_classes: int = 1000, **options) -> nn.Module:
        model = make(weights=None, num_classes=num_classes, **options)
        model.nclayers_blocks = vgg_units(model)  # find_blocks(model, "auto") reads this
        return model

    build.__name__ = f"vgg{depth}_in1k"
    build.__doc__ = f"torchvision VGG{depth}-BN: {units} conv-BN-ReLU units, 4096-wide head."


def _register_swin(arch: str) -> None:
    @register_model(f"{arch}_in1k", input_size=SIZE, family="swin", blocks=_SWINS[arch])
    def build(num_classes: int = 1000, **options) -> nn.Module:
        options.setdefault("drop_path_rate", 0.0)  # inference and probes: no stochastic depth
        return swin(arch, num_classes=num_classes, img_size=SIZE, **options)

    build.__name__ = f"{arch}_in1k"
    build.__doc__ = f"timm {arch} at 224 px (patch 4, window 7): {_SWINS[arch]} blocks."


def _register_vit(arch: str) -> None:
    @register_model(f"{arch}_in1k", input_size=SIZE, family="vit", blocks=12)
    def build(num_classes: int = 1000, token_pool: str | None = None, **options) -> nn.Module:
        return vit(arch, num_classes, img_size=SIZE, token_pool=token_pool, **options)

    build.__name__ = f"{arch}_in1k"
    build.__doc__ = f"timm {arch}/16 at 224 px: 12 blocks, pooled as its head pools."


for _depth in _RESNETS:
    _register_resnet(_depth)
for _depth in _VGGS:
    _register_vgg(_depth)
for _arch in _SWINS:
    _register_swin(_arch)
for _arch in _VITS:
    _register_vit(_arch)

__all__ = ["vgg_units"]
