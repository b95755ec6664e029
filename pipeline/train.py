"""Stage `train`: meta-train one algorithm on the meta-train domains, keep the best init by meta-validation.

python -m pipeline.train --params params.yaml --algorithm fomaml --prepared data/prepared --splits data/splits \
    --out models/train/fomaml.pt --checkpoints models/checkpoints/fomaml --results results/train/fomaml

Resumes from <checkpoints>/last.pt when its config matches. METASEG_STOP_AFTER=N stops after iteration N
(simulates an interruption; used to test resuming).
"""
from __future__ import annotations

import argparse
import os
import sys

from metaseg.cli import run_stage, stage_parser
from metaseg.config import ALGORITHMS, load_config
from metaseg.train import TrainingDiverged, train


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, "base", "model", "train", "adapt")
    stop = os.environ.get("METASEG_STOP_AFTER")
    try:
        train(args.algorithm, prepared=args.prepared, splits=args.splits, out=args.out, checkpoints=args.checkpoints,
              results=args.results, base=cfg["base"], model_cfg=cfg["model"], cfg=cfg["train"],
              adapt_cfg=cfg["adapt"],
              stop_after=int(stop) if stop else None)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--algorithm", required=True, choices=ALGORITHMS)
    parser.add_argument("--prepared", required=True, help="prepared dataset folder (data/prepared)")
    parser.add_argument("--splits", required=True, help="splits folder (data/splits)")
    parser.add_argument("--out", required=True, help="trained init file (models/train/<alg>.pt)")
    parser.add_argument("--checkpoints", required=True, help="checkpoint folder (models/checkpoints/<alg>)")
    parser.add_argument("--results", required=True, help="DVCLive folder (results/train/<alg>)")
    run_stage(main, parser)
