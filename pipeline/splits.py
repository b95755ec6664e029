"""Stage `splits`: domain roles, support/test pools, stored evaluation episodes and deployment support sets.

python -m pipeline.splits --params params.yaml --prepared data/prepared --out data/splits --results results/splits
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from metaseg.cli import run_stage, stage_parser
from metaseg.config import load_config
from metaseg.data.prepared import PreparedDataset
from metaseg.data.splits import make_splits, validate_splits, write_splits
from metaseg.io import atomic_dir, write_json

log = logging.getLogger("splits")


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, "base", "splits")
    dataset = PreparedDataset(args.prepared)
    result = make_splits(dataset, cfg["splits"], seed=cfg["base"].seed)
    validate_splits(dataset, result.splits, result.episodes, result.deploy, train_domains=result.splits["meta_train"],
                    deploy_shots=cfg["splits"].deploy_shots)
    with atomic_dir(args.out) as tmp:
        write_splits(tmp, result)
    metrics: dict[str, float | int] = {
        "meta_train_domains": len(result.splits["meta_train"]),
        "meta_val_domains": len(result.splits["meta_val"]),
        "meta_test_domains": len(result.splits["meta_test"]),
        "episodes": sum(len(eps) for per_k in result.episodes.values() for eps in per_k.values()),
    }
    for name, pools in result.splits["pools"].items():
        metrics[f"{name}.support_pool"] = len(pools["support"])
        metrics[f"{name}.test_pool"] = len(pools["test"])
    for name, dep in result.deploy.items():
        metrics[f"{name}.deploy_images"] = len(dep.support)
    write_json(Path(args.results) / "metrics.json", metrics)
    log.info("wrote %s (%d held-out domains, %d episodes)", args.out, len(result.splits["pools"]), metrics["episodes"])


if __name__ == "__main__":
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True, help="prepared dataset folder (data/prepared)")
    parser.add_argument("--out", required=True, help="output folder for splits.json, episodes.json, deploy.json")
    parser.add_argument("--results", required=True, help="results folder for metrics.json")
    run_stage(main, parser)
