"""The geometry of :class:`~fastfeed.vision.Decode`: the region of an image that becomes the
output (torchvision's ``Resize`` + ``CenterCrop`` and ``RandomResizedCrop``), and the flip coin.
Every backend crops from these, so they crop a sample alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Crop", "crop_box", "flip_draw", "resize", "resized_crop"]


@dataclass(frozen=True)
class Crop:
    """A crop of an image (rows ``top:top+height``, columns ``left:left+width``), then a
    horizontal flip if ``flip``."""

    top: float
    left: float
    height: float
    width: float
    flip: bool = False


def crop_box(
    height: int,
    width: int,
    out: tuple[int, int],
    crop: str,
    rng: np.random.Generator | None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Crop:
    """The region of an ``height`` x ``width`` image that becomes the output ``out`` (H, W), as
    torchvision's ``Resize``+``CenterCrop`` (``"center"``), ``RandomResizedCrop``
    (``"random"``, drawing from ``rng``) or a plain resize (``"none"``) choose it."""
    if crop == "none":
        return Crop(0, 0, height, width)
    if crop == "center":
        # torchvision's Resize (the shorter side to the output's, the longer truncated to an
        # int) then CenterCrop (offsets rounded to whole pixels of the resized image), as the
        # region of the original image that becomes the output.
        s = max(out[0] / height, out[1] / width)
        rh, rw = max(out[0], int(height * s)), max(out[1], int(width * s))
        top, left = round((rh - out[0]) / 2.0), round((rw - out[1]) / 2.0)
        sy, sx = rh / height, rw / width
        h, w = min(height, out[0] / sy), min(width, out[1] / sx)
        return Crop(min(top / sy, height - h), min(left / sx, width - w), h, w)
    assert rng is not None
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return Crop(int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return Crop((height - h) // 2, (width - w) // 2, h, w)


def flip_draw(rng: np.random.Generator | None) -> bool:
    """The flip coin of a sample, drawn from its generator after its crop's draws."""
    return bool(rng is not None and rng.random() < 0.5)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` (uint8 ``[C, H, W]``, any device) resized to ``size``: bilinear, antialiased when
    shrinking, as torchvision's ``Resize`` (on the CPU torch's uint8 kernel for channels-last
    images, several times faster than Pillow's; elsewhere in float, rounded back)."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
    if x.device.type == "cpu":
        batch = x[None].contiguous(memory_format=torch.channels_last)
        return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    y = F.interpolate(x[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resized_crop(
    x: torch.Tensor,
    size: tuple[int, int],
    crop: str,
    rng: np.random.Generator | None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """``x`` (uint8 ``[C, H, W]``) cropped and resized to ``size`` as torchvision's transforms do
    it: ``"center"`` resizes the whole image (shorter side to the output's) then cuts the center
    at whole pixels; ``"random"`` cuts :func:`crop_box`'s region then resizes it; ``"none"``
    resizes the whole image."""
    _, height, width = x.shape
    if crop == "center":
        s = max(size[0] / height, size[1] / width)
        rh, rw = max(size[0], int(height * s)), max(size[1], int(width * s))
        top, left = round((rh - size[0]) / 2.0), round((rw - size[1]) / 2.0)
        return resize(x, (rh, rw))[:, top : top + size[0], left : left + size[1]]
    if crop == "random":
        box = crop_box(height, width, size, "random", rng, scale, ratio)
        top, left, h, w = int(box.top), int(box.left), int(box.height), int(box.width)
        x = x[:, top : top + h, left : left + w]
    return resize(x, size)
