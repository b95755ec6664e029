"""Stage `adapt`: adapt one trained init to one meta-test domain's deployment support set; ship and score it.

python -m pipeline.adapt --params params.yaml --init models/train/<alg>.pt --domain <d> --prepared data/prepared \
    --splits data/splits --out models/adapted/<d>/<alg>.pt --results results/adapt/<d>/<alg>
(``--init scratch`` adapts a seeded random init instead.)
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from metaseg.adapt import BASELINES, AdaptSettings, adapt_deployment, baseline_init
from metaseg.cli import InputError, choose_device, run_stage, stage_parser
from metaseg.config import load_config
from metaseg.data.prepared import PreparedDataset
from metaseg.data.splits import load_deploy, load_splits
from metaseg.io import write_json, write_timings
from metaseg.meta.finetune import load_init

log = logging.getLogger("adapt")


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, "base", "model", "train", "adapt")
    device = torch.device(choose_device(cfg["base"].device))
    splits_dir = Path(args.splits)
    deploy = load_deploy(splits_dir / "deploy.json")
    if args.domain not in deploy:
        raise InputError(f"{splits_dir / 'deploy.json'}: no deployment set for domain '{args.domain}' "
                         f"(meta-test domains: {', '.join(deploy) or 'none'})")
    test_pool = load_splits(splits_dir / "splits.json")["pools"][args.domain]["test"]
    dataset = PreparedDataset(args.prepared)
    if args.init in BASELINES:
        init = baseline_init(args.init, model=cfg["model"], train=cfg["train"], image_size=dataset.image_size,
                             scratch_lr=cfg["adapt"].scratch_lr, seed=cfg["base"].seed)
    else:
        init = load_init(args.init, device)
    metrics, timings = adapt_deployment(dataset.domain(args.domain), deploy[args.domain], test_pool, init,
                                        Path(args.out), settings=AdaptSettings.from_config(cfg["adapt"]),
                                        seed=cfg["base"].seed, device=device)
    write_json(Path(args.results) / "metrics.json", metrics)
    write_timings(args.results, timings)
    log.info("wrote %s and %s (metrics.json, timings.json)", args.out, args.results)


if __name__ == "__main__":
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="trained init (models/train/<alg>.pt), 'scratch' or 'imagenet'")
    parser.add_argument("--domain", required=True, help="meta-test domain name")
    parser.add_argument("--prepared", required=True, help="prepared dataset folder (data/prepared)")
    parser.add_argument("--splits", required=True, help="splits folder (data/splits)")
    parser.add_argument("--out", required=True, help="adapted model file (models/adapted/<domain>/<alg>.pt)")
    parser.add_argument("--results", required=True, help="results folder for metrics.json, timings.json")
    run_stage(main, parser)
