"""Segmentation metrics for few-shot evaluation: confusion matrix, CD-FSS mIoU, FB-IoU, per-episode mean with a 95% CI.

Definitions (the CD-FSS / HSNet protocol):

- **mIoU** of a domain: for every foreground class (keyed by the domain's class id; an episode's label ``i + 1``
  is class ``class_ids[i]``) intersection and union are *summed over all episodes* of the domain, then
  IoU = sum(I) / sum(U) per class, averaged over the classes that occurred (union > 0). A class absent from both
  the prediction and the ground truth of an episode adds 0 to its intersection and 0 to its union.
- **FB-IoU**: the episode's labels collapsed to background / foreground (fg = any class), intersection and union
  of each summed over all episodes, the two IoUs averaged.
- **Episode mIoU**: one episode's IoU averaged over its foreground classes with union > 0 (an episode where no
  class occurs in either prediction or ground truth has no score and is left out). Its mean over episodes is
  reported with a 95% confidence interval (Student t by default, or a seeded percentile bootstrap).

All accumulation stays on the tensors' device (bincount / index_add); values are read back once, at ``summary``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metaseg.data.prepared import IGNORE

log = logging.getLogger(__name__)


class ConfusionMatrix:
    """``mat[t, p]`` = number of pixels with target ``t`` predicted as ``p``; target 255 is ignored."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> ConfusionMatrix:
        """Add a batch of label maps (any matching shapes, integer dtypes)."""
        if target.shape != pred.shape:
            raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(pred.shape)} differ in shape")
        n = self.num_classes
        target = target.reshape(-1).to(device=self.mat.device, dtype=torch.int64)
        pred = pred.reshape(-1).to(device=self.mat.device, dtype=torch.int64)
        keep = target != IGNORE
        t, p = target[keep], pred[keep]
        # out-of-range labels would silently land in a wrong cell: fold them into a check that stays on device
        bad = ((t < 0) | (t >= n) | (p < 0) | (p >= n)).any()
        if bool(bad):
            raise ValueError(f"labels must be in 0..{n - 1} (or {IGNORE} = ignore in the target)")
        self.mat += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)
        return self

    def intersection(self) -> torch.Tensor:
        return self.mat.diagonal()

    def union(self) -> torch.Tensor:
        return self.mat.sum(0) + self.mat.sum(1) - self.mat.diagonal()

    def iou(self) -> torch.Tensor:
        """Per-class IoU (float64); NaN where the class occurs in neither target nor prediction."""
        inter, union = self.intersection().double(), self.union().double()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, math.nan))

    def binary(self) -> torch.Tensor:
        """The 2x2 background / foreground matrix (foreground = any class >= 1)."""
        m = self.mat
        return torch.stack([torch.stack([m[0, 0], m[0, 1:].sum()]), torch.stack([m[1:, 0].sum(), m[1:, 1:].sum()])])


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% confidence interval; ``half_width`` is what ``mean ± half_width`` reports."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high


def mean_ci(values: Sequence[float] | np.ndarray, *, method: str = "t", confidence: float = 0.95,
            bootstrap_samples: int = 1000, seed: int = 0) -> Interval:
    """Confidence interval of the mean: Student t (``t``) or percentile bootstrap (``bootstrap``, seeded).

    With fewer than two values the interval is undefined: low = high = NaN.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("mean_ci needs a non-empty 1-D sequence of values")
    n, mean = len(x), float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, method)
    from scipy import stats

    if method == "t":
        if not x.std() > 0:  # every episode scored the same: no spread, and scipy's scale must be positive
            return Interval(mean, mean, mean, n, method)
        low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=stats.sem(x))
        return Interval(mean, float(low), float(high), n, method)
    if method == "bootstrap":
        res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=bootstrap_samples,
                              method="percentile", rng=np.random.default_rng(seed))
        return Interval(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), n, method)
    raise ValueError(f"unknown CI method '{method}' (expected 't' or 'bootstrap')")


@dataclass(frozen=True)
class Scores:
    """A domain's result: mIoU and FB-IoU in [0, 1], per-class IoU by class id, episode mIoU with its CI."""

    miou: float
    fbiou: float
    class_iou: dict[int, float]
    episode: Interval
    episodes: int
    per_episode: tuple[float, ...] = ()  # episode mIoU in episode order (NaN = nothing to score)


class DomainScorer:
    """Accumulates the episodes of one domain (one init, one K, one step count) on the device."""

    def __init__(self, num_classes: int, device: torch.device | str | None = None):
        self.num_classes = num_classes
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.inter = torch.zeros(num_classes + 1, dtype=torch.int64, device=self.device)  # index = class id
        self.union = torch.zeros(num_classes + 1, dtype=torch.int64, device=self.device)
        self.fb = torch.zeros((2, 2), dtype=torch.int64, device=self.device)
        self._episode: list[torch.Tensor] = []

    def add(self, class_ids: Sequence[int], pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Score one episode's query predictions (episode labels 0..ways, 255 ignore). Returns its mIoU (0-d)."""
        if any(not 1 <= c <= self.num_classes for c in class_ids):
            raise ValueError(f"class ids {list(class_ids)} outside 1..{self.num_classes}")
        cm = ConfusionMatrix(len(class_ids) + 1, self.device).update(target, pred)
        ids = torch.as_tensor(list(class_ids), dtype=torch.int64, device=self.device)
        inter, union = cm.intersection()[1:], cm.union()[1:]
        self.inter.index_add_(0, ids, inter)
        self.union.index_add_(0, ids, union)
        self.fb += cm.binary()
        present = union > 0
        ious = inter.double() / union.clamp_min(1).double()
        ep = torch.where(present.any(), (ious * present).sum() / present.sum().clamp_min(1),
                         torch.tensor(math.nan, dtype=torch.float64, device=self.device))
        self._episode.append(ep)
        return ep

    def summary(self, *, ci: str = "t", bootstrap_samples: int = 1000, seed: int = 0) -> Scores:
        if not self._episode:
            raise ValueError("no episodes were scored")
        inter, union = self.inter.cpu().double(), self.union.cpu().double()
        class_iou = {c: float(inter[c] / union[c]) for c in range(1, self.num_classes + 1) if union[c] > 0}
        miou = float(np.mean(list(class_iou.values()))) if class_iou else math.nan
        fb = self.fb.cpu().double()
        fb_inter = fb.diagonal()
        fb_union = fb.sum(0) + fb.sum(1) - fb_inter
        fb_iou = [float(i / u) for i, u in zip(fb_inter, fb_union) if u > 0]
        fbiou = float(np.mean(fb_iou)) if fb_iou else math.nan
        per_ep = torch.stack(self._episode).cpu().numpy()
        scored = per_ep[~np.isnan(per_ep)]
        if len(scored) < len(per_ep):
            log.warning("%d of %d episodes had no class in prediction or ground truth; left out of the episode mean",
                        len(per_ep) - len(scored), len(per_ep))
        episode = (mean_ci(scored, method=ci, bootstrap_samples=bootstrap_samples, seed=seed) if len(scored)
                   else Interval(math.nan, math.nan, math.nan, 0, ci))
        return Scores(miou=miou, fbiou=fbiou, class_iou=class_iou, episode=episode, episodes=len(per_ep),
                      per_episode=tuple(float(v) for v in per_ep))


def iou_of_labels(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """mIoU over foreground classes 1..C with union > 0 and FB-IoU of one set of label maps (e.g. a test pool)."""
    scorer = DomainScorer(num_classes, pred.device)
    scorer.add(list(range(1, num_classes + 1)), pred, target)
    s = scorer.summary()
    return s.miou, s.fbiou
