"""The one class palette and the one way to paint labels on an image.

Used by the prepare stage's sample grid and the evaluate report's overlays, and exported into every ONNX file's
metadata (``palette``), so ``export/infer.py`` (which cannot import this package) colours the edge device's masks
with the same colours.
"""
from __future__ import annotations

import numpy as np

from metaseg.data.prepared import IGNORE


def palette(num_classes: int = 256) -> np.ndarray:
    """uint8 [num_classes, 3]: the PASCAL VOC colour map (0 = black background, 1 = dark red, 2 = green, ...)."""
    colours = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
    for i in range(len(colours)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


_LUT = palette(256).astype(np.float32)


def blend(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """uint8 RGB with each class's colour blended in (0 = background: untouched; IGNORE: grey)."""
    out = image.astype(np.float32).copy()
    fg = (labels > 0) & (labels != IGNORE)
    out[fg] = (1 - alpha) * out[fg] + alpha * _LUT[labels[fg]]
    ignore = labels == IGNORE
    out[ignore] = 0.5 * out[ignore] + 0.5 * 128
    return out.clip(0, 255).astype(np.uint8)
