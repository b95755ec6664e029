"""Meta-learning algorithms as update rules over the one functional inner loop (``metaseg.meta.inner``).

``Algorithm.step(tasks) -> {"loss": meta-loss, "miou": query mIoU after adaptation}`` owns the outer optimiser
and schedule; ``state_dict`` / ``load_state_dict`` cover everything a resume needs; ``export_init`` returns the
``TrainedInit`` that adaptation reads. Algorithms differ only in which params adapt and how the outer update is
formed:

maml      second order through the inner loop            fomaml   first order (d adapted / d init = I)
metasgd   learned per-element inner rates (second order)  anil     inner loop on the 1x1 head only (on cached
reptile   outer step = interpolation towards the support-adapted   body features), second order
          weights: theta += eps * (mean adapted - theta)  protonet cosine prototypes x learned scale, no inner loop
transfer  plain supervised training (train-mode BN) on the tasks' pooled images, labels binarised (fg = any class)
l2o       learned update rule: an LSTM per decoder coordinate, conditioned on a task embedding, writes the inner
          steps (body fixed inside); second order through the unrolled steps, plus a contrastive embedding term

Several processes (torchrun, ``metaseg.distributed``): each process's ``step`` gets its share of the meta-batch,
and every ``step`` ends in ``Algorithm._outer_update``, the one place where the meta-gradient is averaged over
processes before the outer step. A new algorithm that leaves its (pseudo-)gradient in ``.grad`` and ends its
``step`` there runs on several processes as it is.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from metaseg import distributed
from metaseg.config import ALGORITHMS  # the one list of algorithm names (re-exported)
from metaseg.scoring import iou_of_labels
from metaseg.meta.finetune import TrainedInit
from metaseg.meta.inner import IGNORE, Params, forward, inner_loop, seg_loss, support_stat_layer, task_buffers
from metaseg.models.backbones import normalization
from metaseg.models.deeplab import BODY_PREFIX, HEAD_NAMES, inner_param_names
from metaseg.meta.heads import (DecoderOnly, HeadOnly, body_channels, body_features, deeplab_features, expand_head,
                                expand_rows, proto_head)
from metaseg.meta.l2o import LearnedOptimizer, contrastive, task_features


def train_mode(model: nn.Module, bn_stats: str) -> None:
    """``model.train()`` for supervised training, except the BN layers that keep their stored statistics under
    ``bn_stats`` (the pre-trained backbone's, with ``pretrained``): those stay in eval mode, frozen."""
    model.train()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not support_stat_layer(name, bn_stats):
            m.eval()


def foreground_miou(logits: Tensor, y: Tensor, num_classes: int) -> float:
    """The evaluation mIoU (``metaseg.scoring.iou_of_labels``) of one batch's argmax: classes 1..C with a
    non-empty union, pixels summed over the batch (255 ignored); NaN when no class occurs."""
    return iou_of_labels(logits.argmax(1), y, num_classes)[0]


def _ways(task: Any) -> int:
    if getattr(task, "class_ids", ()):
        return len(task.class_ids)
    return max(1, int(task.support_y[task.support_y != IGNORE].max()))


class Algorithm:
    """Base: outer optimiser + schedule over ``meta_parameters()``; subclasses implement ``task_loss``."""

    name = "base"
    create_graph = False
    adapt_names: set[str] | None = None
    updates_buffers = False  # train-mode BN moves the stored running statistics (transfer); meta-learners never do

    def __init__(self, model: nn.Module, *, inner_steps: int = 2, inner_lr: float = 1e-3, outer_lr: float = 1e-3,
                 outer_optimizer: str = "adam", weight_decay: float = 0.0, schedule: str = "constant",
                 iterations: int = 100, aux_weight: float = 0.4,
                 dice_weight: float = 0.0, class_balance: bool = False, inner_clip: float | None = None,
                 outer_clip: float | None = None, bn_stats: str = "support", inner_params: str = "all",
                 amp_dtype: torch.dtype | None = None) -> None:
        self.model, self.inner_steps, self.inner_lr = model, inner_steps, inner_lr
        self.bn_stats = bn_stats
        self.adapt_names = inner_param_names(model, inner_params)
        self.inner_clip, self.outer_clip, self.class_balance = inner_clip, outer_clip, class_balance
        self.aux_weight, self.dice_weight, self.amp_dtype = aux_weight, dice_weight, amp_dtype
        self._setup()
        self.optimizer = self._make_optimizer(outer_optimizer, outer_lr, weight_decay)
        sched = torch.optim.lr_scheduler
        self.scheduler = (sched.CosineAnnealingLR(self.optimizer, T_max=max(1, iterations)) if schedule == "cosine"
                          else sched.ConstantLR(self.optimizer, factor=1.0, total_iters=0))
        self.scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16 and self.device.type == "cuda")

    # --- hooks -------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        pass

    def extra_parameters(self) -> dict[str, Tensor]:
        return {}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The outer optimiser's parameter groups (one, at ``lr``, unless an algorithm gives its own weights theirs)."""
        return [{"params": list(self.meta_parameters()), "lr": lr}]

    def batch_loss(self) -> tuple[Tensor | None, dict[str, float]]:
        """A term over the whole meta-batch, added after the tasks' losses (l2o: its contrastive term), with
        figures to log; None = none. Under several processes it must be the same on every process (the whole
        meta-batch's), so that averaging the processes' gradients leaves it as one process computes it."""
        return None, {}

    def task_loss(self, task: Any) -> tuple[Tensor, float]:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def meta_parameters(self) -> Iterator[Tensor]:
        yield from self.model.parameters()
        yield from self.extra_parameters().values()

    def _make_optimizer(self, kind: str, lr: float, wd: float) -> torch.optim.Optimizer:
        params = self.param_groups(lr)
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
        if kind == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)

    def _clip_outer(self) -> None:
        if self.outer_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(list(self.meta_parameters()), self.outer_clip)

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss_fn(self, out: Any, y: Tensor) -> Tensor:
        return seg_loss(out, y, aux_weight=self.aux_weight, dice_weight=self.dice_weight, balance=self.class_balance)

    def params(self) -> Params:
        return dict(self.model.named_parameters())

    def buffers(self) -> Params:
        return dict(self.model.named_buffers())

    def inner_rates(self, ways: int) -> float | dict[str, Tensor]:
        return self.inner_lr

    def adapted_query(self, task: Any) -> tuple[Any, Params]:
        """Task BN stats, expanded head, inner loop on the support set; returns (query outputs, adapted params)."""
        ways = _ways(task)
        params = self.params()
        tb = task_buffers(self.model, params, self.buffers(), task.support_x, bn_stats=self.bn_stats)
        fast = inner_loop(self.model, expand_head(params, ways), tb, task.support_x, task.support_y,
                          steps=self.inner_steps, lr=self.inner_rates(ways), adapt_names=self.adapt_names,
                          create_graph=self.create_graph, loss_fn=self.loss_fn, clip=self.inner_clip,
                          bn_stats=self.bn_stats)
        if self.inner_steps > 0:  # the query is predicted with the support's statistics under the adapted params
            tb = task_buffers(self.model, fast, self.buffers(), task.support_x, bn_stats=self.bn_stats)
        return forward(self.model, fast, tb, task.query_x), fast

    def step(self, tasks: list[Any]) -> dict[str, float]:
        """One outer update from ``tasks``; returns mean meta-loss and query mIoU (after adaptation)."""
        self.optimizer.zero_grad(set_to_none=True)
        losses, mious = [], []
        for task in tasks:
            with self.autocast():
                loss, miou = self.task_loss(task)
            self.scaler.scale(loss / len(tasks)).backward()
            losses.append(float(loss.detach()))
            mious.append(miou)
        extra, logs = self.batch_loss()
        if extra is not None:  # a term over the whole meta-batch (l2o's contrastive term)
            self.scaler.scale(extra).backward()
        return {**self._outer_update(losses, mious), **logs}

    def _outer_update(self, losses: list[float], mious: list[float]) -> dict[str, float]:
        """The end of every ``step``: the meta-gradient averaged over processes, clipped, the outer step taken.

        On entry ``.grad`` of ``meta_parameters()`` holds this process's mean over its ``len(losses)`` tasks (scaled
        by ``self.scaler``). Under torchrun ``distributed.average_grads`` makes it the mean over every process's
        tasks, weighted by their counts: the single-process mean over the whole meta-batch, uneven shares
        included, so every process clips and steps identically. In one process it is a no-op. Returns the
        meta-batch's mean loss and query mIoU (NaN mIoUs left out), over all processes."""
        distributed.average_grads(self.meta_parameters(), len(losses))
        if self.updates_buffers:
            distributed.average_buffers(self.model.buffers(), len(losses))
        self._clip_outer()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        scored = [v for v in mious if not math.isnan(v)]
        loss_sum, n, miou_sum, n_scored = distributed.world_sum([sum(losses), len(losses), sum(scored), len(scored)])
        return {"loss": loss_sum / n, "miou": miou_sum / n_scored if n_scored else float("nan")}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "extra": {k: v.detach().clone() for k, v in self.extra_parameters().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for k, v in self.extra_parameters().items():
                v.copy_(state["extra"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def export_init(self, *, backbone: str, image_size: int, output_stride: int = 16, body_stage: int | None = None,
                    **extras: Any) -> TrainedInit:
        mean, std = normalization(backbone)
        return TrainedInit(algorithm=self.name, backbone=backbone, image_size=image_size,
                           params={k: v.detach().cpu().clone() for k, v in self.model.named_parameters()},
                           buffers={k: v.detach().cpu().clone() for k, v in self.model.named_buffers()},
                           inner_lr=self.inner_lr, adapt_names=sorted(self.adapt_names) if self.adapt_names else None,
                           output_stride=output_stride, body_stage=body_stage, bn_stats=self.bn_stats,
                           extras={"aux_weight": self.aux_weight, "dice_weight": self.dice_weight,
                                   "inner_clip": self.inner_clip, "class_balance": self.class_balance,
                                   "mean": list(mean), "std": list(std), **extras})


class MAML(Algorithm):
    name, create_graph = "maml", True

    def task_loss(self, task: Any) -> tuple[Tensor, float]:
        out, _ = self.adapted_query(task)
        return self.loss_fn(out, task.query_y), foreground_miou(out["out"].detach(), task.query_y, _ways(task))


class FOMAML(MAML):
    name, create_graph = "fomaml", False


class MetaSGD(MAML):
    name, create_graph = "metasgd", True

    def _setup(self) -> None:
        self.lrs = {k: nn.Parameter(torch.full_like(v.detach(), self.inner_lr))
                    for k, v in self.model.named_parameters()}

    def extra_parameters(self) -> dict[str, Tensor]:
        return self.lrs

    def inner_rates(self, ways: int) -> dict[str, Tensor]:
        return {k: expand_rows(v, ways) if k in HEAD_NAMES else v for k, v in self.lrs.items()}

    def export_init(self, **kw: Any) -> TrainedInit:
        init = super().export_init(**kw)
        init.inner_lrs = {k: v.detach().cpu().clone() for k, v in self.lrs.items()}
        return init


class ANIL(MAML):
    """Inner loop on the head only, run on body features computed once per task (body frozen inside)."""

    name, create_graph = "anil", True

    def _setup(self) -> None:
        names = {n for n, _ in self.model.named_parameters()}
        self.adapt_names = {n for n in HEAD_NAMES if n in names}

    def adapted_query(self, task: Any) -> tuple[Any, Params]:
        ways, params = _ways(task), self.params()
        tb = task_buffers(self.model, params, self.buffers(), task.support_x, bn_stats=self.bn_stats)
        head = HeadOnly(self.model, tuple(task.support_x.shape[-2:]))
        hp = expand_head({k: params[k] for k in self.adapt_names}, ways)
        fs = deeplab_features(self.model, params, tb, task.support_x)
        fast = inner_loop(head, hp, {}, fs, task.support_y, steps=self.inner_steps, lr=self.inner_lr,
                          adapt_names=None, create_graph=True, loss_fn=self.loss_fn, clip=self.inner_clip)
        return forward(head, fast, {}, deeplab_features(self.model, params, tb, task.query_x)), fast


class L2O(MAML):
    """A learned update rule (``metaseg.meta.l2o``): a coordinate-wise LSTM, conditioned on the task's embedding,
    writes every inner-loop update of the decoder and head. The body stays fixed inside the inner loop (its
    features computed once per task, the inner loop on ``DecoderOnly``): the adaptation rule moves the pretrained
    body 10x slower than the decoder for a reason (a few support images wash its features out), and a fixed body
    spares the unrolled second-order steps a body forward and backward each. Meta-training unrolls ``unroll``
    inner steps and backpropagates the query loss through all of them (second order) into the initialisation
    (body included), the LSTM and the embedding; adaptation runs the same rule for ``adapt.steps``. A contrastive
    term over the meta-batch's embeddings (support and query view of each task) is added at ``contrastive_weight``.
    """

    name, create_graph = "l2o", True

    def __init__(self, model: nn.Module, *, hidden: int = 4, unroll: int = 2, embedding: int = 8,
                 contrastive_weight: float = 0.1, learned_lr: float = 1e-3, **settings: Any) -> None:
        self.hidden, self.unroll, self.embedding = hidden, unroll, embedding
        self.contrastive_weight, self.learned_lr = contrastive_weight, learned_lr
        self._views: list[tuple[str, Tensor, Tensor]] = []  # (domain, support, query task features) per task
        super().__init__(model, **settings)

    def _setup(self) -> None:
        self.adapt_names = inner_param_names(self.model, "decoder")
        p = next(self.model.parameters())
        self.learned = LearnedOptimizer(body_channels(self.model), hidden=self.hidden,
                                        embedding=self.embedding).to(p.device, p.dtype)

    def extra_parameters(self) -> dict[str, Tensor]:
        return {f"l2o.{k}": v for k, v in self.learned.named_parameters()}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters()), "lr": lr},
                {"params": list(self.learned.parameters()), "lr": self.learned_lr}]

    def adapted_query(self, task: Any) -> tuple[Any, Params]:
        ways, params = _ways(task), self.params()
        tb = task_buffers(self.model, params, self.buffers(), task.support_x, bn_stats=self.bn_stats)
        fs, fq = (body_features(self.model, params, tb, x) for x in (task.support_x, task.query_x))
        decoder = DecoderOnly(self.model, tuple(task.support_x.shape[-2:]))
        db = {k: v for k, v in tb.items() if not k.startswith(BODY_PREFIX)}
        view = task_features(fs["out"].detach(), task.support_y)  # the embedding reads the body, never trains it
        self._views.append((getattr(task, "domain", ""), view, task_features(fq["out"].detach(), task.query_y)))
        rule = self.learned.rule(self.learned.embed(view), self.inner_lr)
        fast = inner_loop(decoder, expand_head({k: params[k] for k in self.adapt_names}, ways), db, fs,
                          task.support_y, steps=self.unroll, lr=self.inner_lr, optimizer=rule, adapt_names=None,
                          create_graph=True, loss_fn=self.loss_fn, clip=self.inner_clip, bn_stats=self.bn_stats)
        tq = task_buffers(decoder, fast, db, fs, bn_stats=self.bn_stats)  # the support's statistics, adapted params
        return forward(decoder, fast, tq, fq), fast

    def step(self, tasks: list[Any]) -> dict[str, float]:
        self._views = []
        return super().step(tasks)

    def batch_loss(self) -> tuple[Tensor | None, dict[str, float]]:
        views, self._views = self._views, []
        if self.contrastive_weight == 0:
            return None, {}
        if distributed.active():  # every process: the term over the whole meta-batch (in its order), the same on all,
            # so averaging the processes' gradients (weighted by their task counts) leaves it as one process has it
            shares = distributed.gather_objects([(d, s.cpu(), q.cpu()) for d, s, q in views])
            views = [shares[i % len(shares)][i // len(shares)] for i in range(sum(map(len, shares)))]
        if not views:
            return None, {}
        device = next(self.learned.parameters()).device
        pooled = torch.stack([v.to(device) for _, support, query in views for v in (support, query)])
        loss, logs = contrastive(self.learned.embed(pooled), [d for d, _, _ in views for _ in range(2)])
        return self.contrastive_weight * loss, logs

    def export_init(self, **kw: Any) -> TrainedInit:
        init = super().export_init(**kw)
        init.learned_optimizer = {k: v.detach().cpu().clone() for k, v in self.learned.state_dict().items()}
        return init


class ProtoNet(Algorithm):
    name = "protonet"

    def _setup(self) -> None:
        self.scale = nn.Parameter(torch.tensor(10.0, device=self.device))

    def extra_parameters(self) -> dict[str, Tensor]:
        return {"scale": self.scale}

    def task_loss(self, task: Any) -> tuple[Tensor, float]:
        ways, params = _ways(task), self.params()
        tb = task_buffers(self.model, params, self.buffers(), task.support_x, bn_stats=self.bn_stats)
        fs = deeplab_features(self.model, params, tb, task.support_x)
        fq = deeplab_features(self.model, params, tb, task.query_x)
        out = proto_head(fq, fs, task.support_y, ways, self.scale, tuple(task.query_x.shape[-2:]))
        return self.loss_fn(out, task.query_y), foreground_miou(out["out"].detach(), task.query_y, ways)

    def export_init(self, **kw: Any) -> TrainedInit:
        init = super().export_init(**kw)
        init.head, init.proto_scale = "prototype", float(self.scale.detach())
        # fine-tuning after baking touches the head only: the body was never meta-trained to take inner steps
        # (full-network steps at the inner lr wreck the prototype features: support loss 0.45 -> 577 in one step)
        names = {n for n, _ in self.model.named_parameters()}
        init.adapt_names = sorted(n for n in HEAD_NAMES if n in names)
        return init


class Reptile(Algorithm):
    """Inner loop (first order) on the support set; outer: theta <- theta + eps * (mean adapted - theta).

    The inner loop sees the support set only (as at test time): with BN statistics from the support, query
    images of a random-init model give huge losses, and stepping on them diverges.

    The outer step is the configured outer optimiser (``train.outer_optimizer``, ``outer_lr``, ``weight_decay``,
    ``schedule``, like every other algorithm) on the pseudo-gradient theta - mean(adapted): with ``sgd`` its first
    step is exactly the interpolation with eps = outer_lr (momentum builds up after), with ``adam`` it is the Adam
    variant of the Reptile paper. Expanded head rows are folded back: fg = mean of fg rows.
    """

    name = "reptile"

    def step(self, tasks: list[Any]) -> dict[str, float]:
        theta = {k: v.detach() for k, v in self.model.named_parameters()}
        mean = {k: torch.zeros_like(v) for k, v in theta.items()}
        losses, mious = [], []
        for task in tasks:
            ways = _ways(task)
            x, y = task.support_x, task.support_y
            with self.autocast():
                tb = task_buffers(self.model, theta, self.buffers(), task.support_x,
                                  bn_stats=self.bn_stats)
                fast = inner_loop(self.model, expand_head(theta, ways), tb, x, y, steps=self.inner_steps,
                                  lr=self.inner_lr, adapt_names=self.adapt_names, create_graph=False, loss_fn=self.loss_fn,
                                  clip=self.inner_clip, bn_stats=self.bn_stats)
                with torch.no_grad():
                    tb = task_buffers(self.model, fast, self.buffers(), task.support_x, bn_stats=self.bn_stats)
                    out = forward(self.model, fast, tb, task.query_x)
                    losses.append(float(self.loss_fn(out, task.query_y)))
            mious.append(foreground_miou(out["out"], task.query_y, ways))
            for k, v in fast.items():
                v = v.detach()
                if k in HEAD_NAMES:
                    v = torch.cat([v[:1], v[1:].mean(0, keepdim=True)])
                mean[k] += v / len(tasks)
        for k, p in self.model.named_parameters():  # scaled like a backward pass, so _outer_update treats it as one
            p.grad = self.scaler.scale((theta[k] - mean[k]).to(p.dtype))
        return self._outer_update(losses, mious)


class Transfer(Algorithm):
    """Supervised pre-training: every task image (support + query) in one train-mode batch, binary labels.

    The tasks must carry every class of their domain (``metaseg.train`` assembles them so): the baseline learns
    "any object vs background" on the same images the meta-learners see. A 1-way episode's labels would make one
    task's foreground another's background."""

    name = "transfer"
    updates_buffers = True

    def step(self, tasks: list[Any]) -> dict[str, float]:
        x = torch.cat([t for task in tasks for t in (task.support_x, task.query_x)])
        y = torch.cat([t for task in tasks for t in (task.support_y, task.query_y)])
        y = torch.where((y > 0) & (y != IGNORE), torch.ones_like(y), y)
        train_mode(self.model, self.bn_stats)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.model(x)
            loss = self.loss_fn(out, y)
        self.scaler.scale(loss).backward()
        self.model.eval()
        n = len(tasks)  # one loss over the pooled images: each task weighs the same across processes
        return self._outer_update([float(loss.detach())] * n, [foreground_miou(out["out"].detach(), y, 1)] * n)


_CLASSES: dict[str, type[Algorithm]] = {"maml": MAML, "fomaml": FOMAML, "metasgd": MetaSGD, "anil": ANIL,
                                        "protonet": ProtoNet, "reptile": Reptile, "transfer": Transfer, "l2o": L2O}


def make_algorithm(name: str, model: nn.Module, *, l2o: dict[str, Any] | None = None, **settings: Any) -> Algorithm:
    """``settings``: inner_steps, inner_lr, outer_lr, outer_optimizer, weight_decay, schedule, iterations,
    aux_weight, dice_weight, class_balance, inner_clip, outer_clip, amp_dtype
    (see ``Algorithm.__init__``). ``l2o``: the `train.l2o` block (hidden, unroll, embedding, contrastive_weight,
    learned_lr), read by l2o only."""
    if name not in _CLASSES:
        raise ValueError(f"unknown algorithm '{name}' (expected one of {', '.join(ALGORITHMS)})")
    return _CLASSES[name](model, **((l2o or {}) if name == "l2o" else {}), **settings)
