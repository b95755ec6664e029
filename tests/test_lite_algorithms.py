"""Every meta-learning algorithm takes one outer step on the EfficientNet-Lite0 DeepLabv3 (1-shot tasks included).

Random weights with support-set BN statistics keep the cases fast; FOMAML and transfer also run once from the
packaged ImageNet weights with the backbone's stored (pre-trained) BN statistics, which a step must leave as they are.
Images are 64 px.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from meta_helpers import LITE, SIZE, task

from metaseg.meta.algorithms import make_algorithm
from metaseg.meta.finetune import adapt
from metaseg.models.backbones import normalization
from metaseg.models.deeplab import build_model


def _task(n_support: int, ways: int, seed: int) -> SimpleNamespace:
    x, y = task(n_support + 1, ways, seed=seed)
    return SimpleNamespace(support_x=x[:n_support], support_y=y[:n_support], query_x=x[n_support:],
                           query_y=y[n_support:], class_ids=tuple(range(1, ways + 1)))


def _tasks() -> list[SimpleNamespace]:
    """A 1-shot 1-way task and a 2-shot 2-way one (support: one image per class here)."""
    return [_task(1, 1, seed=3), _task(2, 2, seed=5)]


@pytest.mark.parametrize(("name", "weights", "bn_stats"), [
    ("maml", None, "support"),  # second order
    ("metasgd", None, "support"),
    ("anil", None, "support"),
    ("protonet", None, "support"),
    ("transfer", None, "support"),
    ("fomaml", "imagenet", "pretrained"),
    ("transfer", "imagenet", "pretrained"),
    ("l2o", "imagenet", "pretrained"),  # the default model: its LSTM over the decoder, the body meta-trained too
])
def test_lite0_algorithm_steps(name: str, weights: str | None, bn_stats: str) -> None:
    torch.manual_seed(0)
    model = build_model(LITE, backbone_weights=weights)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    stored = {k: v.clone() for k, v in model.named_buffers()}
    algo = make_algorithm(name, model, inner_steps=1, inner_lr=1e-3, outer_lr=1e-3, bn_stats=bn_stats)
    m = algo.step(_tasks())
    assert math.isfinite(m["loss"]) and 0.0 <= m["miou"] <= 1.0
    changed = [k for k, v in model.named_parameters() if not torch.equal(before[k], v)]
    assert changed and any(k.startswith("backbone.") for k in changed), changed  # the Lite body is meta-trained
    if name != "transfer" or bn_stats == "pretrained":
        # meta-learners never touch stored BN statistics; transfer under `pretrained` keeps the backbone's
        keep = [k for k in stored if name != "transfer" or k.startswith("backbone.")]
        assert all(torch.equal(stored[k], dict(model.named_buffers())[k]) for k in keep)
    if name == "transfer" and bn_stats == "pretrained":
        assert not torch.equal(stored["classifier.0.convs.0.1.running_mean"],
                               dict(model.named_buffers())["classifier.0.convs.0.1.running_mean"])  # decoder trains
    init = algo.export_init(backbone=LITE, image_size=SIZE)
    assert init.norm == tuple(map(list, normalization(LITE))) and init.bn_stats == bn_stats
    t = _task(1, 1, seed=4)
    adapted = adapt(init, t.support_x, t.support_y, 1, steps=1)
    assert adapted.predict_logits(t.query_x).shape == (1, 2, SIZE, SIZE)
