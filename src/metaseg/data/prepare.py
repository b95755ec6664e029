"""The prepare stage's work: choose the source, import or generate the domains, collect what was skipped, report.

``run_prepare`` returns everything the stage writes (domains, skipped list, flat metrics, timings); writing the prepared
folder atomically is the stage script's job (``metaseg.io.atomic_dir`` + ``metaseg.data.prepared.write_prepared``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaseg.cli import InputError
from metaseg.config import BaseConfig, PrepareConfig
from metaseg.data.prepared import DomainData
from metaseg.overlay import blend

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    domains: list[DomainData]
    skipped: list[dict[str, str]]  # {"file": path relative to prepare.root, "reason": ...}
    metrics: dict[str, float | int]  # flat scalars
    timings: dict[str, float]  # import time and rate: timings.json, apart from the metrics


def resolve_root(root: str | None, source: str, cwd: Path | None = None) -> Path:
    """``prepare.root`` as a path (relative paths: relative to ``cwd``, the repo root when run by DVC)."""
    if not root:
        raise InputError(f"prepare.root: must name the input folder for source '{source}'")
    path = Path(root)
    if not path.is_absolute():
        path = (cwd or Path.cwd()) / path
    if not path.is_dir():
        raise InputError(f"prepare.root: '{root}' is not an existing folder (resolved to {path})")
    return path


def load_domains(base: BaseConfig, cfg: PrepareConfig, *, progress: bool = True,
                 cwd: Path | None = None) -> tuple[list[DomainData], list[dict[str, str]]]:
    """Domains and skipped files from the configured source."""
    if cfg.source == "synthetic":
        from metaseg.data.synthetic import generate

        return generate(cfg.synthetic_domains, cfg.images_per_domain, base.image_size, base.seed), []
    root = resolve_root(cfg.root, cfg.source, cwd)
    common = dict(image_size=base.image_size, resize=cfg.resize, on_error=cfg.on_error, domains=list(cfg.domains),
                  max_images=cfg.max_images_per_domain, min_side=cfg.min_image_side, progress=progress)
    if cfg.source == "folder":
        from metaseg.data.folder import import_folder

        return import_folder(root, **common)
    if cfg.source == "voc":
        from metaseg.data.voc import import_voc

        return import_voc(root, grouping=cfg.voc_grouping, image_set=cfg.voc_image_set, **common)
    if cfg.source == "fss1000":
        from metaseg.data.fss1000 import import_fss1000

        return import_fss1000(root, **common)
    raise InputError(f"prepare.source: unknown source '{cfg.source}'")


def run_prepare(base: BaseConfig, cfg: PrepareConfig, *, progress: bool = True,
                cwd: Path | None = None) -> PrepareResult:
    """Import or generate, then check that something usable is left; metrics and timings are flat scalars."""
    start = time.perf_counter()
    domains, skipped = load_domains(base, cfg, progress=progress, cwd=cwd)
    seconds = time.perf_counter() - start
    if skipped:
        log.warning("skipped %d bad input(s) (on_error: skip); each is listed with its reason in skipped.json",
                    len(skipped))
    if not domains:
        first = f"; first skipped: {skipped[0]['file']}: {skipped[0]['reason']}" if skipped else ""
        raise InputError(f"prepare.root: no usable domain in '{cfg.root}' ({len(skipped)} input(s) skipped{first})")
    images = sum(len(d.images) for d in domains)
    metrics: dict[str, float | int] = {
        "domains": len(domains),
        "images": images,
        "skipped": len(skipped),
    }
    timings = {"seconds": round(seconds, 3), "images_per_s": round(images / max(seconds, 1e-9), 1)}
    for d in domains:
        metrics[f"domain.{d.name}.images"] = len(d.images)
        metrics[f"domain.{d.name}.classes"] = len(d.class_names)
    log.info("prepared %d domains, %d images (%s source) in %.1f s", len(domains), images, cfg.source, seconds)
    return PrepareResult(domains, skipped, metrics, timings)


def save_samples(domains: list[DomainData], path: str | Path, *, per_domain: int = 4, max_domains: int = 12) -> None:
    """PNG grid: one row per domain (name as row label), image + coloured mask overlay for evenly spaced samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metaseg.io import atomic_path

    shown = domains[:max_domains]
    cols = 2 * per_domain
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.3 * cols, 1.4 * len(shown)), squeeze=False)
    for row, d in zip(axes, shown):
        picks = np.unique(np.linspace(0, len(d.images) - 1, per_domain).round().astype(int))
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        for k, i in enumerate(picks):
            row[2 * k].imshow(d.images[i])
            row[2 * k + 1].imshow(blend(d.images[i], d.masks[i]))
        row[0].set_ylabel(f"{d.name}\n({len(d.class_names)} cl.)", fontsize=8)
    more = f" (first {len(shown)} of {len(domains)} domains)" if len(domains) > len(shown) else ""
    fig.suptitle(f"prepared samples: image | mask overlay{more}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
