from __future__ import annotations

import pytest
import torch
from meta_helpers import BACKBONE, SIZE

from metaseg.models.adapted import plain_deeplab
from metaseg.models.deeplab import EvalBatchNorm2d, HardSigmoidExact, build_model


def test_build_model_same_outputs_as_stock_and_double_backward() -> None:
    torch.manual_seed(0)
    model = build_model(BACKBONE, aux_loss=True).eval()
    stock = plain_deeplab(BACKBONE, 2, aux_loss=True).eval()
    stock.load_state_dict(model.state_dict())
    assert any(isinstance(m, HardSigmoidExact) for m in model.modules())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(model(x)["out"], stock(x)["out"], atol=1e-5)
    w = model.classifier[1].weight
    loss = model(x)["out"].square().mean()
    (g,) = torch.autograd.grad(loss, [w], create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), [model.backbone["0"][0].weight])  # through Hardsigmoid
    assert torch.isfinite(gg).all()


def test_pooling_bn_stays_eval_and_batch_of_one_trains() -> None:
    model = build_model(BACKBONE).train()
    pool_bn = model.classifier[0].convs[4][2]
    assert isinstance(pool_bn, EvalBatchNorm2d) and not pool_bn.training
    out = model(torch.randn(1, 3, SIZE, SIZE))  # the stock model raises here in train mode
    assert out["out"].shape == (1, 2, SIZE, SIZE)


def test_backbone_weights_load_and_mismatch(tmp_path) -> None:
    src = build_model(BACKBONE)
    good = tmp_path / "bb.pt"
    torch.save(src.backbone.state_dict(), good)
    model = build_model(BACKBONE, backbone_weights=good)
    assert torch.equal(model.backbone["0"][0].weight, src.backbone["0"][0].weight)
    bad = tmp_path / "bad.pt"
    torch.save({"0.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pt"):
        build_model(BACKBONE, backbone_weights=bad)
