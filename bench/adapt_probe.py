"""What the `imagenet` init (pretrained body, fresh decoder, no source training) reaches on stored episodes.

python bench/adapt_probe.py --prepared DIR --episodes-file FILE --domain NAME [--shots 1,5] [--n 6]
                            [--optimizer adam] [--lr 1e-3] [--body-lr 1e-4] [--steps 20]
                            [--layers all|decoder|head] [--bn-stats pretrained|support] [--body-stage N]

Builds the init with ``finetune.fresh_init`` (or loads a trained one, ``--init``) and scores it with the
evaluate stage's own ``evaluate_inits`` on the first ``--n`` stored episodes of ``--domain`` per K, printing the
accumulated foreground mIoU on the evaluate curve's step grid (0 / 1 / 2 / 3 / 5 / 10 / 15 / 20 / ...). ``--body-lr`` is ``adapt.body_lr`` (the
backbone's own rate); ``--body-stage N`` is ``model.body_stage`` (the EfficientNet-Lite body ends at
``features[N]``; 5 = Lite0's 112-channel stride-16 stage). Tune on meta-val domains only; a meta-test domain is
for diagnosis.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from metaseg.data.prepared import PreparedDataset  # noqa: E402
from metaseg.data.splits import load_episodes  # noqa: E402
from metaseg.adapt import AdaptSettings  # noqa: E402
from metaseg.evaluate import evaluate_inits  # noqa: E402
from metaseg.meta import finetune  # noqa: E402
from metaseg.meta.inner import BN_STATS  # noqa: E402
from metaseg.models.deeplab import INNER_PARAMS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True)
    ap.add_argument("--episodes-file", required=True, help="data/splits/episodes.json of a splits run")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--shots", default="1,5")
    ap.add_argument("--n", type=int, default=6, help="episodes per K")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--output-stride", type=int, choices=(8, 16), default=16)
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--body-lr", type=float, default=None, help="backbone rate (default: --lr)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", choices=INNER_PARAMS, default="all")
    ap.add_argument("--bn-stats", choices=BN_STATS, default="pretrained")
    ap.add_argument("--body-stage", type=int, choices=(4, 5, 6, 7), default=None)
    ap.add_argument("--aux-weight", type=float, default=0.4, help="train.aux_weight (0 = no aux loss)")
    ap.add_argument("--class-balance", choices=("on", "off"), default="on", help="train.class_balance")
    ap.add_argument("--init", default=None, help="models/train/<alg>.pt instead of the imagenet init")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ds = PreparedDataset(args.prepared)
    episodes = load_episodes(args.episodes_file)
    if args.domain not in episodes:
        raise SystemExit(f"{args.episodes_file}: no episodes for domain '{args.domain}' "
                         f"(has: {', '.join(sorted(episodes))})")
    if args.init is not None:  # a trained init: its own architecture, BN mode and adapted layers
        init = finetune.load_init(args.init)
        args.backbone, args.output_stride, args.body_stage = init.backbone, init.output_stride, init.body_stage
        args.bn_stats, args.layers = init.bn_stats, "head" if init.adapt_names else "all"
    else:
        init = finetune.fresh_init(
            "imagenet", args.backbone, ds.image_size, inner_lr=args.lr, seed=0, backbone_weights="imagenet",
            loss={"aux_weight": args.aux_weight, "dice_weight": 0.0,
                  "class_balance": args.class_balance == "on", "inner_clip": 10.0},
            output_stride=args.output_stride, body_stage=args.body_stage, bn_stats=args.bn_stats,
            inner_params=args.layers)
    print(f"{args.domain} {ds.image_size}px {init.algorithm} {args.backbone} os{args.output_stride} "
          f"body_stage={args.body_stage} layers={args.layers} bn={args.bn_stats} {args.optimizer} lr={args.lr} "
          f"body_lr={args.body_lr} aux={args.aux_weight} balance={args.class_balance}")
    settings = AdaptSettings(steps=args.steps, lr=args.lr, optimizer=args.optimizer, body_lr=args.body_lr)
    t0 = time.perf_counter()
    for k in map(int, args.shots.split(",")):
        result = evaluate_inits(ds, {args.domain: {k: episodes[args.domain][k][: args.n]}}, {init.algorithm: init},
                                domains=[args.domain], shots=[k], settings=settings, device=torch.device("cpu"),
                                seed=0, progress=False)
        curve = result.curves[(args.domain, init.algorithm, k)]
        print(f"  K={k}: " + "  ".join(f"{s}:{100 * c.miou:.1f}" for s, c in zip(result.curve_steps, curve)) +
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
