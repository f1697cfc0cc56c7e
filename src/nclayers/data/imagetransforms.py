"""Geometry of the ImageNet transforms, per sample, on CPU or GPU tensors.

Every decoded image gets a `CropPlan`: a box of the decoded image, the size it is resized
to, the final `size` x `size` crop of the resized box, and a horizontal flip. Plans are
plain numbers computed from the image size alone (and, for training, a per-sample random
generator), so a worker process can plan an image it never decodes (the GPU path decodes
on the device) and a sample gets the same augmentation whichever worker, rank or batch
handles it.

The recipes are mmpretrain's (the paper's pretrained weights and probes come from it):

- evaluation (`eval_plan`): `ResizeEdge(scale=256, edge='short')` then `CenterCrop(224)`:
  the short side becomes exactly `resize`, the long one `int(resize * long / short)`
  (floor, as mmpretrain and torchvision compute it), then the central square, its offset
  `round((side - size) / 2)`;
- probe training (`train_plan`): `RandomResizedCrop(scale=224)` then `RandomFlip(0.5)`:
  area fraction uniform in [0.08, 1], aspect ratio log-uniform in [3/4, 4/3], sides
  `round(sqrt(area * ratio))` and `round(sqrt(area / ratio))`, offsets uniform; after 10
  failed draws the central crop of the clamped aspect ratio.

Interpolation: bilinear with antialiasing. mmpretrain's linear-probe configs (the
MoCo v3 / MAE benchmarks, `imagenet_bs32_pil_resize.py`) resize with
`backend='pillow'` and the default `interpolation='bilinear'`, and Pillow's bilinear
filter antialiases when it shrinks. torch's `F.interpolate(..., mode="bilinear",
antialias=True)` computes the same filter (torchvision's tensor transforms use it to
match Pillow; results differ from Pillow by at most one grey level). On the CPU it runs
on uint8 images directly (its fast path); on the GPU in float32, rounded back to whole
grey levels so both paths feed the model the same kind of values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# mmpretrain's RandomResizedCrop defaults (crop_ratio_range, aspect_ratio_range, attempts).
AREA_RANGE = (0.08, 1.0)
RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10


@dataclass(frozen=True)
class CropPlan:
    """Where one decoded H x W image ends up: the box (top, left, height, width) is cut
    out, resized to (out_h, out_w), and the `size` x `size` square at (crop_top,
    crop_left) of that is kept, mirrored left-right when `flip`."""

    top: int
    left: int
    height: int
    width: int
    out_h: int
    out_w: int
    crop_top: int
    crop_left: int
    flip: bool = False

    def as_tuple(self) -> tuple[int, ...]:
        return (self.top, self.left, self.height, self.width, self.out_h, self.out_w,
                self.crop_top, self.crop_left, int(self.flip))  # fmt: skip

    @classmethod
    def from_tuple(cls, values) -> CropPlan:
        *ints, flip = (int(v) for v in values)
        return cls(*ints, flip=bool(flip))


def eval_plan(height: int, width: int, size: int = 224, resize: int = 256) -> CropPlan:
    """Short side to `resize`, then the central `size` square (mmpretrain/torchvision)."""
    if height <= width:
        out_h, out_w = resize, int(resize * width / height)
    else:
        out_h, out_w = int(resize * height / width), resize
    top = round((out_h - size) / 2.0)
    left = round((out_w - size) / 2.0)
    return CropPlan(0, 0, height, width, out_h, out_w, top, left)


def train_plan(
    height: int, width: int, size: int, rng: np.random.Generator, flip: bool = True
) -> CropPlan:
    """mmpretrain's RandomResizedCrop box, resized to `size` x `size`, and a coin flip."""
    area = height * width
    log_ratio = (math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1]))
    box = None
    for _ in range(ATTEMPTS):
        target = rng.uniform(*AREA_RANGE) * area
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:  # the central crop, its aspect ratio clamped to the range
        in_ratio = width / height
        if in_ratio < RATIO_RANGE[0]:
            w, h = width, round(width / RATIO_RANGE[0])
        elif in_ratio > RATIO_RANGE[1]:
            w, h = round(height * RATIO_RANGE[1]), height
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    mirror = bool(flip and rng.random() < 0.5)
    return CropPlan(*box, size, size, 0, 0, flip=mirror)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch: a function of (seed, epoch,
    the sample's index in its split) only, so the worker count, the batch order and the
    rank never change what a sample gets."""
    return np.random.default_rng((int(seed), int(epoch), int(index)))


def apply_plan(image: torch.Tensor, plan: CropPlan, size: int) -> torch.Tensor:
    """Cut, resize, crop and flip one 3 x H x W uint8 image on its device.

    CPU: uint8 in, uint8 out (torch's uint8 antialiased bilinear kernel). Other devices:
    float32 out, rounded to whole grey levels in [0, 255].
    """
    x = image[:, plan.top : plan.top + plan.height, plan.left : plan.left + plan.width]
    resize = (plan.out_h, plan.out_w) != (plan.height, plan.width)
    if image.device.type == "cpu":
        if resize:
            x = F.interpolate(
                x[None], size=(plan.out_h, plan.out_w), mode="bilinear", antialias=True,
                align_corners=False,
            )[0]  # fmt: skip
    else:
        x = x.float()
        if resize:
            x = F.interpolate(
                x[None], size=(plan.out_h, plan.out_w), mode="bilinear", antialias=True,
                align_corners=False,
            )[0].round_().clamp_(0.0, 255.0)  # fmt: skip
    x = x[:, plan.crop_top : plan.crop_top + size, plan.crop_left : plan.crop_left + size]
    return x.flip(-1) if plan.flip else x


__all__ = ["CropPlan", "apply_plan", "eval_plan", "sample_rng", "train_plan"]
