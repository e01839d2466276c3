"""Turning a :class:`~data.readers.RawSample` into an RGB image and a caption.

Every way a sample can be unusable ends in :class:`SkipSample` carrying one
reason from :mod:`data.skips`; the caller counts it and moves on.  Any
exception while decoding a caption or an image is a ``decode_error``: nothing
a sample holds can end a DataLoader worker.

* Caption: the ``txt`` member, else the ``caption`` string of the ``json``
  member (pixparse/cc3m-wds layout), stripped of surrounding whitespace.
* Image: the first of ``jpg``/``jpeg``/``png``/``webp``, decoded fully (so
  truncated bytes are detected here, not later), of any PIL mode, returned as
  RGB.  Transparent images are composited over white; 16-bit and 32-bit
  integer images are scaled from 0..65535 to 0..255; EXIF orientation is
  applied.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image, ImageOps

from .readers import RawSample
from .skips import DECODE_ERROR, EMPTY_FILE, MISSING_CAPTION, MISSING_IMAGE, TOO_LARGE, TOO_SMALL
from .sources import IMAGE_EXTENSIONS

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


class SkipSample(Exception):
    """The sample is unusable for ``reason`` (a :mod:`data.skips` constant)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_sample(
    raw: RawSample, *, min_image_size: int = 0, resolution: int | None = None
) -> tuple[Image.Image, str]:
    """Return ``(rgb_image, caption)`` of ``raw``, or raise :class:`SkipSample`.

    Args:
        raw: the undecoded sample.
        min_image_size: skip (``too_small``) images whose shorter side is smaller.
        resolution: the training resolution, if known; large JPEGs are then
            decoded at a reduced DCT scale whose shorter side stays >= it.
    """
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw.members), None)
    if image_ext is None:
        raise SkipSample(MISSING_IMAGE)
    image_bytes = raw.members[image_ext]
    if not image_bytes:
        raise SkipSample(EMPTY_FILE)
    try:
        caption = extract_caption(raw.members)
    except SkipSample:
        raise
    except Exception:  # anything a hostile caption triggers (e.g. RecursionError on deeply nested json)
        raise SkipSample(DECODE_ERROR) from None
    image = decode_image(image_bytes, min_image_size=min_image_size, resolution=resolution)
    return image, caption


def extract_caption(members: dict[str, bytes]) -> str:
    """The caption from ``txt``, else from the ``json`` ``caption`` field; raises :class:`SkipSample`."""
    found_empty = False
    text = members.get("txt")
    if text is not None:
        caption = text.decode("utf-8", errors="replace").strip()
        if caption:
            return caption
        found_empty = True
    document = members.get("json")
    if document is not None:
        if not document.strip():
            found_empty = True
        else:
            try:
                caption = json.loads(document).get("caption")
            except (ValueError, AttributeError):
                raise SkipSample(DECODE_ERROR) from None
            if isinstance(caption, str) and caption.strip():
                return caption.strip()
            found_empty = found_empty or isinstance(caption, str)
    raise SkipSample(EMPTY_FILE if found_empty else MISSING_CAPTION)


def decode_image(data: bytes, *, min_image_size: int = 0, resolution: int | None = None) -> Image.Image:
    """Decode image bytes to a loaded RGB image, or raise :class:`SkipSample`.

    Raises ``too_large`` above PIL's decompression-bomb limit, ``decode_error``
    for anything PIL cannot decode, else ``too_small`` if the shorter side is
    below ``min_image_size``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        shorter_side = min(image.size)
        if resolution and image.format == "JPEG" and shorter_side >= 2 * resolution:
            _draft_to_shorter_side(image, resolution)
        image.load()  # before the size check: a corrupt image is reported as such
        if shorter_side < min_image_size:
            raise SkipSample(TOO_SMALL)
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipSample(TOO_LARGE) from None
    except Exception:  # PIL plugins raise many exception types on corrupt data
        raise SkipSample(DECODE_ERROR) from None


def _draft_to_shorter_side(image: Image.Image, resolution: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the shorter side stays >= ``resolution``."""
    width, height = image.size
    shorter = min(width, height)
    image.draft("RGB", (-(-width * resolution // shorter), -(-height * resolution // shorter)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded image of any PIL mode to RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "F" else 255.0 / 65535.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")
