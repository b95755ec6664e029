"""Throughput of the evaluate loop (episodes/s per init, K = 1 and K = 5) on a small synthetic fixture.

python bench/evaluate.py [--size 128] [--episodes 4] [--steps 10] [--queries 2] [--threads 2]
                         [--backbone mobilenet_v3_large]

Inits are seeded random models (``--backbone``, the train loss defaults) in two adaptation modes that bracket
the real algorithms: ``full`` (every parameter adapts: fomaml, maml, reptile, transfer, scratch; protonet/metasgd
similar) and ``head`` (ANIL).
Each row runs the real loop (episode assembly once, adaptation through finetune, query prediction at every
step for the curve). The last lines extrapolate to a full evaluate stage (domains x inits x K x episodes).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from metaseg.adapt import AdaptSettings  # noqa: E402
from metaseg.config import SplitsConfig, TrainConfig  # noqa: E402
from metaseg.data.prepared import PreparedDataset, write_prepared  # noqa: E402
from metaseg.data.splits import make_splits  # noqa: E402
from metaseg.data.synthetic import generate_domain  # noqa: E402
from metaseg.evaluate import evaluate_inits  # noqa: E402
from metaseg.meta import finetune  # noqa: E402
from metaseg.models.backbones import BACKBONES  # noqa: E402
from metaseg.models.deeplab import HEAD_NAMES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--episodes", type=int, default=4, help="episodes per K measured")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--backbone", choices=BACKBONES, default="mobilenet_v3_large")
    ap.add_argument("--full-inits", type=int, default=4, help="extrapolation: inits that adapt every parameter")
    ap.add_argument("--head-inits", type=int, default=1, help="extrapolation: head-only inits (ANIL)")
    ap.add_argument("--domains", type=int, default=2, help="extrapolation: meta-test domains")
    ap.add_argument("--stage-episodes", type=int, default=50, help="extrapolation: stored episodes per domain and K")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        run(Path(tmp), args)


def run(root: Path, args: argparse.Namespace) -> None:
    write_prepared(root, [generate_domain(n, 48, args.size, 0) for n in ("meadow", "xray")], source="synthetic",
                   image_size=args.size)
    ds = PreparedDataset(root)
    cfg = SplitsConfig(meta_train=["meadow"], meta_val=[], meta_test=["xray"], shots=args.shots,
                       episodes=args.episodes, queries=args.queries, support_pool=0.5, deploy_shots=1)
    episodes = make_splits(ds, cfg, seed=0).episodes
    t = TrainConfig()
    loss = {"aux_weight": t.aux_weight, "dice_weight": t.dice_weight, "class_balance": t.class_balance,
            "inner_clip": t.inner_clip}
    base = finetune.fresh_init("scratch", args.backbone, args.size, inner_lr=1e-4, seed=0, backbone_weights=None,
                                 loss=loss)
    inits = {"full": base, "head": dataclasses.replace(base, adapt_names=list(HEAD_NAMES), inner_lr=0.05)}
    print(f"evaluate loop, {args.backbone}, {args.size} px, steps {args.steps}, {args.queries} queries, "
          f"{args.threads} threads, {args.episodes} episodes per row")
    print(f"{'init':6} {'K':>3} {'episodes/s':>11} {'s/episode':>10}")
    per_ep: dict[tuple[str, int], float] = {}
    for name, init in inits.items():
        for k in args.shots:
            evaluate_inits(ds, {"xray": {k: episodes["xray"][k][:1]}}, {name: init}, domains=["xray"], shots=[k],
                           settings=AdaptSettings(steps=args.steps), device=torch.device("cpu"), seed=0,
                           progress=False)  # warm-up
            t0 = time.perf_counter()
            evaluate_inits(ds, episodes, {name: init}, domains=["xray"], shots=[k],
                           settings=AdaptSettings(steps=args.steps), device=torch.device("cpu"), seed=0,
                           progress=False)
            dt = (time.perf_counter() - t0) / args.episodes
            per_ep[(name, k)] = dt
            print(f"{name:6} {k:>3} {1 / dt:>11.2f} {dt:>10.2f}")
    total = args.domains * args.stage_episodes * sum(
        args.full_inits * per_ep[("full", k)] + args.head_inits * per_ep[("head", k)] for k in args.shots)
    print(f"extrapolated evaluate stage: {args.domains} domains x ({args.full_inits} full + {args.head_inits} head "
          f"inits) x K {args.shots} x {args.stage_episodes} episodes = {total:.0f} s ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
