"""A complete params file for stage subprocess tests: a stage needs every section and key spelled out.

Keys a test does not set take the config classes' code defaults (what the library tests construct), not the
committed params.yaml values: the stage tests run tiny models that the committed values do not fit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from metaseg.config import SECTIONS


def full_params(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every section with every key: the code defaults, updated key by key with ``sections``."""
    unknown = set(sections) - set(SECTIONS)
    assert not unknown, f"unknown sections {unknown}"
    return {name: {**cls().model_dump(), **sections.get(name, {})} for name, cls in SECTIONS.items()}


def write_params(path: Path, **sections: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(full_params(**sections), sort_keys=False), encoding="utf-8")
    return path
