"""The ONE functional inner loop, shared by meta-training, adaptation and evaluation.

Parameters travel as plain ``{name: Tensor}`` dicts through ``torch.func.functional_call``; the module's own
parameters are never touched. BatchNorm follows docs/design.md: ``task_buffers`` estimates the statistics of a
task's support images into *copies* of the buffers (train-mode BN, no grad), and every other forward here runs
the model in eval mode with those copies, so stored running statistics never change.

Gradient flow out of ``inner_loop``: the adapted params stay differentiable w.r.t. the params passed in (and a
tensor-valued ``lr``). With ``create_graph=False`` the inner gradients are treated as constants (first order:
d adapted / d init = identity, what FOMAML and first-order Meta-SGD need); with ``create_graph=True`` the
gradients themselves are differentiated (second-order MAML). Pass detached params to adapt without a graph.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaseg.data.prepared import IGNORE
from metaseg.models.deeplab import BODY_PREFIX

Params = dict[str, Tensor]
LossFn = Callable[[Any, Tensor], Tensor]
UpdateRule = Callable[[str, Tensor, Tensor], Tensor]  # learned update (l2o): (name, gradient, param) -> update


BN_STATS = ("support", "pretrained")  # model.bn_stats: which BatchNorm layers take the support set's statistics


def support_stat_layer(name: str, bn_stats: str) -> bool:
    """Does BatchNorm module ``name`` take the task's support statistics under ``bn_stats``?

    ``support``: every BN layer. ``pretrained``: only the decoder's (``classifier`` / ``aux_classifier``); the
    backbone keeps the running statistics it was pre-trained (or supervised-trained) with."""
    if bn_stats not in BN_STATS:
        raise ValueError(f"unknown bn_stats '{bn_stats}' (expected one of {', '.join(BN_STATS)})")
    return bn_stats == "support" or not name.startswith(BODY_PREFIX)


@contextmanager
def model_mode(model: nn.Module, *, bn_train: bool, bn_stats: str = "support") -> Iterator[nn.Module]:
    """Everything in eval mode (dropout off); BatchNorm layers in train mode if ``bn_train`` (only those that
    ``support_stat_layer`` names under ``bn_stats``). Restores after."""
    saved = {m: m.training for m in model.modules()}
    model.eval()
    if bn_train:
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and support_stat_layer(name, bn_stats):
                m.train(True)  # EvalBatchNorm2d (ASPP pooling) refuses and stays in eval
    try:
        yield model
    finally:
        for m, flag in saved.items():
            m.training = flag


def split_state(model: nn.Module) -> tuple[Params, Params]:
    """(params, buffers) of a module as name -> tensor dicts (the module's own tensors, not copies)."""
    return dict(model.named_parameters()), dict(model.named_buffers())


def task_buffers(model: nn.Module, params: Params, buffers: Params, images: Tensor, *,
                 bn_stats: str = "support") -> Params:
    """BN statistics of ``images`` (the support set) in fresh buffer copies; ``buffers`` stay untouched.

    Under ``bn_stats="pretrained"`` the backbone's layers keep their stored statistics (they normalise with them
    while the decoder's statistics are estimated)."""
    task = {k: v.detach().clone() for k, v in buffers.items()}
    named = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and support_stat_layer(n, bn_stats)]
    bns = [m for _, m in named]
    saved = [m.momentum for m in bns]
    counts: dict[str, int] = {}  # values per channel each BN normalised over (N * H * W)
    def count(mod: nn.Module, inp: tuple[Tensor, ...], n: str) -> None:
        if mod.training:  # EvalBatchNorm2d (ASPP pooling) stays in eval mode and keeps its stored statistics
            counts[n] = inp[0].numel() // inp[0].shape[1]

    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: count(mod, inp, n)) for n, m in named]
    try:
        for m in bns:
            m.momentum = 1.0  # running stat := this batch's statistic (BN stores the unbiased var)
        with torch.no_grad(), model_mode(model, bn_train=True, bn_stats=bn_stats):
            functional_call(model, ({k: v.detach() for k, v in params.items()}, task), (images,), strict=False)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        for h in hooks:
            h.remove()
    # keep the biased variance train-mode BN normalised with: an eval forward with these buffers then computes what
    # support_forward (the inner loop) computes on the same images and params
    for n, _ in named:
        c = counts.get(n, 0)
        if c > 1 and f"{n}.running_var" in task:
            task[f"{n}.running_var"] = task[f"{n}.running_var"] * ((c - 1) / c)
    return task


def forward(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> Any:
    """Eval-mode functional forward with the given (task) buffers."""
    with model_mode(model, bn_train=False):
        return functional_call(model, (params, buffers), (x,), strict=False)


def support_forward(model: nn.Module, params: Params, buffers: Params, x: Tensor, *, bn_stats: str) -> Any:
    """Forward of the support images with the BN layers named by ``bn_stats`` normalising with the batch's own
    statistics under the *current* params (train-mode BN on copies of ``buffers``, which stay untouched).

    Inner steps use this: BN statistics estimated once from the initial params and then frozen go stale as the
    convs before them move, and a few steps then blow the activations up (measured, docs/design.md: two full-network
    steps at lr 0.01 took a transfer init's 5-shot meta-val mIoU from 11.0 to 1.3; with this forward it rises)."""
    with model_mode(model, bn_train=True, bn_stats=bn_stats):
        return functional_call(model, (params, {k: v.clone() for k, v in buffers.items()}), (x,), strict=False)


def _main(outputs: Any) -> Tensor:
    return outputs["out"] if isinstance(outputs, dict) else outputs


def _f32(t: Tensor) -> Tensor:
    """Half / bf16 logits -> float32 for the loss; float32 / float64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def dice_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Soft Dice over every class channel, ignoring label 255; 1 - mean Dice."""
    c = logits.shape[1]
    valid = (y != IGNORE).unsqueeze(1).to(logits.dtype)
    prob = _f32(logits).softmax(1) * valid
    onehot = F.one_hot(y.clamp(max=c - 1) * (y != IGNORE), c).permute(0, 3, 1, 2).to(prob.dtype) * valid
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


def balance_weights(y: Tensor, num_classes: int) -> Tensor:
    """Inverse-frequency class weights of the labelled pixels in ``y`` (classes absent from ``y``: weight 1)."""
    counts = torch.bincount(y[y != IGNORE].reshape(-1), minlength=num_classes)[:num_classes].float()
    return torch.where(counts > 0, counts.sum() / counts.clamp_min(1.0), torch.ones_like(counts))


def seg_loss(outputs: Any, y: Tensor, *, aux_weight: float = 0.0, dice_weight: float = 0.0,
             balance: bool = False) -> Tensor:
    """Cross-entropy (ignore 255) + dice_weight x Dice, on the main output plus aux_weight x the same on "aux".

    ``balance``: class-weighted CE (inverse pixel frequency within the batch), so a small foreground is not
    drowned by the background (without it, a randomly initialised model collapses to all-background).
    """

    def one(logits: Tensor) -> Tensor:
        weight = balance_weights(y, logits.shape[1]).to(logits.device) if balance else None
        loss = F.cross_entropy(_f32(logits), y, weight=weight, ignore_index=IGNORE)
        if dice_weight > 0:
            loss = loss + dice_weight * dice_loss(logits, y)
        return loss

    loss = one(_main(outputs))
    if aux_weight > 0 and isinstance(outputs, dict) and outputs.get("aux") is not None:
        loss = loss + aux_weight * one(outputs["aux"])
    return loss


def inner_loop(model: nn.Module, params: Params, buffers: Params, x: Tensor | None, y: Tensor | None, *,
               steps: int, lr: float | dict[str, Tensor], adapt_names: set[str] | None, create_graph: bool,
               loss_fn: LossFn, on_step: Callable[[int, Params], None] | None = None,
               optimizer: str | UpdateRule = "sgd", batches: Callable[[int], tuple[Tensor, Tensor]] | None = None,
               losses: list[float] | None = None, clip: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8, bn_stats: str | None = None) -> Params:
    """``steps`` gradient steps of ``loss_fn(forward(model, params, buffers, x), y)`` on the names in
    ``adapt_names`` (None = every param). Returns the adapted params dict (other entries passed through).

    ``lr``: a float, or a per-parameter dict of tensors broadcastable to each param (Meta-SGD).
    ``optimizer``: "sgd" or "adam" (a functional Adam update on the dict, same loop), or a learned ``UpdateRule``
    (l2o: ``metaseg.meta.l2o.TaskRule``, called per adapted tensor after the clip, keeping its own state; ``lr``
    unused; without ``create_graph`` it sees detached params, so its update is a constant). ``batches(step)``
    overrides ``(x, y)`` per step (mini-batches / augmentation). ``on_step(step, params)`` runs at step 0 and
    after every update; ``losses`` (if given) receives the support loss before each update. ``clip``: the
    gradient of each step is rescaled to a global L2 norm of at most ``clip`` (over the adapted params) before
    the update; with eval-mode BN a few support sets otherwise produce a diverging step. ``bn_stats`` (for a model
    with BatchNorm): the support forwards use ``support_forward`` (statistics follow the params); None = eval-mode
    forwards with ``buffers`` (a module without BN, e.g. the head over cached features).
    """
    if isinstance(optimizer, str) and optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown inner optimizer '{optimizer}' (expected sgd or adam)")
    fast = dict(params)
    names = [n for n in fast if adapt_names is None or n in adapt_names]
    for n in names:
        if not fast[n].requires_grad:
            fast[n] = fast[n].detach().requires_grad_(True)
    state: dict[str, tuple[Tensor, Tensor]] = {}
    if on_step is not None:
        on_step(0, fast)
    for step in range(steps):
        xb, yb = batches(step) if batches is not None else (x, y)
        out = (forward(model, fast, buffers, xb) if bn_stats is None
               else support_forward(model, fast, buffers, xb, bn_stats=bn_stats))
        loss = loss_fn(out, yb)
        if losses is not None:
            losses.append(float(loss.detach()))
        grads = list(torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph,
                                         allow_unused=True))
        if not create_graph:
            grads = [None if g is None else g.detach() for g in grads]
        if clip is not None:
            norm = torch.sqrt(sum(g.float().square().sum() for g in grads if g is not None))
            factor = torch.clamp(clip / (norm + 1e-12), max=1.0)
            grads = [None if g is None else g * factor.to(g.dtype) for g in grads]
        for n, g in zip(names, grads):
            if g is None:
                continue
            if callable(optimizer):
                fast[n] = fast[n] + optimizer(n, g, fast[n] if create_graph else fast[n].detach())
                continue
            if optimizer == "adam":
                m, v = state.get(n, (torch.zeros_like(g), torch.zeros_like(g)))
                m = betas[0] * m + (1 - betas[0]) * g
                v = betas[1] * v + (1 - betas[1]) * g * g
                state[n] = (m, v)
                t = step + 1
                g = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
            rate = lr[n] if isinstance(lr, dict) else lr
            fast[n] = fast[n] - rate * g
        if on_step is not None:
            on_step(step + 1, fast)
    return fast
