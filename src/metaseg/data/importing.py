"""What the real-data importers (folder, voc, fss1000) share: decoding, resizing, and the bad-input policy.

Images are read by ``export/image_reader.py``, the module the edge script reads them with: a device sees a photo
(16-bit, palette, a JPEG decoded at reduced scale) exactly as the prepared dataset stores it.

Bad input is reported through ``Issues.bad(file, reason)``: with ``on_error="fail"`` it raises ``InputError``
(one line: file and reason), with ``"skip"`` it records the file in ``Issues.skipped`` and the importer moves on.
Per-file checks raise ``BadFile`` inside the importer's loop, which hands it to ``Issues``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from export.image_reader import DECODE_ERRORS, IMAGE_SUFFIXES, ImageError, describe, fitted_size, read_rgb
from metaseg.cli import InputError
from metaseg.data.prepared import IGNORE, DomainData, Item, sha256_bytes

log = logging.getLogger(__name__)


class BadFile(Exception):
    """One unusable input file (or domain folder); ``reason`` is a short phrase."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


@dataclass
class Issues:
    """The on_error policy. ``root`` prefixes file names in error messages (skipped.json keeps them relative)."""

    on_error: str
    root: Path
    skipped: list[dict[str, str]] = field(default_factory=list)

    def bad(self, file: str, reason: str) -> None:
        if self.on_error == "fail":
            raise InputError(f"{self.root}/{file}: {reason} (set prepare.on_error: skip to list it and go on)")
        log.debug("skipping %s: %s", file, reason)
        self.skipped.append({"file": file, "reason": reason})

    def report(self, err: BadFile) -> None:
        self.bad(err.file, err.reason)


def read_image(path: Path, rel: str, *, size: int, resize: str,
               min_side: int) -> tuple[np.ndarray, tuple[int, int], bytes]:
    """uint8 RGB as ``export.image_reader.read_rgb`` reads it (a JPEG decoded no larger than ``fit`` needs, so the
    array may be smaller than the file), the stored (width, height) and the file's bytes. An image whose short side
    is below ``min_side`` px (``prepare.min_image_side``) is a BadFile: resized to ``size`` it would be mostly
    interpolation, and a 1x1 one a solid block labelled 100% one class."""
    try:
        data = path.read_bytes()
        image, stored = read_rgb(path, lambda width, height: fitted_size(width, height, size, resize))
    except ImageError as err:
        raise BadFile(rel, str(err)) from None
    except OSError as err:
        raise BadFile(rel, f"unreadable or truncated image ({describe(err)})") from None
    if min(stored) < min_side:
        raise BadFile(rel, f"image is {stored[0]}x{stored[1]} px, below prepare.min_image_side ({min_side} px on "
                           "the short side)")
    return image, stored, data


def read_mask(path: Path, rel: str) -> np.ndarray:
    """The stored index values of a mask PNG as [H, W] int64: palette indices for mode P (never the colours)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                raise BadFile(rel, f"mask is a {im.mode} colour image; expected a single-channel index map (mode L or P)")
            if im.mode in ("1", "LA", "PA"):
                im = im.convert("L") if im.mode != "PA" else im.convert("P")
            values = np.asarray(im).astype(np.int64)
    except DECODE_ERRORS as err:
        raise BadFile(rel, f"unreadable or truncated mask ({describe(err)})") from None
    if values.ndim != 2 or (values.size and values.min() < 0):
        raise BadFile(rel, "mask must be a single-channel map of non-negative index values")
    return values


def check_same_size(stored: tuple[int, int], mask: np.ndarray, rel: str) -> None:
    """The image's stored (width, height) against its mask's shape."""
    if (stored[1], stored[0]) != mask.shape:
        raise BadFile(rel, f"image is {stored[0]}x{stored[1]} but its mask is {mask.shape[1]}x{mask.shape[0]}")


def fit(image: np.ndarray, mask: np.ndarray, size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear, antialiased) and uint8 mask (nearest) to size x size: stretch | pad | crop. The
    geometry follows the mask (the stored size): the image may arrive smaller, decoded at a reduced JPEG scale."""
    h, w = mask.shape
    nw, nh = fitted_size(w, h, size, mode)
    im_r = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    mk_r = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((nw, nh), Image.NEAREST))
    if mode == "stretch":
        return im_r, mk_r
    if mode == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        return im_r[top:top + size, left:left + size].copy(), mk_r[top:top + size, left:left + size].copy()
    out_im = np.zeros((size, size, 3), np.uint8)
    out_mk = np.full((size, size), IGNORE, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out_im[top:top + nh, left:left + nw] = im_r
    out_mk[top:top + nh, left:left + nw] = mk_r
    return out_im, out_mk


def require_class_pixels(mask: np.ndarray, rel: str, where: str) -> None:
    """``mask`` holds ids (0 bg, 1..C, 255 ignore); no class pixel at all makes the image useless for episodes."""
    if not ((mask > 0) & (mask != IGNORE)).any():
        raise BadFile(rel, f"no pixel of any class {where}")


@dataclass
class DomainBuilder:
    """Collects one domain's fitted images; ``build`` stacks them (None when no image was usable)."""

    name: str
    class_names: list[str]
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)

    def add(self, image: np.ndarray, mask: np.ndarray, stem: str, source: str, data: bytes) -> None:
        self.images.append(image)
        self.masks.append(mask)
        self.items.append(Item(stem=stem, source=source, sha256=sha256_bytes(data)))

    def build(self, issues: Issues) -> DomainData | None:
        if not self.images:
            issues.bad(f"{self.name}/", "domain has no usable image")
            return None
        return DomainData(self.name, list(self.class_names), np.stack(self.images), np.stack(self.masks),
                          list(self.items))


def list_images(folder: Path) -> dict[str, list[Path]]:
    """stem -> image files in ``folder`` (sorted; more than one file means an ambiguous stem)."""
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(p.stem, []).append(p)
    return dict(sorted(found.items()))


def require_dir(path: Path, key: str = "prepare.root") -> None:
    if not path.is_dir():
        raise InputError(f"{key}: '{path}' is not an existing folder")


ImportOne = Callable[[Path, str, Issues, int, str, int, int | None, bool], DomainData | None]


def import_subfolders(root: Path, import_one: ImportOne, *, kind: str, layout: str, image_size: int, resize: str,
                      min_side: int, on_error: str, domains: list[str], max_images: int | None,
                      progress: bool) -> tuple[list[DomainData], list[dict[str, str]]]:
    """Run ``import_one`` on every (or each listed) sub-folder of ``root``, one domain per folder, in sorted order.

    ``kind`` names the folders in messages ("domain", "class"), ``layout`` is the expected layout shown when none
    is found. Returns the usable domains and the skipped files.
    """
    require_dir(root)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise InputError(f"prepare.root: no {kind} folders in '{root}' (expected {layout})")
    missing = [d for d in domains if d not in found]
    if missing:
        raise InputError(f"prepare.domains: '{missing[0]}' is not a {kind} folder in '{root}' "
                         f"(has: {', '.join(found)})")
    issues = Issues(on_error, root)
    out = []
    for name in (sorted(set(domains)) if domains else found):
        domain = import_one(root, name, issues, image_size, resize, min_side, max_images, progress)
        if domain is not None:
            out.append(domain)
    return out, issues.skipped
