"""Entry points a researcher might bring (`model.name=custom_models:NAME`): small image
models whose forward order, shared blocks, outputs and heads are not the paper's.

Imported by tests (pytest puts tests/ on the path); each function builds its model for
3 x 8 x 8 and larger inputs.
"""

from __future__ import annotations

import torch
from torch import nn


class Unit(nn.Module):
    """A shape-keeping block: conv, ReLU, added to its input."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


class Stack(nn.Module):
    """A stem, `blocks` run in the order `program` gives (an index may repeat: the block
    is shared, called again with its own output), then a linear head."""

    def __init__(self, num_classes: int, program: list[int], blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList(Unit() for _ in range(blocks))
        self.program = program
        self.fc = nn.Linear(4, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in self.program:
            x = self.blocks[i](x)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def reversed_blocks(num_classes: int = 10) -> nn.Module:
    """The forward runs blocks.2, blocks.1, blocks.0 (registered 0, 1, 2)."""
    return Stack(num_classes, [2, 1, 0])


def shared_block(num_classes: int = 10) -> nn.Module:
    """blocks.0 runs twice per forward (weight tying), then blocks.1."""
    return Stack(num_classes, [0, 0, 1], blocks=2)


class DictOutput(Stack):
    """A forward that returns a mapping holding its logits."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {"logits": self.fc(h), "features": h}


def dict_logits(num_classes: int = 10) -> nn.Module:
    return DictOutput(num_classes, [0, 1], blocks=2)


def no_num_classes() -> nn.Module:
    """An entry point without a num_classes parameter: its head has 10 outputs."""
    return Stack(10, [0, 1], blocks=2)


def five_outputs() -> nn.Module:
    """An entry point without num_classes whose head has 5 outputs."""
    return Stack(5, [0, 1], blocks=2)


def frozen(num_classes: int = 10) -> nn.Module:
    """A model with no trainable parameter (everything requires_grad=False)."""
    model = Stack(num_classes, [0, 1], blocks=2)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
