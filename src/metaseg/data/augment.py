"""Joint image + mask augmentation (albumentations 2.x), deterministic given a per-image seed.

Geometric transforms (flip, random resized crop) move image and mask together; the mask is resized with
nearest-neighbour interpolation, so labels (including 255 = ignore) are never blended. Colour jitter touches the
image only. The seed of each call comes from the training sampler's episode, so a resumed run reproduces the
same augmented batches.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI for updates otherwise

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

log = logging.getLogger(__name__)

Augment = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def build_augment(image_size: int | tuple[int, int]) -> Augment:
    """Return ``augment(image_uint8_HWC, mask_HW, seed) -> (image, mask)``, same shapes and dtypes as the input.

    HorizontalFlip (p 0.5), RandomResizedCrop to ``image_size`` with scale (0.5, 1.0) (mask: nearest), and a mild
    ColorJitter (p 0.5). The same seed always gives the same output.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    compose = A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.RandomResizedCrop(size=(h, w), scale=(0.5, 1.0), interpolation=cv2.INTER_LINEAR,
                                mask_interpolation=cv2.INTER_NEAREST, p=1.0),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ],
        p=1.0,
        seed=0,
    )

    def augment(image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        compose.set_random_seed(int(seed) % 2**32)
        out = compose(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(mask))
        return out["image"], out["mask"]

    return augment
