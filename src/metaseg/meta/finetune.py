"""The adaptation API every later stage calls: a trained init + K labelled support images -> a plain DeepLabv3.

One code path for every algorithm (and the ``scratch`` baseline): task BN statistics from the support set, the
2-row head expanded to the domain's C classes (or, for protonet, prototypes baked into the 1x1 conv), then
``steps`` updates of the shared functional inner loop (``metaseg.meta.inner.inner_loop``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaseg.cli import InputError
from metaseg.io import load_torch
from metaseg.meta.inner import Params, UpdateRule, forward, inner_loop, seg_loss, task_buffers
from metaseg.meta.l2o import support_rule
from metaseg.models.backbones import normalization
from metaseg.models.deeplab import BODY_PREFIX, HEAD_NAMES, build_model, inner_param_names
from metaseg.meta.heads import HeadOnly, baked_head_params, deeplab_features, expand_head, expand_rows

log = logging.getLogger(__name__)

Augment = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # normalised images [B,3,H,W], labels [B,H,W]


@dataclass
class TrainedInit:
    """Everything adaptation needs from ``models/train/<alg>.pt``."""

    algorithm: str
    backbone: str
    image_size: int
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    inner_lr: float
    inner_lrs: dict[str, Tensor] | None = None  # Meta-SGD: learned per-parameter rates (2-row head shapes)
    learned_optimizer: dict[str, Tensor] | None = None  # l2o: the LSTM optimiser's and task embedding's weights
    adapt_names: list[str] | None = None  # ANIL: the head only; None = every parameter
    head: Literal["replicated", "prototype"] = "replicated"
    proto_scale: float | None = None  # protonet's learned cosine scale
    output_stride: int = 16
    body_stage: int | None = None  # EfficientNet-Lite: where the body ends (None = the last MBConv stage)
    bn_stats: str = "support"  # which BN layers take the support set's statistics (metaseg.meta.inner.BN_STATS)
    extras: dict[str, Any] = field(default_factory=dict)  # aux_weight, dice_weight, mean, std, config, ...

    @property
    def aux(self) -> bool:
        return "aux_classifier.4.weight" in self.params

    @property
    def norm(self) -> tuple[list[float], list[float]]:
        """(mean, std) of the input this init expects: recorded at training, else the backbone's own."""
        mean, std = normalization(self.backbone)
        return list(self.extras.get("mean", mean)), list(self.extras.get("std", std))


@lru_cache(maxsize=4)
def _skeleton(backbone: str, aux: bool, output_stride: int, body_stage: int | None) -> nn.Module:
    # functional_call supplies every tensor, so the module's own (random) weights are never used
    return build_model(backbone, aux_loss=aux, output_stride=output_stride, body_stage=body_stage)


def skeleton(init: TrainedInit, device: torch.device | str) -> nn.Module:
    return _skeleton(init.backbone, init.aux, init.output_stride, init.body_stage).to(device)


def load_init(path: str | Path, device: torch.device | str = "cpu") -> TrainedInit:
    """Read ``models/train/<alg>.pt`` (written by ``metaseg.train``)."""
    obj = load_torch(path, what="trained init", hint="run the train stage first", weights_only=False,
                     map_location=device)
    if not isinstance(obj, dict) or "params" not in obj or "algorithm" not in obj:
        raise InputError(f"{path}: not a metaseg trained init (expected a dict with 'algorithm' and 'params')")
    return TrainedInit(algorithm=obj["algorithm"], backbone=obj["backbone"], image_size=int(obj["image_size"]),
                       params=obj["params"], buffers=obj["buffers"], inner_lr=float(obj["inner_lr"]),
                       inner_lrs=obj.get("inner_lrs"), learned_optimizer=obj.get("learned_optimizer"),
                       adapt_names=obj.get("adapt_names"),
                       head=obj.get("head", "replicated"), proto_scale=obj.get("proto_scale"),
                       output_stride=int(obj.get("output_stride", 16)), body_stage=obj.get("body_stage"),
                       bn_stats=obj.get("bn_stats", "support"),
                       extras={**obj.get("extras", {}), **{k: obj[k] for k in ("config", "val_miou") if k in obj}})


def init_to_dict(init: TrainedInit) -> dict[str, Any]:
    """The checkpoint dict ``load_init`` reads (tensors detached, on CPU)."""
    cpu = lambda d: None if d is None else {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
    return {"algorithm": init.algorithm, "backbone": init.backbone, "image_size": init.image_size,
            "params": cpu(init.params), "buffers": cpu(init.buffers), "inner_lr": float(init.inner_lr),
            "inner_lrs": cpu(init.inner_lrs), "learned_optimizer": cpu(init.learned_optimizer),
            "adapt_names": init.adapt_names, "head": init.head,
            "proto_scale": init.proto_scale, "output_stride": init.output_stride, "body_stage": init.body_stage,
            "bn_stats": init.bn_stats,
            "extras": init.extras}


def fresh_init(name: str, backbone: str, image_size: int, *, inner_lr: float, seed: int,
               backbone_weights: str | None, loss: dict[str, Any], aux_loss: bool = True, output_stride: int = 16,
               body_stage: int | None = None, bn_stats: str = "support", inner_params: str = "all") -> TrainedInit:
    """An init that saw no meta-train domain: ``scratch`` (random weights, ``backbone_weights=None``) or
    ``imagenet`` (the pre-trained body, a fresh decoder). Its head is the replicated one, and it adapts with the
    same loss settings (``loss``: aux_weight, dice_weight, class_balance, inner_clip) and parameters as a trained
    init, so the baselines differ from the trained inits in their weights alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(backbone, aux_loss=aux_loss, backbone_weights=backbone_weights,
                            output_stride=output_stride, body_stage=body_stage)
    mean, std = normalization(backbone)
    names = inner_param_names(model, inner_params)
    return TrainedInit(algorithm=name, backbone=backbone, image_size=image_size,
                       params={k: v.detach().clone() for k, v in model.named_parameters()},
                       buffers={k: v.detach().clone() for k, v in model.named_buffers()}, inner_lr=inner_lr,
                       adapt_names=sorted(names) if names is not None else None, output_stride=output_stride,
                       body_stage=body_stage,
                       bn_stats=bn_stats if backbone_weights is not None else "support",
                       extras={**loss, "mean": list(mean), "std": list(std)})


class BodyFeatureCache:
    """The fixed body's features of the last input, shared by the per-step models of one head-only adaptation
    (the adaptation curve predicts the same query after every step; only the 1x1 head changes). The input tensor
    itself is kept and compared by identity, so a new tensor at a reused address can never hit a stale entry."""

    def __init__(self, module: nn.Module, params: Params, buffers: Params) -> None:
        self.module, self.params, self.buffers = module, params, buffers
        self._x: Tensor | None = None
        self._feats: dict[str, Tensor] = {}

    def features(self, x: Tensor) -> dict[str, Tensor]:
        if self._x is not x:
            self._feats = deeplab_features(self.module, self.params, self.buffers, x)
            self._x = x
        return self._feats


class AdaptedModel:
    """An adapted task model: params + task BN buffers over the shared skeleton."""

    def __init__(self, module: nn.Module, params: Params, buffers: Params, backbone: str, num_classes: int,
                 body_cache: BodyFeatureCache | None = None) -> None:
        self.module, self.params, self.buffers = module, params, buffers
        self.backbone, self.num_classes = backbone, num_classes
        self.support_loss_before = float("nan")
        self.support_loss_after = float("nan")
        self._body_cache = body_cache  # set only while the body params are the cache's (head-only adaptation)

    @torch.no_grad()
    def predict_logits(self, x: Tensor) -> Tensor:
        """[B, C+1, H, W] logits (eval BN with the task's support statistics)."""
        if self._body_cache is not None:
            head = HeadOnly(self.module, tuple(x.shape[-2:]))
            names = [n for n, _ in head.named_parameters()]
            out = forward(head, {n: self.params[n] for n in names}, {}, self._body_cache.features(x))
        else:
            out = forward(self.module, self.params, self.buffers, x)
        return out["out"] if isinstance(out, dict) else out

    def state_dict(self) -> dict[str, Tensor]:
        """Plain torchvision DeepLabv3 state_dict, num_classes = C+1, aux dropped, task stats as running stats."""
        sd = {**self.params, **self.buffers}
        return {k: v.detach().cpu().clone() for k, v in sd.items() if not k.startswith("aux_classifier.")}


def _rates(init: TrainedInit, lr: float | None, body_lr: float | None, params: Params, num_classes: int,
           device: torch.device) -> float | dict[str, Tensor]:
    """The step size: one float, or a tensor per parameter (Meta-SGD's learned rates; a separate body rate)."""
    base = init.inner_lr if lr is None else lr
    if init.inner_lrs is None and body_lr is None:
        return base
    if init.inner_lrs is None:
        return {k: torch.tensor(body_lr if k.startswith(BODY_PREFIX) else base, dtype=v.dtype, device=v.device)
                for k, v in params.items()}
    factor, body_factor = base / init.inner_lr, (base if body_lr is None else body_lr) / init.inner_lr
    return {k: (expand_rows(v, num_classes) if k in HEAD_NAMES else v).detach().to(device)
            * (body_factor if k.startswith(BODY_PREFIX) else factor) for k, v in init.inner_lrs.items()}


def adapt(init: TrainedInit, support_x: Tensor, support_y: Tensor, num_classes: int, *, steps: int,
          lr: float | None = None, body_lr: float | None = None, optimizer: str | UpdateRule = "sgd",
          augment: Augment | None = None,
          batch_size: int | None = None, on_step: Callable[[int, AdaptedModel], None] | None = None,
          on_step_at: Collection[int] | None = None, generator: torch.Generator | None = None) -> AdaptedModel:
    """Adapt ``init`` to a task with labels 0..num_classes (255 ignore) from its support set.

    lr None = the init's inner lr (Meta-SGD: its learned rates, scaled by lr / inner_lr when lr is given);
    ``body_lr`` (None = lr) is the backbone's rate (Meta-SGD: its body rates scaled by body_lr / inner_lr).
    ANIL adapts only the head; protonet bakes prototypes into the head first; l2o adapts the decoder with its
    learned optimiser (``metaseg.meta.l2o``: its own update, so lr, body_lr and optimizer do not apply to it, the
    step budget does), conditioned on this support set's embedding. ``augment(x, y)`` acts on
    normalised tensors; ``batch_size`` draws that many support images per step (``generator`` seeds both).
    ``on_step(step, model)`` runs at step 0 (before any update) and after each step (only at the steps in
    ``on_step_at`` when given: building the model costs a forward over the support set).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = support_x.device
    module = skeleton(init, device)
    params = {k: v.detach().to(device) for k, v in init.params.items()}
    stored = {k: v.to(device) for k, v in init.buffers.items()}
    buffers = task_buffers(module, params, stored, support_x, bn_stats=init.bn_stats)
    if init.head == "prototype":
        with torch.no_grad():
            feats = deeplab_features(module, params, buffers, support_x)
            params.update(baked_head_params(feats, support_y, num_classes, float(init.proto_scale or 1.0)))
    else:
        params = expand_head(params, num_classes)
    aux_w = float(init.extras.get("aux_weight", 0.4))
    dice_w = float(init.extras.get("dice_weight", 0.0))
    balance = bool(init.extras.get("class_balance", False))
    loss_fn = lambda out, y: seg_loss(out, y, aux_weight=aux_w, dice_weight=dice_w, balance=balance)  # noqa: E731

    batches = None
    if augment is not None or (batch_size is not None and batch_size < len(support_x)):
        def batches(step: int) -> tuple[Tensor, Tensor]:
            xb, yb = support_x, support_y
            if batch_size is not None and batch_size < len(support_x):
                idx = torch.randperm(len(support_x), generator=generator)[:batch_size].to(device)
                xb, yb = xb[idx], yb[idx]
            return augment(xb, yb) if augment is not None else (xb, yb)

    if init.learned_optimizer is not None:  # l2o: its LSTM writes every update (lr, body_lr, optimizer unused)
        optimizer = support_rule(init.learned_optimizer, module, params, buffers, support_x, support_y, init.inner_lr)
    names = set(init.adapt_names) if init.adapt_names is not None else None
    head_only = names is not None and names <= set(HEAD_NAMES) and batches is None
    cache = BodyFeatureCache(module, params, buffers) if head_only and on_step is not None else None

    def stats(step: int, p: Params) -> Params:
        """The support's BN statistics under params ``p`` (what the adapted model predicts with)."""
        if head_only or step == 0:
            return buffers  # the 1x1 head has no BN: the body's statistics do not move
        return task_buffers(module, p, stored, support_x, bn_stats=init.bn_stats)

    def wrap(step: int, p: Params) -> None:
        if on_step is not None and (on_step_at is None or step in on_step_at):
            p = {k: v.detach() for k, v in p.items()}
            on_step(step, AdaptedModel(module, p, stats(step, p), init.backbone, num_classes, body_cache=cache))

    losses: list[float] = []
    rates, clip = _rates(init, lr, body_lr, params, num_classes, device), init.extras.get("inner_clip")
    if head_only:
        # head-only (ANIL, protonet): the body is fixed, so its features are computed once; same loop on the 1x1
        # convs (and the per-step models of on_step predict from cached body features, see BodyFeatureCache)
        with torch.no_grad():
            feats = deeplab_features(module, params, buffers, support_x)
        head = HeadOnly(module, tuple(support_x.shape[-2:]))
        fast_head = inner_loop(head, {k: params[k] for k in names}, {}, feats, support_y, steps=steps,
                               lr={k: rates[k] for k in names} if isinstance(rates, dict) else rates,
                               adapt_names=None, create_graph=False, loss_fn=loss_fn, optimizer=optimizer,
                               on_step=(lambda s, p: wrap(s, {**params, **p})) if on_step is not None else None,
                               losses=losses, clip=clip)
        fast = {**params, **fast_head}
    else:
        fast = inner_loop(module, params, buffers, support_x, support_y, steps=steps, lr=rates, adapt_names=names,
                          create_graph=False, loss_fn=loss_fn, on_step=wrap if on_step is not None else None,
                          optimizer=optimizer, batches=batches, losses=losses, clip=clip, bn_stats=init.bn_stats)
    final = {k: v.detach() for k, v in fast.items()}
    adapted = AdaptedModel(module, final, stats(steps, final), init.backbone, num_classes)
    with torch.no_grad():
        if head_only:  # same value, from the cached support features
            after = float(loss_fn(forward(head, {k: adapted.params[k] for k in fast_head}, {}, feats), support_y))
        else:
            after = float(loss_fn(forward(module, adapted.params, adapted.buffers, support_x), support_y))
    adapted.support_loss_before = losses[0] if losses and batches is None else (after if steps == 0 else float("nan"))
    if steps > 0 and batches is not None:
        with torch.no_grad():
            adapted.support_loss_before = float(loss_fn(forward(module, params, buffers, support_x), support_y))
    adapted.support_loss_after = after
    return adapted
