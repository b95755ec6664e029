"""Stage `train`: meta-train one algorithm on the meta-train domains, keep the best init by meta-validation.

python -m pipeline.train --params params.yaml --algorithm fomaml --prepared data/prepared --splits data/splits \
    --out models/train/fomaml.pt --checkpoints models/checkpoints/fomaml --results results/train/fomaml

Resumes from <checkpoints>/last.pt when its config matches. METASEG_STOP_AFTER=N stops after iteration N
(simulates an interruption; used to test resuming). train.nproc > 1: the script relaunches itself under torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline.train <same arguments>`); several
machines run that torchrun line themselves, one per machine (README, "Several GPUs or machines").
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from metaseg import distributed
from metaseg.cli import choose_device, run_stage, stage_parser
from metaseg.config import ALGORITHMS, ConfigError, load_config
from metaseg.train import TrainingDiverged, train


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, "base", "model", "train", "adapt")
    nproc, nnodes = cfg["train"].nproc, cfg["train"].nnodes
    if nproc * nnodes > 1 and not distributed.launched():
        if nnodes > 1:
            raise ConfigError(f"'train.nnodes': {nnodes} machines run one torchrun each with a shared rendezvous "
                              f"(README, 'Several GPUs or machines'); this command starts one machine's processes")
        sys.stdout.flush()
        os.execv(sys.executable, distributed.torchrun_argv("pipeline.train", sys.argv[1:], nproc=nproc))
    stop = os.environ.get("METASEG_STOP_AFTER")
    rank = 0
    try:
        with distributed.process_group(choose_device(cfg["base"].device), processes=nproc * nnodes,
                                       timeout_s=cfg["train"].timeout_s):
            rank = distributed.rank()
            if rank:
                logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports; the others speak up on trouble only
            train(args.algorithm, prepared=args.prepared, splits=args.splits, out=args.out,
                  checkpoints=args.checkpoints, results=args.results, base=cfg["base"], model_cfg=cfg["model"],
                  cfg=cfg["train"], adapt_cfg=cfg["adapt"], stop_after=int(stop) if stop else None)
    except TrainingDiverged as err:  # every process sees the same (averaged) loss: rank 0 says it
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except distributed.ProcessGroupError as err:  # another process died or hung: this one stops, one line
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
