"""Import the generic folder layout: one sub-folder per domain.

::

    <root>/<domain>/images/<stem>.<jpg|png|...>
    <root>/<domain>/masks/<stem>.png          same size as the image; pixel values as in labels.yaml
    <root>/<domain>/labels.yaml

labels.yaml (mask values 0..65535: 8-bit or 16-bit PNG masks; at most 254 classes, the prepared ids 1..254)::

    classes: {0: building, 1: land}   # mask value -> class name; ids 1..C follow this order (value 0 may be a class)
    ignore: [5, 255]                  # values excluded from loss and metrics (stored as 255)
    background: [7]                   # optional; when present, classes + ignore + background must cover every
                                      # value found in a mask, and any other value is an error. When absent,
                                      # every value that is neither a class nor ignored is background (id 0).

Images may be RGB, RGBA (alpha dropped), grey, palette, 8 or 16 bits (12-bit-in-16 included); JPEG, PNG, TIFF, ...;
any size from ``prepare.min_image_side`` up (resized per ``resize``); read by ``export/image_reader.py``.
Domains, stems and everything else are processed in sorted order, so the output is deterministic.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from metaseg.data.importing import (BadFile, DomainBuilder, Issues, check_same_size, fit, import_subfolders,
                                    list_images, read_image, read_mask, require_class_pixels)
from metaseg.data.prepared import IGNORE, DomainData
from metaseg.io import yaml_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Labels:
    classes: dict[int, str]  # mask value -> class name, in file order
    ignore: frozenset[int]
    background: frozenset[int] | None  # None: every undeclared value is background

    def lut(self, size: int) -> np.ndarray:
        """Mask value -> prepared id (1..C for classes, 255 for ignore, 0 otherwise), for mask values below ``size``
        and every declared value (a 16-bit mask may use values up to 65535)."""
        lut = np.zeros(max(size, 256, *(v + 1 for v in (*self.classes, *self.ignore))), np.uint8)
        for i, value in enumerate(self.classes, start=1):
            lut[value] = i
        for value in self.ignore:
            lut[value] = IGNORE
        return lut


def _values(raw: object, key: str, rel: str) -> frozenset[int]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535
                                            for v in raw):
        raise BadFile(rel, f"'{key}' must be a list of mask values (integers 0..65535), got {raw!r}")
    return frozenset(raw)


def read_labels(path: Path, rel: str) -> Labels:
    """Parse and validate a labels.yaml; any problem is a BadFile naming the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise BadFile(rel, f"not valid YAML: {yaml_problem(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadFile(rel, f"unreadable labels.yaml ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise BadFile(rel, "labels.yaml must be a mapping with 'classes' (value -> name) and 'ignore' (list)")
    unknown = sorted(set(raw) - {"classes", "ignore", "background"})
    if unknown:
        raise BadFile(rel, f"unknown key '{unknown[0]}' (allowed: classes, ignore, background)")
    classes = raw.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise BadFile(rel, "'classes' must be a non-empty mapping of mask value -> class name")
    parsed: dict[int, str] = {}
    for value, name in classes.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise BadFile(rel, f"class value {value!r} is not an integer 0..65535")
        if not isinstance(name, str) or not name.strip():
            raise BadFile(rel, f"class {value}: name must be a non-empty string, got {name!r}")
        parsed[value] = name.strip()
    if len(set(parsed.values())) != len(parsed):
        raise BadFile(rel, "class names must be unique")
    if len(parsed) >= IGNORE:
        raise BadFile(rel, f"'classes' has {len(parsed)} entries; at most {IGNORE - 1} per domain (prepared masks are "
                           f"uint8: ids 1..{IGNORE - 1}, {IGNORE} = ignore): split the domain")
    ignore = _values(raw.get("ignore"), "ignore", rel)
    background = _values(raw["background"], "background", rel) if "background" in raw else None
    for other, key in ((ignore, "ignore"), (background or frozenset(), "background")):
        both = sorted(other & set(parsed))
        if both:
            raise BadFile(rel, f"value {both[0]} is both a class and listed in '{key}'")
    if background and ignore & background:
        raise BadFile(rel, f"value {sorted(ignore & background)[0]} is in both 'ignore' and 'background'")
    return Labels(parsed, ignore, background)


def _load_pair(image_path: Path, mask_path: Path, rel: str, mask_rel: str, labels: Labels, size: int,
               resize: str, min_side: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    image, stored, data = read_image(image_path, rel, size=size, resize=resize, min_side=min_side)
    raw = read_mask(mask_path, mask_rel)
    check_same_size(stored, raw, rel)
    present = np.flatnonzero(np.bincount(raw.reshape(-1), minlength=256))
    if labels.background is not None:
        undeclared = sorted(set(present.tolist()) - set(labels.classes) - labels.ignore - labels.background)
        if undeclared:
            raise BadFile(mask_rel, f"mask value(s) {undeclared[:5]} neither a class, ignored nor background "
                                    "in labels.yaml")
    mask = labels.lut(int(present[-1]) + 1)[raw]
    require_class_pixels(mask, rel, "in its mask")
    image, mask = fit(image, mask, size, resize)
    require_class_pixels(mask, rel, f"left after resizing to {size} px ({resize})")
    return image, mask, data


def _import_domain(root: Path, name: str, issues: Issues, size: int, resize: str, min_side: int,
                   max_images: int | None, progress: bool) -> DomainData | None:
    folder = root / name
    if not (folder / "labels.yaml").is_file():
        issues.bad(f"{name}/labels.yaml", "missing labels.yaml (classes: value -> name, ignore: [values])")
        return None
    try:
        labels = read_labels(folder / "labels.yaml", f"{name}/labels.yaml")
    except BadFile as err:
        issues.report(err)
        return None
    if not (folder / "images").is_dir():
        issues.bad(f"{name}/images/", "missing images/ folder")
        return None
    builder = DomainBuilder(name, list(labels.classes.values()))
    stems = list_images(folder / "images")
    for stem, files in tqdm(stems.items(), desc=name, unit="img", disable=None if progress else True):
        rel = f"{name}/images/{files[0].name}"
        mask_rel = f"{name}/masks/{stem}.png"
        try:
            if len(files) > 1:
                raise BadFile(rel, f"ambiguous stem: {', '.join(p.name for p in files)}")
            if not (root / mask_rel).is_file():
                raise BadFile(rel, f"missing mask {mask_rel}")
            image, mask, data = _load_pair(files[0], root / mask_rel, rel, mask_rel, labels, size, resize, min_side)
        except BadFile as err:
            issues.report(err)
            continue
        builder.add(image, mask, stem, rel, data)
        if max_images is not None and len(builder.images) >= max_images:
            break
    if (folder / "masks").is_dir():
        orphans = [p.name for p in sorted((folder / "masks").glob("*.png")) if p.stem not in stems]
        if orphans:
            log.warning("%s: %d mask(s) without an image ignored, e.g. %s", name, len(orphans), orphans[0])
    return builder.build(issues)


def import_folder(root: Path, *, image_size: int, resize: str, on_error: str, domains: list[str],
                  max_images: int | None = None, min_side: int = 1,
                  progress: bool = True) -> tuple[list[DomainData], list[dict[str, str]]]:
    """All (or the listed) domain folders under ``root``; returns the domains and the skipped files.

    ``max_images``: keep the first N usable images per domain in sorted stem order (a skipped file does not count).
    ``min_side``: an image whose short side is below it is a bad file (``prepare.min_image_side``).
    """
    return import_subfolders(root, _import_domain, kind="domain", layout="<root>/<domain>/images/",
                             image_size=image_size, resize=resize, min_side=min_side, on_error=on_error,
                             domains=domains, max_images=max_images, progress=progress)
