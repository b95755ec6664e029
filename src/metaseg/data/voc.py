"""Import PASCAL VOC 2012 segmentation.

::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png             palette PNG: the palette *indices* are the labels
    <root>/ImageSets/Segmentation/<image_set>.txt one id per line

Index 0 is background, 1..20 the VOC classes, 255 the object boundary band (-> ignore). Any other index is an
error: VOC's palette is exhaustive. ``grouping="per_class"`` makes each class a 1-way domain named after it (that
class -> 1, every other class -> background 0, 255 stays ignore) holding the images where the class is present
after resizing; ``"single"`` makes one domain ``voc`` with the 20 classes as ids 1..20.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from metaseg.cli import InputError
from metaseg.data.importing import (BadFile, DomainBuilder, Issues, check_same_size, fit, read_image, read_mask,
                                    require_class_pixels, require_dir)
from metaseg.data.prepared import IGNORE, DomainData

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def _read_ids(root: Path, image_set: str) -> list[str]:
    path = root / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    if not path.is_file():
        raise InputError(f"{path}: missing image list (check prepare.voc_image_set and prepare.root)")
    ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise InputError(f"{path}: image list is empty")
    return sorted(set(ids))


def _load(root: Path, image_id: str, size: int, resize: str,
          min_side: int) -> tuple[np.ndarray, np.ndarray, bytes, str]:
    rel, mask_rel = f"JPEGImages/{image_id}.jpg", f"SegmentationClass/{image_id}.png"
    if not (root / rel).is_file():
        raise BadFile(rel, "missing image")
    if not (root / mask_rel).is_file():
        raise BadFile(rel, f"missing mask {mask_rel}")
    mask = read_mask(root / mask_rel, mask_rel)
    image, stored, data = read_image(root / rel, rel, size=size, resize=resize, min_side=min_side)
    check_same_size(stored, mask, rel)
    bad = sorted(set(np.unique(mask).tolist()) - set(range(len(VOC_CLASSES) + 1)) - {IGNORE})
    if bad:
        raise BadFile(mask_rel, f"mask value(s) {bad[:5]} neither a VOC class index (0..20) nor 255 (ignore)")
    mask = mask.astype(np.uint8)
    require_class_pixels(mask, rel, "in its mask")
    image, mask = fit(image, mask, size, resize)
    require_class_pixels(mask, rel, f"left after resizing to {size} px ({resize})")
    return image, mask, data, rel


def import_voc(root: Path, *, image_size: int, resize: str, on_error: str, domains: list[str],
               max_images: int | None = None, grouping: str = "per_class", image_set: str = "trainval",
               min_side: int = 1, progress: bool = True) -> tuple[list[DomainData], list[dict[str, str]]]:
    """VOC as 20 one-class domains (per_class) or one 20-class domain 'voc' (single)."""
    require_dir(root)
    known = list(VOC_CLASSES) if grouping == "per_class" else ["voc"]
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise InputError(f"prepare.domains: '{unknown[0]}' is not a VOC domain with voc_grouping {grouping} "
                         f"(known: {', '.join(known)})")
    wanted = [d for d in known if not domains or d in domains]
    if grouping == "single":
        builders = {"voc": DomainBuilder("voc", list(VOC_CLASSES))}
    else:
        builders = {name: DomainBuilder(name, [name]) for name in wanted}
    issues = Issues(on_error, root)
    full = (lambda b: max_images is not None and len(b.images) >= max_images)
    for image_id in tqdm(_read_ids(root, image_set), desc="voc", unit="img", disable=None if progress else True):
        if all(full(b) for b in builders.values()):
            break
        try:
            image, mask, data, rel = _load(root, image_id, image_size, resize, min_side)
        except BadFile as err:
            issues.report(err)
            continue
        if grouping == "single":
            builders["voc"].add(image, mask, image_id, rel, data)
            continue
        present = set(np.unique(mask).tolist())
        for c, name in enumerate(VOC_CLASSES, start=1):
            if name in builders and c in present and not full(builders[name]):
                binary = np.where(mask == c, 1, np.where(mask == IGNORE, IGNORE, 0)).astype(np.uint8)
                builders[name].add(image, binary, image_id, rel, data)
    out = [d for d in (b.build(issues) for b in builders.values()) if d is not None]
    return sorted(out, key=lambda d: d.name), issues.skipped
