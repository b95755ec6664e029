"""metaseg: few-shot semantic segmentation by meta-learning, as a reproducible DVC pipeline."""
from __future__ import annotations

__version__ = "0.1.0"
