from __future__ import annotations

import torch
from meta_helpers import BACKBONE, task

from metaseg.meta.inner import split_state, task_buffers
from metaseg.models.deeplab import build_model
from metaseg.meta.heads import (bake_prototypes, cosine_logits, deeplab_features, expand_head, masked_average,
                                  mean_feature_norm)


def test_expand_head_is_differentiable_into_two_rows() -> None:
    w = torch.randn(2, 5, 1, 1, requires_grad=True)
    out = expand_head({"classifier.4.weight": w, "x": torch.ones(1)}, 4)
    e = out["classifier.4.weight"]
    assert e.shape == (5, 5, 1, 1) and torch.equal(e[3], w[1]) and torch.equal(e[0], w[0])
    e[1:].sum().backward()
    assert torch.equal(w.grad[1], torch.full((5, 1, 1), 4.0)) and w.grad[0].abs().sum() == 0


def test_masked_average_is_the_mean_feature_per_class() -> None:
    feat = torch.randn(2, 3, 4, 4)
    y = torch.zeros(2, 4, 4, dtype=torch.int64)
    y[0, :2, :2] = 1
    y[1, 3, 3] = 255
    p = masked_average(feat, y, 1)
    fg = feat[0, :, :2, :2].reshape(3, -1).mean(1)
    bg_mask = (y == 0)
    bg = feat.permute(0, 2, 3, 1)[bg_mask].mean(0)
    assert torch.allclose(p[1], fg, atol=1e-6) and torch.allclose(p[0], bg, atol=1e-6)


def test_baked_conv_argmax_equals_cosine_argmax() -> None:
    torch.manual_seed(0)
    model = build_model(BACKBONE)
    params, buffers = split_state(model)
    x, y = task(2, 3)
    with torch.no_grad():
        tb = task_buffers(model, params, buffers, x)
        f = deeplab_features(model, params, tb, x)["out"]
        protos = masked_average(f, y, 3)
        w, b = bake_prototypes(protos, 10.0, mean_feature_norm(f))
        baked = torch.nn.functional.conv2d(f, w, b)
        cos = cosine_logits(f, protos, 10.0)
    assert torch.equal(baked.argmax(1), cos.argmax(1))
    ratio = baked / cos  # one positive factor per pixel: |f| / mean |f|
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=1e-4)
