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

CPU-sized forms for the `-cpu-mini` sweeps, which train these models themselves: the
ResNets and VGGs take `width` (`model.width`; the stem and every stage's channels scaled
by width / 64, VGG's 4096-wide classifier to 64 x width, so `width=16` is a sixteenth of
the arithmetic), the Swins and ViTs `img_size` (with timm's `embed_dim`, `patch_size`,
`window_size`, ... in `model.options`). The defaults are the standard architectures that
the pretrained weights fit.
"""

from __future__ import annotations

import torchvision.models as tvm
from torch import nn
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers as vgg_layers

from nclayers.errors import NCLayersError
from nclayers.models.registry import register_model
from nclayers.models.swin import swin
from nclayers.models.vit import vit

_RESNETS = {18: (tvm.resnet18, 8), 34: (tvm.resnet34, 16), 50: (tvm.resnet50, 16),
            101: (tvm.resnet101, 33), 152: (tvm.resnet152, 50)}  # fmt: skip
_VGGS = {13: (tvm.vgg13_bn, 10), 16: (tvm.vgg16_bn, 13), 19: (tvm.vgg19_bn, 16)}
_VGG_CFG = {13: "B", 16: "D", 19: "E"}  # torchvision's layer lists
_RESNET_LAYERS = {18: (tvm.resnet.BasicBlock, [2, 2, 2, 2]),
                  34: (tvm.resnet.BasicBlock, [3, 4, 6, 3]),
                  50: (tvm.resnet.Bottleneck, [3, 4, 6, 3]),
                  101: (tvm.resnet.Bottleneck, [3, 4, 23, 3]),
                  152: (tvm.resnet.Bottleneck, [3, 8, 36, 3])}  # fmt: skip
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


def _check_width(name: str, width) -> int:
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 64:
        raise NCLayersError(
            f"model.width={width!r} for {name}: an integer 1..64 scales every stage's channels "
            "by width / 64 (64 or null: the standard network, which pretrained weights fit)"
        )
    return width


class NarrowResNet(tvm.ResNet):
    """torchvision's ResNet with the stem and every stage `width / 64` as wide: the same
    module names, depths, 7x7 stem and max-pool (the ImageNet form), less arithmetic."""

    def __init__(self, block, layers: list[int], width: int, num_classes: int, **options):
        self.width = width  # read by _make_layer during the base class's construction
        super().__init__(block, layers, num_classes=num_classes, **options)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = self._norm_layer(width)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False):
        if planes == 64:  # layer1: its input is the stem's output, narrowed too
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def narrow_vgg(depth: int, width: int, num_classes: int, **options) -> nn.Module:
    """torchvision's VGG-BN with every conv `width / 64` as wide and the classifier's
    hidden layers 64 x width (4096 at width 64); module names as torchvision's."""
    cfg = [v if v == "M" else v * width // 64 for v in vgg_cfgs[_VGG_CFG[depth]]]
    model = tvm.VGG(vgg_layers(cfg, batch_norm=True), num_classes=num_classes, **options)
    hidden, dropout = 64 * width, model.classifier[2].p
    model.classifier = nn.Sequential(
        nn.Linear(8 * width * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip
    for m in model.classifier:  # torchvision's initialisation of its classifier
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return model


def _register_resnet(depth: int) -> None:
    make, blocks = _RESNETS[depth]

    @register_model(f"resnet{depth}_in1k", input_size=SIZE, family="resnet", blocks=blocks)
    def build(num_classes: int = 1000, width: int | None = None, **options) -> nn.Module:
        if width is None or _check_width(f"resnet{depth}_in1k", width) == 64:
            return make(weights=None, num_classes=num_classes, **options)
        block, layers = _RESNET_LAYERS[depth]
        return NarrowResNet(block, layers, width, num_classes, **options)

    build.__name__ = f"resnet{depth}_in1k"
    build.__doc__ = f"torchvision ResNet{depth} (ImageNet stem): {blocks} residual blocks."


def _register_vgg(depth: int) -> None:
    make, units = _VGGS[depth]

    @register_model(f"vgg{depth}_in1k", input_size=SIZE, family="vgg", blocks=units)
    def build(num_classes: int = 1000, width: int | None = None, **options) -> nn.Module:
        if width is None or _check_width(f"vgg{depth}_in1k", width) == 64:
            model = make(weights=None, num_classes=num_classes, **options)
        else:
            model = narrow_vgg(depth, width, num_classes, **options)
        model.nclayers_blocks = vgg_units(model)  # find_blocks(model, "auto") reads this
        return model

    build.__name__ = f"vgg{depth}_in1k"
    build.__doc__ = f"torchvision VGG{depth}-BN: {units} conv-BN-ReLU units, 4096-wide head."


def _register_swin(arch: str) -> None:
    @register_model(f"{arch}_in1k", input_size=SIZE, family="swin", blocks=_SWINS[arch])
    def build(num_classes: int = 1000, img_size: int = SIZE, **options) -> nn.Module:
        options.setdefault("drop_path_rate", 0.0)  # inference and probes: no stochastic depth
        return swin(arch, num_classes=num_classes, img_size=img_size, **options)

    build.__name__ = f"{arch}_in1k"
    build.__doc__ = f"timm {arch} at 224 px (patch 4, window 7): {_SWINS[arch]} blocks."


def _register_vit(arch: str) -> None:
    @register_model(f"{arch}_in1k", input_size=SIZE, family="vit", blocks=12)
    def build(
        num_classes: int = 1000, img_size: int = SIZE, token_pool: str | None = None, **options
    ) -> nn.Module:
        return vit(arch, num_classes, img_size=img_size, token_pool=token_pool, **options)

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

__all__ = ["NarrowResNet", "narrow_vgg", "vgg_units"]
