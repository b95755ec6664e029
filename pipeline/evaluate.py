"""Stage `evaluate`: every init on every stored meta-test episode, adaptation curves, 95% CIs, report and plots.

python -m pipeline.evaluate --params params.yaml --models models/train --prepared data/prepared \
    --splits data/splits --results results/evaluate
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from metaseg.adapt import AdaptSettings
from metaseg.cli import choose_device, run_stage, stage_parser
from metaseg.config import load_config
from metaseg.data.prepared import PreparedDataset
from metaseg.data.splits import load_episodes, load_splits
from metaseg.evaluate import evaluate_inits, load_inits, meta_val_budget
from metaseg.report import write_outputs

log = logging.getLogger("evaluate")


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, "base", "model", "train", "adapt", "evaluate")
    ev, base = cfg["evaluate"], cfg["base"]
    device = torch.device(choose_device(base.device))
    splits = load_splits(Path(args.splits) / "splits.json")
    episodes = load_episodes(Path(args.splits) / "episodes.json")
    domains, shots = list(splits["meta_test"]), [int(k) for k in splits["shots"]]
    if ev.max_episodes is not None:
        episodes = {d: {k: eps[:ev.max_episodes] for k, eps in per_k.items()} for d, per_k in episodes.items()}
    dataset = PreparedDataset(args.prepared)
    algorithms = list(cfg["train"].algorithms)
    inits = load_inits(Path(args.models), algorithms, list(ev.inits), device, model=cfg["model"], train=cfg["train"],
                       image_size=dataset.image_size, scratch_lr=cfg["adapt"].scratch_lr, seed=base.seed)
    settings = AdaptSettings.from_config(cfg["adapt"])
    result = evaluate_inits(dataset, episodes, inits, domains=domains, shots=shots,
                            settings=settings, device=device, seed=base.seed,
                            ci=ev.ci, bootstrap_samples=ev.bootstrap_samples, overlay_images=ev.overlay_images,
                            workers=ev.workers)
    budget = None if not ev.budget_episodes else meta_val_budget(
        dataset, episodes, inits, result, val_domains=list(splits["meta_val"]), shots=shots, n=ev.budget_episodes,
        settings=settings, device=device, seed=base.seed, ci=ev.ci, bootstrap_samples=ev.bootstrap_samples,
        workers=ev.workers)
    meta_algs = [a for a in algorithms if a != "transfer"]
    meta_val = {a: float(inits[a].extras.get("val_miou", float("nan"))) for a in meta_algs}  # train's choice score
    metrics = write_outputs(result, Path(args.results), domains=domains, shots=shots, inits=list(inits),
                            meta_algs=meta_algs, meta_val=meta_val, no_adapt=ev.no_adapt, ci=ev.ci,
                            bootstrap_samples=ev.bootstrap_samples, seed=base.seed, budget=budget)
    log.info("wrote %s (%d metrics)", args.results, len(metrics))


if __name__ == "__main__":
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="folder of trained inits (models/train)")
    parser.add_argument("--prepared", required=True, help="prepared dataset folder (data/prepared)")
    parser.add_argument("--splits", required=True, help="splits folder (data/splits)")
    parser.add_argument("--results", required=True, help="results folder (results/evaluate)")
    run_stage(main, parser)
