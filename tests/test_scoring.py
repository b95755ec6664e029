"""Metrics against hand-computed numbers on tiny masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metaseg.scoring import ConfusionMatrix, DomainScorer, iou_of_labels, mean_ci


def t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def test_confusion_matrix_iou_by_hand_with_ignore() -> None:
    target = t([[0, 0, 1], [1, 1, 2], [255, 2, 2]])
    pred = t([[0, 1, 1], [1, 0, 2], [2, 2, 0]])  # the 2 under the ignore pixel must not count
    cm = ConfusionMatrix(3).update(target, pred)
    assert cm.mat.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 2]]
    assert cm.iou().tolist() == pytest.approx([1 / 4, 2 / 4, 2 / 3])


def test_confusion_matrix_absent_class_is_nan_and_bad_labels_fail() -> None:
    cm = ConfusionMatrix(3).update(t([[0, 1]]), t([[0, 1]]))
    assert math.isnan(cm.iou()[2].item())
    with pytest.raises(ValueError, match="labels must be in"):
        ConfusionMatrix(2).update(t([[0, 1]]), t([[0, 2]]))
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(2).update(t([[0, 1]]), t([[0], [1]]))


def _four_episodes() -> DomainScorer:
    """Domain with 3 classes, 1-way episodes A (class 2), B (class 2, absent), C (class 3), D (class 2)."""
    s = DomainScorer(3)
    # A: gt fg 2 px, pred fg 2 px (one more under ignore, not counted): I 1, U 3; bg I 5, U 7
    s.add([2], pred=t([[1, 0, 0], [1, 0, 0], [0, 0, 1]]), target=t([[1, 1, 0], [0, 0, 0], [0, 0, 255]]))
    # B: class 2 in neither prediction nor ground truth: adds I 0, U 0 to class 2; bg I 9, U 9
    s.add([2], pred=torch.zeros(3, 3, dtype=torch.int64), target=torch.zeros(3, 3, dtype=torch.int64))
    # C: I 2, U 4; bg I 5, U 7
    s.add([3], pred=t([[1, 1, 0], [0, 0, 1], [0, 0, 0]]), target=t([[1, 1, 1], [0, 0, 0], [0, 0, 0]]))
    # D: all foreground, all right: I 9, U 9; bg I 0, U 0
    s.add([2], pred=torch.ones(3, 3, dtype=torch.int64), target=torch.ones(3, 3, dtype=torch.int64))
    return s


def test_miou_accumulates_intersection_and_union_per_class_over_episodes() -> None:
    s = _four_episodes().summary()
    # class 2: (1 + 0 + 9) / (3 + 0 + 9); class 3: 2 / 4; class 1 never occurs -> not averaged
    assert s.class_iou == pytest.approx({2: 10 / 12, 3: 2 / 4})
    assert s.miou == pytest.approx((10 / 12 + 2 / 4) / 2)
    # FB-IoU: fg (1+0+2+9)/(3+0+4+9), bg (5+9+5+0)/(7+9+7+0)
    assert s.fbiou == pytest.approx((12 / 16 + 19 / 23) / 2)
    # per-episode: A 1/3, C 1/2, D 1; B has nothing to score and is left out
    assert s.episodes == 4 and s.episode.n == 3
    assert s.episode.mean == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)


def test_multi_way_episode_maps_labels_back_to_class_ids() -> None:
    s = DomainScorer(3)
    s.add([3, 1], pred=t([[1, 2], [2, 0]]), target=t([[1, 2], [0, 2]]))
    out = s.summary()
    # label 1 = class 3: I 1, U 1; label 2 = class 1: I 1, U 3
    assert out.class_iou == pytest.approx({3: 1.0, 1: 1 / 3})
    # binary: fg I 2, U 4; bg I 0, U 2
    assert out.fbiou == pytest.approx((2 / 4 + 0.0) / 2)
    with pytest.raises(ValueError, match="outside"):
        s.add([4], pred=t([[0]]), target=t([[0]]))


def test_iou_of_labels_on_a_test_pool() -> None:
    miou, fbiou = iou_of_labels(t([[0, 1, 1], [1, 0, 2], [2, 2, 0]]), t([[0, 0, 1], [1, 1, 2], [255, 2, 2]]), 2)
    assert miou == pytest.approx((2 / 4 + 2 / 3) / 2)
    # binary (ignore pixel dropped): fg gt 6 px, pred 5 px, both 4 -> I 4, U 7; bg gt 2, pred 3, both 1 -> I 1, U 4
    assert fbiou == pytest.approx((4 / 7 + 1 / 4) / 2)


def test_t_interval_matches_scipy() -> None:
    from scipy import stats

    x = np.array([0.1, 0.4, 0.35, 0.8, 0.6])
    ci = mean_ci(x, method="t")
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (ci.mean, ci.low, ci.high) == pytest.approx((0.45, lo, hi))
    assert ci.half_width == pytest.approx(2.7764451 * x.std(ddof=1) / math.sqrt(5), rel=1e-6)


def test_bootstrap_is_seeded_and_close_to_t_on_normal_data() -> None:
    x = np.random.default_rng(1).normal(0.5, 0.1, size=400)
    a = mean_ci(x, method="bootstrap", bootstrap_samples=2000, seed=3)
    assert a == mean_ci(x, method="bootstrap", bootstrap_samples=2000, seed=3)
    assert a.low < a.mean < a.high
    assert a.half_width == pytest.approx(mean_ci(x).half_width, rel=0.15)
    assert math.isnan(mean_ci([0.3]).low)
    with pytest.raises(ValueError, match="unknown CI method"):
        mean_ci(x, method="wilson")
