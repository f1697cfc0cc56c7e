"""Model registry (timm-style): `build_model(name, num_classes, **options)`.

Each registered constructor returns an `nn.Module` whose blocks `find_blocks` can list.
Entry points `package.module:function` build any other model.
"""

from __future__ import annotations

from nclayers.models.blocks import find_blocks
from nclayers.models.registry import (
    build_model,
    get_entry,
    list_models,
    load_entry_point,
    register_model,
)
from nclayers.models.weights import load_weights

# Importing the families registers their constructors.
from nclayers.models import resnet  # noqa: F401  isort: skip
from nclayers.models import swin  # noqa: F401  isort: skip
from nclayers.models import vit  # noqa: F401  isort: skip
from nclayers.models import vgg  # noqa: F401  isort: skip
from nclayers.models import imagenet  # noqa: F401  isort: skip

__all__ = [
    "build_model",
    "find_blocks",
    "get_entry",
    "list_models",
    "load_entry_point",
    "load_weights",
    "register_model",
]
