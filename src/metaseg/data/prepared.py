"""The canonical prepared dataset: the contract between `prepare` and every later stage.

Layout of the prepared folder (written whole and atomically by the prepare stage)::

    manifest.json            version, source, image_size, and per domain: class names, counts,
                             per-class pixel frequency and image count, one item per image (stem, source file, sha256)
    <domain>/images.npy      uint8 [N, H, W, 3], RGB
    <domain>/masks.npy       uint8 [N, H, W]: 0 = background, 1..C = the domain's classes, 255 = ignore

Arrays are read memory-mapped, so training never decodes an image. Class id ``c`` (1..C) of a domain is named
``class_names[c - 1]``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metaseg.io import read_json, save_with, write_json

FORMAT_VERSION = 1
IGNORE = 255  # the one "not labelled" mask value, everywhere (prepared masks, losses, scores, overlays)


@dataclass(frozen=True)
class Item:
    """Where one prepared image came from."""

    stem: str
    source: str  # source file(s), relative to the input root; "synthetic:<domain>:<index>" for generated images
    sha256: str  # of the source image file's bytes (of the generated arrays for synthetic)


@dataclass
class DomainData:
    """One domain in memory, as an importer produces it."""

    name: str
    class_names: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray  # uint8 [N, H, W]
    items: list[Item] = field(default_factory=list)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save, atomically (np.save on a path would append .npy to the temp name, so write through a handle)."""

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))

    save_with(path, _save)


def class_stats(masks: np.ndarray, num_classes: int) -> tuple[list[float], list[int]]:
    """Per class 1..C: fraction of labelled (non-ignore) pixels, and number of images containing it."""
    counts = np.bincount(masks.reshape(-1), minlength=256).astype(np.float64)
    labelled = counts.sum() - counts[IGNORE]
    freq = [float(counts[c] / labelled) if labelled else 0.0 for c in range(1, num_classes + 1)]
    per_image = np.stack([np.bincount(m.reshape(-1), minlength=256) > 0 for m in masks]) if len(masks) else None
    n_img = [int(per_image[:, c].sum()) if per_image is not None else 0 for c in range(1, num_classes + 1)]
    return freq, n_img


def write_prepared(out_dir: str | Path, domains: list[DomainData], *, source: str, image_size: int,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write arrays and manifest into ``out_dir`` (the caller makes the folder swap atomic). Returns the manifest."""
    out_dir = Path(out_dir)
    manifest: dict[str, Any] = {"version": FORMAT_VERSION, "source": source, "image_size": image_size,
                                "domains": [], **(extra or {})}
    for d in domains:
        n = len(d.images)
        if d.images.shape != (n, image_size, image_size, 3) or d.images.dtype != np.uint8:
            raise ValueError(f"domain {d.name}: images must be uint8 [N,{image_size},{image_size},3], got "
                             f"{d.images.dtype} {d.images.shape}")
        if d.masks.shape != (n, image_size, image_size) or d.masks.dtype != np.uint8:
            raise ValueError(f"domain {d.name}: masks must be uint8 [N,{image_size},{image_size}], got "
                             f"{d.masks.dtype} {d.masks.shape}")
        (out_dir / d.name).mkdir(parents=True, exist_ok=True)
        save_npy(out_dir / d.name / "images.npy", d.images)
        save_npy(out_dir / d.name / "masks.npy", d.masks)
        freq, n_img = class_stats(d.masks, len(d.class_names))
        manifest["domains"].append({
            "name": d.name,
            "class_names": list(d.class_names),
            "count": n,
            "class_pixel_freq": dict(zip(d.class_names, freq)),
            "class_image_count": dict(zip(d.class_names, n_img)),
            "items": [vars(it) for it in d.items],
        })
    write_json(out_dir / "manifest.json", manifest)
    return manifest


@dataclass(frozen=True)
class Domain:
    """One prepared domain, arrays memory-mapped."""

    name: str
    class_names: tuple[str, ...]
    images: np.ndarray  # uint8 [N, H, W, 3] (memmap)
    masks: np.ndarray  # uint8 [N, H, W] (memmap)
    items: tuple[Item, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def class_presence(self) -> np.ndarray:
        """bool [N, C + 1]: image i holds at least one pixel of class c (column 0 = background)."""
        present = np.zeros((len(self), 256), dtype=bool)
        for i in range(len(self)):
            present[i, np.unique(self.masks[i])] = True
        return present[:, :self.num_classes + 1]

    def images_with_class(self, present: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """class id (1..C) -> sorted indices of the images that contain at least one pixel of it (from
        ``present``, this domain's ``class_presence()``, when the caller already has it)."""
        present = self.class_presence() if present is None else present
        return {c: np.flatnonzero(present[:, c]) for c in range(1, self.num_classes + 1)}


class PreparedDataset:
    """Read side of the prepared folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no prepared dataset here (run the prepare stage first)")
        self.manifest = read_json(path)
        if self.manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {self.manifest.get('version')}, expected {FORMAT_VERSION}")
        self.image_size: int = self.manifest["image_size"]
        self._domains: dict[str, Domain] = {}

    @property
    def domain_names(self) -> list[str]:
        return [d["name"] for d in self.manifest["domains"]]

    def domain(self, name: str) -> Domain:
        if name not in self._domains:
            entries = {d["name"]: d for d in self.manifest["domains"]}
            if name not in entries:
                raise KeyError(f"domain '{name}' is not in {self.root} (has: {', '.join(entries)})")
            e = entries[name]
            self._domains[name] = Domain(
                name=name,
                class_names=tuple(e["class_names"]),
                images=np.load(self.root / name / "images.npy", mmap_mode="r"),
                masks=np.load(self.root / name / "masks.npy", mmap_mode="r"),
                items=tuple(Item(**it) for it in e["items"]),
            )
        return self._domains[name]
