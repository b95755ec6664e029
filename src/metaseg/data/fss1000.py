"""Import FSS-1000: one folder per class, each a one-class domain named after its folder.

::

    <root>/<class>/<n>.jpg
    <root>/<class>/<n>.png    binary mask: foreground where the grey value (after converting to L) is > 127

There is no ignore value and every mask value is meaningful (fg / bg), so no value can be undeclared.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from export.image_reader import DECODE_ERRORS, describe
from metaseg.data.importing import (BadFile, DomainBuilder, Issues, check_same_size, fit, import_subfolders, read_image,
                                    require_class_pixels)
from metaseg.data.prepared import DomainData


def _read_binary_mask(path: Path, rel: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return (np.asarray(im.convert("L")) > 127).astype(np.uint8)
    except DECODE_ERRORS as err:
        raise BadFile(rel, f"unreadable or truncated mask ({describe(err)})") from None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))


def _import_class(root: Path, name: str, issues: Issues, size: int, resize: str, min_side: int,
                  max_images: int | None, progress: bool) -> DomainData | None:
    builder = DomainBuilder(name, [name])
    for path in tqdm(_images(root / name), desc=name, unit="img", leave=False,
                     disable=None if progress else True):
        rel, mask_rel = f"{name}/{path.name}", f"{name}/{path.stem}.png"
        try:
            if not (root / mask_rel).is_file():
                raise BadFile(rel, f"missing mask {mask_rel}")
            image, stored, data = read_image(path, rel, size=size, resize=resize, min_side=min_side)
            mask = _read_binary_mask(root / mask_rel, mask_rel)
            check_same_size(stored, mask, rel)
            require_class_pixels(mask, rel, "in its mask (no value > 127)")
            image, mask = fit(image, mask, size, resize)
            require_class_pixels(mask, rel, f"left after resizing to {size} px ({resize})")
        except BadFile as err:
            issues.report(err)
            continue
        builder.add(image, mask, path.stem, rel, data)
        if max_images is not None and len(builder.images) >= max_images:
            break
    return builder.build(issues)


def import_fss1000(root: Path, *, image_size: int, resize: str, on_error: str, domains: list[str],
                   max_images: int | None = None, min_side: int = 1,
                   progress: bool = True) -> tuple[list[DomainData], list[dict[str, str]]]:
    """Every (or each listed) class folder under ``root`` as a one-class domain; returns domains and skipped files."""
    return import_subfolders(root, _import_class, kind="class", layout="<root>/<class>/<n>.jpg + .png",
                             image_size=image_size, resize=resize, min_side=min_side, on_error=on_error,
                             domains=domains, max_images=max_images, progress=progress)
