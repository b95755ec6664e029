"""The `adapt` stage's library: adapt a trained init to a meta-test domain's deployment support set, ship it, score it.

The deployment support set (``deploy.json``) covers every class of the domain, so the adapted model predicts all of
them (labels = the domain's own class ids 1..C). Adaptation goes through the ONE inner loop
(``metaseg.meta.finetune.adapt``) with the `adapt` params; its randomness (support mini-batches, augmentation)
comes from a generator seeded by (seed, domain) only, so every init of a domain sees the same draws and a rerun
gives identical weights. The adapted model is written with ``save_adapted`` and then *reloaded from the file* to
score the domain's test pool: the metrics describe the artefact that ships, not the in-memory model.
"""
from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metaseg.cli import InputError
from metaseg.config import AdaptConfig, ConfigError, ModelConfig, TrainConfig
from metaseg.data.augment import build_augment
from metaseg.data.episodes import Episode
from metaseg.data.prepared import Domain
from metaseg.data.sampler import Norm, episode_batch, normalise
from metaseg.scoring import DomainScorer
from metaseg.meta import finetune
from metaseg.models.adapted import load_adapted, save_adapted

log = logging.getLogger(__name__)

SCRATCH = "scratch"
IMAGENET_INIT = "imagenet"
BASELINES = (SCRATCH, IMAGENET_INIT)  # evaluate.inits: inits that saw no meta-train domain
_DEPLOY_STREAM = 0xADA7
_CHUNK = 16  # test images per forward


@dataclass(frozen=True)
class AdaptSettings:
    """How an init adapts (params `adapt`); shared by the adapt and evaluate stages."""

    steps: int
    lr: float | None = None
    optimizer: str = "sgd"
    augment: bool = False
    batch_size: int | None = None
    body_lr: float | None = None

    @classmethod
    def from_config(cls, cfg: AdaptConfig) -> AdaptSettings:
        return cls(steps=cfg.steps, lr=cfg.lr, optimizer=cfg.optimizer, augment=cfg.augment,
                   batch_size=cfg.batch_size, body_lr=cfg.body_lr)


def support_augment(image_size: int, generator: torch.Generator, norm: Norm) -> finetune.Augment:
    """Joint augmentation on normalised support tensors (albumentations underneath), seeded from ``generator``."""
    aug = build_augment(image_size)
    mean = torch.tensor(norm[0]).view(1, 3, 1, 1)
    std = torch.tensor(norm[1]).view(1, 3, 1, 1)

    def apply(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        seeds = torch.randint(0, 2**31 - 1, (len(x),), generator=generator).tolist()
        images = ((x.detach().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        images = images.permute(0, 2, 3, 1).numpy()
        labels = y.cpu().to(torch.uint8).numpy()  # episode labels are 0..ways and 255: uint8 holds them
        pairs = [aug(images[j], labels[j], s) for j, s in enumerate(seeds)]
        xa = normalise(np.stack([p[0] for p in pairs]), norm).to(x.device)
        ya = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)).to(y.device)
        return xa, ya

    return apply


def run_adapt(init: finetune.TrainedInit, support_x: Tensor, support_y: Tensor, num_classes: int, *,
              settings: AdaptSettings, seed: int, image_size: int,
              on_step: Callable[[int, finetune.AdaptedModel], None] | None = None,
              on_step_at: Collection[int] | None = None) -> finetune.AdaptedModel:
    """``finetune.adapt`` with the `adapt` settings and a fresh CPU generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    augment = support_augment(image_size, generator, init.norm) if settings.augment else None
    return finetune.adapt(init, support_x, support_y, num_classes, steps=settings.steps, lr=settings.lr,
                            body_lr=settings.body_lr, optimizer=settings.optimizer, augment=augment,
                            batch_size=settings.batch_size, on_step=on_step, on_step_at=on_step_at, generator=generator)


def baseline_init(name: str, *, model: ModelConfig, train: TrainConfig, image_size: int, scratch_lr: float,
                  seed: int) -> finetune.TrainedInit:
    """An init that never saw a meta-train domain, adapted like the trained ones (same loss settings, same
    ``train.inner_params``): ``scratch`` = random weights at ``adapt.scratch_lr``; ``imagenet`` = the pre-trained
    body with a fresh decoder at ``train.inner_lr`` (the "does training on the source domains add anything" baseline).
    """
    if name not in BASELINES:
        raise ConfigError(f"'evaluate.inits': unknown init '{name}' (known: {', '.join(BASELINES)}; trained algorithms "
                          f"come from train.algorithms)")
    if name == IMAGENET_INIT and model.backbone_weights is None:
        raise ConfigError("'evaluate.inits': the imagenet init needs model.backbone_weights (it is null)")
    loss = {"aux_weight": train.aux_weight, "dice_weight": train.dice_weight, "class_balance": train.class_balance,
            "inner_clip": train.inner_clip}
    return finetune.fresh_init(name, model.backbone, image_size, seed=seed, loss=loss, aux_loss=model.aux_loss,
                                 inner_lr=scratch_lr if name == SCRATCH else train.inner_lr,
                                 backbone_weights=None if name == SCRATCH else model.backbone_weights,
                                 output_stride=model.output_stride, body_stage=model.body_stage,
                                 bn_stats=model.bn_stats,
                                 inner_params=train.inner_params)


def deploy_seed(seed: int, domain: str) -> int:
    ss = np.random.SeedSequence([seed, zlib.crc32(domain.encode("utf-8")), _DEPLOY_STREAM])
    return int(ss.generate_state(1)[0])


def adapt_deployment(domain: Domain, deploy: Episode, test_pool: list[int], init: finetune.TrainedInit, out: Path,
                     *, settings: AdaptSettings, seed: int,
                     device: torch.device) -> tuple[dict[str, float | int], dict[str, float]]:
    """Adapt on the deployment set, write ``out`` (save_adapted), reload it and score the test pool (percent).
    Returns the flat metrics and, apart, the timings (``adapt_seconds``)."""
    if not deploy.support:
        raise InputError(f"domain '{domain.name}': deployment support set is empty (check deploy.json)")
    if not test_pool:
        raise InputError(f"domain '{domain.name}': test pool is empty (check splits.json)")
    size = int(domain.images.shape[1])
    if init.image_size != size:
        log.warning("init was trained at %d px, domain '%s' is prepared at %d px", init.image_size, domain.name, size)
    t0 = time.perf_counter()
    batch = episode_batch(domain, deploy, norm=init.norm).to(device)
    num_classes = len(deploy.class_ids)
    adapted = run_adapt(init, batch.support_x, batch.support_y, num_classes, settings=settings,
                        seed=deploy_seed(seed, domain.name), image_size=size)
    adapt_s = time.perf_counter() - t0
    if not np.isfinite(adapted.support_loss_after):
        raise ConfigError(f"'adapt.lr': adapting {init.algorithm} to '{domain.name}' diverged (support loss "
                          f"{adapted.support_loss_before:.3g} -> {adapted.support_loss_after}); lower adapt.lr "
                          f"(now {settings.lr or init.inner_lr})")
    class_names = ["background", *(domain.class_names[c - 1] for c in deploy.class_ids)]
    save_adapted(out, adapted.state_dict(), backbone=init.backbone, class_names=class_names, image_size=size,
                 mean=tuple(init.norm[0]), std=tuple(init.norm[1]), output_stride=init.output_stride,
                 body_stage=init.body_stage,
                 domain=domain.name, algorithm=init.algorithm, shots=len(deploy.support), steps=settings.steps,
                 class_ids=list(deploy.class_ids))
    model, _ = load_adapted(out, map_location=str(device))
    model.to(device)
    scorer = DomainScorer(num_classes, device)
    max_diff = 0.0
    with torch.no_grad():
        for start in range(0, len(test_pool), _CHUNK):
            chunk = Episode(domain.name, deploy.class_ids, (), tuple(test_pool[start:start + _CHUNK]))
            qb = episode_batch(domain, chunk, norm=init.norm).to(device)
            logits = model(qb.query_x)["out"]
            if start == 0:  # the shipped file must compute what the inner loop computed
                max_diff = float((logits - adapted.predict_logits(qb.query_x)).abs().max())
            scorer.add(list(range(1, num_classes + 1)), logits.argmax(1), qb.query_y)
    scores = scorer.summary()
    metrics: dict[str, float | int] = {
        "support_loss_before": adapted.support_loss_before, "support_loss_after": adapted.support_loss_after,
        "test_miou": 100 * scores.miou, "test_fbiou": 100 * scores.fbiou, "test_images": len(test_pool),
        "support_images": len(deploy.support), "steps": settings.steps, "reload_max_abs_logit_diff": max_diff,
    }
    for c, iou in scores.class_iou.items():
        metrics[f"test_iou.{class_names[c]}"] = 100 * iou
    log.info("%s / %s: support loss %.3f -> %.3f, test mIoU %.1f, FB-IoU %.1f (%d images)", domain.name,
             init.algorithm, metrics["support_loss_before"], metrics["support_loss_after"], metrics["test_miou"],
             metrics["test_fbiou"], len(test_pool))
    flat = {k: v if isinstance(v, int) else round(float(v), 6) for k, v in metrics.items() if np.isfinite(v)}
    return flat, {"adapt_seconds": round(adapt_s, 6)}
