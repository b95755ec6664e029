"""Read an image file the one way both ends of the pipeline read it: uint8 RGB, one rule for every format.

The prepare stage (``metaseg.data.importing``) and the edge script (``export/infer.py``) both call ``read_rgb``, so a
device sees a photo exactly as training saw it. numpy and Pillow only (no torch, no metaseg): on the device this file
sits beside infer.py.

- 8-bit images: RGB as stored; grey, palette and CMYK converted to RGB; alpha dropped (not composited).
- More bits per sample (16-bit PNG, grey or colour; 16/32-bit integer or float TIFF): divided by the full value of
  the bit depth the image uses, ``bits_used``: the smallest sensor depth (8, 10, 12, 14, 16 bits) that holds its
  largest sample. A 12-bit picture stored in 16 bits reads as its 12-bit self, a 16-bit one as 16 bits; brightness is
  kept (never stretched to the image's own maximum). Float images with every sample in [0, 1] are divided by 1.
  Pillow decodes 16-bit colour only to the high byte of each sample; for PNG (the common 16-bit colour file) a second
  decode recovers the low byte, elsewhere (16-bit colour TIFF, 16-bit grey + alpha PNG) the high byte is the value.
- ``shrink``: when the caller says how small it will resize the image (``fitted_size``), a JPEG is decoded at the
  largest libjpeg reduction (1/2, 1/4, 1/8) that stays at least twice that large: a 6000x4000 photo never sits in
  memory at full size, and the final antialiased resize, not libjpeg's DCT scaling, does most of the filtering (at
  128 px the real aerial JPEGs differ from a full decode by 1.3 grey levels, mean; without the factor 2, by 4.2).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
SENSOR_BITS = (8, 10, 12, 14, 16)
RESIZE_MODES = ("stretch", "pad", "crop")
DRAFT_MARGIN = 2  # a reduced JPEG decode stays at least this many times the caller's resize target
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # single-channel modes of more than 8 bits
_LOW_BYTE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}  # a 16-bit colour PNG's rawmode -> its low bytes


class ImageError(Exception):
    """A file that cannot be read as an image; ``str(err)`` is a one-line reason without the path."""


def describe(err: BaseException) -> str:
    """``Type: first line of the message`` of a decoder error, for a one-line report."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def fitted_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """(w, h) a width x height image is resized to on its way to size x size (aspect kept but for stretch):
    ``stretch`` the square itself, ``pad`` the long side at ``size`` (then letterboxed), ``crop`` the short side at
    ``size`` (then centre-cropped)."""
    if mode == "stretch":
        return size, size
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode '{mode}' ({' | '.join(RESIZE_MODES)})")
    scale = size / (max(height, width) if mode == "pad" else min(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def bits_used(peak: int) -> int:
    """The bit depth an image with largest sample ``peak`` uses: the smallest of 8, 10, 12, 14, 16 bits that holds
    it (past 16 bits: its bit length)."""
    return next((bits for bits in SENSOR_BITS if peak < 1 << bits), peak.bit_length())


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """Samples of more than 8 bits (integers or floats, any shape) -> uint8, divided by the full value of
    ``bits_used`` (1 for floats all in [0, 1]) and rounded to nearest."""
    if samples.dtype.kind == "f":
        samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(samples.max(initial=0))
    full = 1.0 if samples.dtype.kind == "f" and peak <= 1.0 else float((1 << bits_used(int(np.ceil(peak)))) - 1)
    out = samples.astype(np.float32)
    out *= np.float32(255.0 / full)
    np.rint(out, out=out)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _png16_colour(im: Image.Image, path: Path) -> np.ndarray | None:
    """A 16-bit colour PNG's samples as uint16 [H, W, 3 | 4], or None for any other file (``im`` not loaded yet)."""
    if im.format != "PNG" or len(im.tile) != 1 or im.tile[0].args not in _LOW_BYTE:
        return None
    tile = im.tile[0]
    im.load()
    high = np.asarray(im).astype(np.uint16)
    with Image.open(path) as again:
        again.tile = [tile._replace(args=_LOW_BYTE[tile.args])]
        again.load()
        return (high << 8) | np.asarray(again)


def _rgb(im: Image.Image, path: Path) -> np.ndarray:
    if im.mode in _WIDE_MODES:
        return np.repeat(to_uint8(np.asarray(im))[..., None], 3, axis=2)
    wide = _png16_colour(im, path)
    if wide is not None:
        return to_uint8(wide[..., :3])
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def read_rgb(path: Path, shrink: Callable[[int, int], tuple[int, int]] | None = None
             ) -> tuple[np.ndarray, tuple[int, int]]:
    """The image at ``path`` as uint8 RGB [h, w, 3], and its stored (width, height).

    ``shrink(width, height) -> (w, h)``: the size the caller resizes the image to next; a JPEG is then decoded at a
    reduced scale, no smaller than ``DRAFT_MARGIN`` x (w, h), so the array may be smaller than the stored size.
    Anything Pillow cannot decode, or will not (above its decompression-bomb limit), raises ``ImageError``."""
    try:
        with Image.open(path) as im:
            stored = im.size
            if shrink is not None and im.format == "JPEG":
                w, h = shrink(*stored)
                im.draft(None, (DRAFT_MARGIN * w, DRAFT_MARGIN * h))
            return _rgb(im, path), stored
    except Image.DecompressionBombError as err:
        raise ImageError(f"too large to decode safely ({describe(err)}); downscale it first") from None
    except DECODE_ERRORS as err:
        raise ImageError(f"unreadable or truncated image ({describe(err)})") from None
