"""Stage `prepare`: build the canonical multi-domain dataset (synthetic, folder, VOC or FSS-1000 source).

python -m pipeline.prepare --params params.yaml --out data/prepared --results results/prepare
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from metaseg.cli import run_stage, stage_parser
from metaseg.config import load_config
from metaseg.data.prepare import run_prepare, save_samples
from metaseg.data.prepared import write_prepared
from metaseg.io import atomic_dir, write_json, write_timings

log = logging.getLogger("prepare")


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, "base", "prepare")
    base, prep = cfg["base"], cfg["prepare"]
    result = run_prepare(base, prep)  # raises before anything is written
    with atomic_dir(args.out) as tmp:
        write_prepared(tmp, result.domains, source=prep.source, image_size=base.image_size,
                       extra={"skipped": len(result.skipped)})
    results = Path(args.results)
    write_json(results / "metrics.json", result.metrics)
    write_timings(results, result.timings)
    write_json(results / "skipped.json", result.skipped)
    save_samples(result.domains, results / "plots" / "samples.png")
    if result.skipped:
        log.warning("%d skipped input(s) listed in %s", len(result.skipped), results / "skipped.json")
    log.info("wrote %s and %s", args.out, results)


def parser() -> argparse.ArgumentParser:
    p = stage_parser(__doc__.splitlines()[0])
    p.add_argument("--out", default="data/prepared", help="prepared dataset folder (written atomically)")
    p.add_argument("--results", default="results/prepare", help="metrics.json, timings.json, skipped.json, plots/")
    return p


if __name__ == "__main__":
    run_stage(main, parser())
