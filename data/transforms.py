"""Training transforms: resize, crop, flip and conversion to a [-1, 1] CHW array.

The geometry matches the reference trainer (torchvision ``Resize(resolution,
LANCZOS)`` then ``RandomCrop``/``CenterCrop(resolution)`` then an optional
horizontal flip, then ``ToTensor`` and ``Normalize([0.5], [0.5])``), but it
is computed in one step: only the source region that ends up in the crop is
resampled (``Image.resize(..., box=...)``), which gives the pixels of
resizing the whole image and cropping afterwards (up to +-2/255 from PIL's
intermediate rounding) at a fraction of the cost.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

_TWO_OVER_255 = np.float32(2.0 / 255.0)


@dataclass(frozen=True)
class TransformConfig:
    """Options of the training transforms (the trainer's flags of the same names)."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    min_image_size: int = 0


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``resolution`` (torchvision rounding: the longer side is floored)."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def crop_origin(
    width: int, height: int, resolution: int, center_crop: bool, rng: random.Random
) -> tuple[int, int]:
    """``(left, top)`` of the square crop in the resized image of size ``width`` x ``height``.

    Center crop rounds like torchvision's ``CenterCrop``; the random crop draws
    ``top`` then ``left`` uniformly (inclusive bounds) from ``rng``.
    """
    if center_crop:
        return int(round((width - resolution) / 2.0)), int(round((height - resolution) / 2.0))
    top = rng.randint(0, height - resolution)
    left = rng.randint(0, width - resolution)
    return left, top


def transform_image(
    image: Image.Image, config: TransformConfig, rng: random.Random, out: np.ndarray | None = None
) -> np.ndarray:
    """Resize, crop and maybe flip an RGB image; return float32 ``[3, R, R]`` in [-1, 1].

    ``rng`` supplies the random crop position and then the flip decision (p=0.5),
    so the result is a pure function of the image, the config and the rng state.
    ``out`` (e.g. one row of a batch array) receives the result, saving a copy.
    """
    resolution = config.resolution
    width, height = image.size
    new_width, new_height = resized_size(width, height, resolution)
    left, top = crop_origin(new_width, new_height, resolution, config.center_crop, rng)
    scale_x, scale_y = width / new_width, height / new_height
    box = (left * scale_x, top * scale_y, (left + resolution) * scale_x, (top + resolution) * scale_y)
    pixels = np.asarray(image.resize((resolution, resolution), Image.LANCZOS, box=box))
    if config.random_flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return to_chw_float(pixels, out)


def to_chw_float(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]`` equal to ``(x / 255 - 0.5) / 0.5`` (to 1e-7)."""
    if out is None:
        out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
    np.multiply(pixels.transpose(2, 0, 1), _TWO_OVER_255, out=out)
    out -= np.float32(1.0)
    return out
