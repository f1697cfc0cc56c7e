"""VGG13/16/19 with batch norm, adapted to 32x32 inputs.

The convolutional trunk is torchvision's (`make_layers(cfgs[...], batch_norm=True)`), so
its modules keep torchvision's `features.N` names and the `features.*` tensors of a
torchvision `vgg16_bn` state_dict load (`load_weights(..., strict=False)`). After five
max-pools a 32x32 image is a 512 x 1 x 1 map; instead of torchvision's 7x7 pool and
4096-wide classifier, the 512-d average-pooled feature feeds one linear classifier (any
input side works, the pool is adaptive).

Blocks are the conv-BN-ReLU units (10, 13 and 16 of them), tapped at their ReLU and
listed in `model.nclayers_blocks` for `find_blocks(model, "auto")`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from nclayers.models.registry import register_model

# torchvision's configuration letter per depth.
_CFG = {13: "B", 16: "D", 19: "E"}


class CifarVGG(nn.Module):
    def __init__(self, cfg: str, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = make_layers(cfgs[cfg], batch_norm=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = [v for v in cfgs[cfg] if v != "M"][-1]
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.num_features, num_classes)
        # The ReLU closing each conv-BN-ReLU unit, in forward order.
        self.nclayers_blocks = [
            f"features.{i}"
            for i, m in enumerate(self.features)
            if isinstance(m, nn.ReLU) and isinstance(self.features[i - 1], nn.BatchNorm2d)
        ]
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.forward_features(x)))


def _register(depth: int) -> None:
    cfg = _CFG[depth]
    units = sum(v != "M" for v in cfgs[cfg])

    @register_model(f"vgg{depth}", input_size=32, family="vgg", blocks=units)
    def build(num_classes: int = 10, dropout: float = 0.0) -> CifarVGG:
        return CifarVGG(cfg, num_classes=num_classes, dropout=dropout)

    build.__name__ = f"vgg{depth}"
    build.__doc__ = f"VGG{depth}-BN for 32x32 inputs: {units} conv-BN-ReLU units, linear head."


for _depth in _CFG:
    _register(_depth)
