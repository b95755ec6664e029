"""Upper bound of what a model learns in a CPU budget: plain supervised training, full labels.

python bench/learnability.py [--task objects|classes] [--steps 400] [--batch 8] [--threads 2] [--every 50]
                             [--backbone efficientnet_lite0] [--weights imagenet|none] [--output-stride 16]
                             [--lr 1e-3] [--body-lr 1e-4] [--bn-stats pretrained|support]
                             [--prepared data/prepared] [--splits data/splits/splits.json]

Trains a DeepLabv3 (``--backbone``, default the project's default efficientnet_lite0 with its ImageNet weights;
``--weights none`` = random init; the project's model builder and loss, inputs normalised as that backbone
expects; Adam at ``--lr`` on the decoder and ``--body-lr`` on the backbone)
on the pooled meta-train domains of ``data/prepared`` + ``data/splits`` (run ``make repro`` or ``dvc repro splits``
first), with every label an episode could ever give it:

* ``objects``: foreground = any object (what the transfer baseline learns);
* ``classes``: all four shape classes at once (what a 1-way task's target is drawn from).

Every ``--every`` steps it prints the foreground IoU (mean over foreground classes, pixels pooled) on 16 fixed
images of one meta-train domain, of the meta-val domain(s) and of the meta-test domains, with BatchNorm
statistics from 5 of those images (as adaptation does). If fully supervised training with every label reaches
only a low class IoU in N steps, no few-shot algorithm can be expected to beat that in the same budget: this
separates "the algorithm does not learn" from "nothing learns this here".
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from metaseg.data.prepared import PreparedDataset  # noqa: E402
from metaseg.data.sampler import normalise  # noqa: E402
from metaseg.meta.algorithms import foreground_miou, train_mode  # noqa: E402
from metaseg.meta.inner import BN_STATS, forward, seg_loss, task_buffers  # noqa: E402
from metaseg.models.backbones import BACKBONES, normalization  # noqa: E402
from metaseg.models.deeplab import BODY_PREFIX, build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("objects", "classes"), default="objects")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--splits", default="data/splits/splits.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", choices=BACKBONES, default="efficientnet_lite0")
    ap.add_argument("--weights", choices=("imagenet", "none"), default="imagenet")
    ap.add_argument("--output-stride", type=int, choices=(8, 16), default=16)
    ap.add_argument("--body-lr", type=float, default=None, help="backbone lr (default: --lr)")
    ap.add_argument("--bn-stats", choices=BN_STATS, default="pretrained")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    ds = PreparedDataset(args.prepared)
    roles = json.loads(Path(args.splits).read_text())
    train = roles["meta_train"]
    shown = [train[0], *roles["meta_val"], *roles["meta_test"]]
    num_fg = 1 if args.task == "objects" else max(ds.domain(d).num_classes for d in train)

    if args.weights == "none" and args.bn_stats == "pretrained":
        ap.error("--bn-stats pretrained needs --weights imagenet (a random backbone has no statistics to keep)")
    model = build_model(args.backbone, aux_loss=True, output_stride=args.output_stride,
                        backbone_weights=None if args.weights == "none" else args.weights)
    norm = normalization(args.backbone)
    if num_fg != 1:
        model.classifier[4] = nn.Conv2d(model.classifier[4].in_channels, num_fg + 1, 1)
        model.aux_classifier[4] = nn.Conv2d(model.aux_classifier[4].in_channels, num_fg + 1, 1)
    body = [p for n, p in model.named_parameters() if n.startswith(BODY_PREFIX)]
    decoder = [p for n, p in model.named_parameters() if not n.startswith(BODY_PREFIX)]
    opt = torch.optim.Adam([{"params": body, "lr": args.lr if args.body_lr is None else args.body_lr},
                            {"params": decoder, "lr": args.lr}])

    def labels(masks: np.ndarray) -> torch.Tensor:
        y = torch.from_numpy(masks.astype(np.int64))
        return torch.where((y > 0) & (y != 255), torch.ones_like(y), y) if args.task == "objects" else y

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        domains = [ds.domain(train[rng.integers(len(train))]) for _ in range(args.batch)]
        idx = [(d, int(rng.integers(len(d)))) for d in domains]
        return (normalise(np.stack([d.images[i] for d, i in idx]), norm),
                labels(np.stack([d.masks[i] for d, i in idx])))

    fixed = {}
    for name in shown:
        d = ds.domain(name)
        idx = np.arange(len(d))[-16:]
        fixed[name] = (normalise(d.images[idx], norm), labels(d.masks[idx]))

    def evaluate() -> dict[str, float]:
        model.eval()
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        out = {}
        with torch.no_grad():
            for name, (x, y) in fixed.items():
                tb = task_buffers(model, params, buffers, x[:5], bn_stats=args.bn_stats)
                out[name] = foreground_miou(forward(model, params, tb, x)["out"], y, num_fg)
        return out

    print(f"backbone={args.backbone} weights={args.weights} os={args.output_stride} size={ds.image_size} "
          f"task={args.task} classes={num_fg} train={','.join(train)} batch={args.batch} lr={args.lr} "
          f"body_lr={args.body_lr} bn={args.bn_stats} threads={args.threads}; IoU on 16 images of: {', '.join(shown)}")
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            scores = evaluate()
            print(f"step {step:5d}  {time.perf_counter() - t0:6.0f} s  " +
                  "  ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
        if step == args.steps:
            break
        x, y = draw()
        train_mode(model, args.bn_stats)
        loss = seg_loss(model(x), y, aux_weight=0.4, balance=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
