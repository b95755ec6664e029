"""l2o's learned inner-loop optimiser: a coordinate-wise LSTM conditioned on a task embedding.

``LearnedOptimizer`` holds every learned weight (it travels in the trained init, ``TrainedInit.learned_optimizer``):

* **Task embedding** ``embed``: the support set's masked-average background and foreground body features
  (``task_features``: each unit length, any class = foreground), through a linear projection, unit length.
* **LSTM**: one cell whose weights every coordinate of every adapted tensor shares; each coordinate keeps its own
  hidden and cell state. Input per coordinate: the gradient preprocessed as in Andrychowicz et al. 2016 (appendix
  A: ``(log|g| / p, sign g)`` when ``|g| >= e^-p``, else ``(-1, e^p g)``, p = 10, continuous at the threshold), the
  parameter's value and the task embedding (its gate term is computed once per task and broadcast).
* **Update**: two readouts of the hidden state, ``a`` and ``b``: ``update = lr * (-exp(a) * g + b)``, a learned
  per-coordinate step-size factor on plain SGD plus a gradient-scale-free term. The readout starts small (``a``
  weights ~ N(0, 0.01^2), ``b`` weights and both biases 0), so an untrained optimiser is SGD at ``lr`` within a few
  percent; meta-training starts there.

``contrastive`` is the Siamese term over a meta-batch's embeddings (Hadsell et al. 2006): same-domain pairs pulled
together (d^2), others pushed to at least ``MARGIN`` apart; it also returns the mean distances DVCLive logs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaseg.meta.heads import body_features, masked_average
from metaseg.meta.inner import IGNORE, Params

PREPROCESS_P = 10.0  # gradient preprocessing constant p (Andrychowicz et al. 2016)
MARGIN = 1.0  # contrastive margin between unit-length embeddings of tasks from different domains (range 0..2)
INIT_SCALE = 0.01  # std of the step-size readout's initial weights: the untrained optimiser is SGD within ~4 %


def preprocess(g: Tensor) -> tuple[Tensor, Tensor]:
    """(log-magnitude, sign) inputs of the LSTM, each shaped like ``g`` (differentiable, no NaN at g = 0)."""
    tiny, mag = math.exp(-PREPROCESS_P), g.abs()
    big = mag >= tiny
    log_mag = torch.where(big, mag.clamp_min(tiny).log() / PREPROCESS_P, -1.0)
    return log_mag, torch.where(big, torch.sign(g), g * math.exp(PREPROCESS_P))


def task_features(feat: Tensor, y: Tensor) -> Tensor:
    """[2, D]: the masked averages of background and foreground (any class) body features, each unit length."""
    fg = torch.where(y == IGNORE, y, (y > 0).to(y.dtype))
    return F.normalize(masked_average(feat, fg, 1), dim=1)


class LearnedOptimizer(nn.Module):
    """The task embedding's projection and the coordinate-wise LSTM (see the module docstring)."""

    def __init__(self, features: int, *, hidden: int = 4, embedding: int = 8) -> None:
        super().__init__()
        self.hidden = hidden
        self.project = nn.Linear(2 * features, embedding)
        bound = 1 / math.sqrt(hidden)  # nn.LSTM's initialisation
        gates = 4 * hidden  # input, forget, cell, output
        self.weight_in = nn.Parameter(torch.empty(3 + hidden, gates).uniform_(-bound, bound))  # (log|g|, sign, p, h)
        self.weight_task = nn.Parameter(torch.empty(embedding, gates).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(gates))
        with torch.no_grad():
            self.bias[hidden:2 * hidden] = 1.0  # forget gate open at the start
        self.readout = nn.Parameter(torch.cat([torch.randn(hidden, 1) * INIT_SCALE, torch.zeros(hidden, 1)], 1))
        self.readout_bias = nn.Parameter(torch.zeros(2))

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> LearnedOptimizer:
        """Rebuild from a ``state_dict`` (sizes read off the weights)."""
        embedding, features2 = state["project.weight"].shape
        opt = cls(features2 // 2, hidden=state["readout"].shape[0], embedding=embedding)
        opt.load_state_dict(state)
        return opt.to(state["readout"].dtype)

    def embed(self, pooled: Tensor) -> Tensor:
        """Task features [..., 2, D] (``task_features``) -> unit-length embeddings [..., E]."""
        return F.normalize(self.project(pooled.flatten(-2)), dim=-1)

    def rule(self, embedding: Tensor, lr: float) -> TaskRule:
        """A fresh per-task run of the optimiser (LSTM state zero) for the task with this embedding."""
        return TaskRule(self, embedding, lr)


class TaskRule:
    """One task's run of the learned optimiser, the ``UpdateRule`` ``inner_loop`` calls per adapted tensor:
    ``rule(name, grad, param) -> update``. Keeps each tensor's per-coordinate (h, c) between steps."""

    def __init__(self, opt: LearnedOptimizer, embedding: Tensor, lr: float) -> None:
        self.opt, self.lr = opt, lr
        self.gate_bias = opt.bias + embedding @ opt.weight_task  # the task's term, once for every coordinate
        self.state: dict[str, tuple[Tensor, Tensor]] = {}

    def __call__(self, name: str, g: Tensor, p: Tensor) -> Tensor:
        opt, h_size = self.opt, self.opt.hidden
        gf = g.reshape(-1, 1)
        log_mag, sign = preprocess(gf)
        inputs = [log_mag, sign, p.reshape(-1, 1).to(gf.dtype)]
        prev = self.state.get(name)
        if prev is not None:
            inputs.append(prev[0])
        weight = opt.weight_in if prev is not None else opt.weight_in[:3]  # h = 0 at the first step
        gates = torch.addmm(self.gate_bias.to(gf.dtype), torch.cat(inputs, 1), weight.to(gf.dtype))
        ifo, z = gates.split([3 * h_size, h_size], 1)  # split, not slices: its backward is one cat
        i, f, o = torch.sigmoid(ifo).split(h_size, 1)
        c = i * torch.tanh(z)
        if prev is not None:
            c = c + f * prev[1]
        h = o * torch.tanh(c)
        self.state[name] = (h, c)
        a, b = torch.addmm(opt.readout_bias.to(gf.dtype), h, opt.readout.to(gf.dtype)).unbind(1)
        return (self.lr * (b - torch.exp(a) * gf.squeeze(1))).view_as(p)


def support_rule(state: dict[str, Tensor], module: nn.Module, params: Params, buffers: Params, support_x: Tensor,
                 support_y: Tensor, lr: float) -> TaskRule:
    """The rule adaptation runs (``finetune.adapt``): a trained init's optimiser (``state``), no gradient to its
    weights, for the task of this support set (``buffers``: the task's BN statistics)."""
    opt = LearnedOptimizer.from_state(state).to(support_x.device).requires_grad_(False)
    with torch.no_grad():
        feats = body_features(module, params, buffers, support_x)["out"]
        return opt.rule(opt.embed(task_features(feats, support_y)), lr)


def contrastive(embeddings: Tensor, domains: list[str]) -> tuple[Tensor, dict[str, float]]:
    """The contrastive loss over every pair of ``embeddings`` [N, E] (mean over pairs) and the mean distance of
    same-domain and cross-domain pairs (``embed_dist_same`` / ``embed_dist_cross``, NaN when a batch has none)."""
    n = len(domains)
    i, j = torch.triu_indices(n, n, 1, device=embeddings.device)
    if len(i) == 0:
        return embeddings.sum() * 0, {}
    same = torch.tensor([domains[a] == domains[b] for a, b in zip(i.tolist(), j.tolist())], device=embeddings.device)
    d2 = (embeddings[i] - embeddings[j]).square().sum(1)
    d = (d2 + 1e-12).sqrt()
    loss = torch.where(same, d2, F.relu(MARGIN - d).square()).mean()
    mean = lambda m: float(d.detach()[m].mean()) if bool(m.any()) else math.nan  # noqa: E731
    return loss, {"contrastive": float(loss.detach()), "embed_dist_same": mean(same), "embed_dist_cross": mean(~same)}
