from __future__ import annotations

import pytest
import torch
from meta_helpers import BACKBONE, TinyNet, task

from metaseg.meta.inner import forward, inner_loop, seg_loss, split_state, support_forward, task_buffers
from metaseg.models.deeplab import build_model
from metaseg.meta.heads import expand_head


def _loss(out, y):
    return seg_loss(out, y, aux_weight=0.4, dice_weight=0.5)


def _setup(n: int, classes: int = 1):
    torch.manual_seed(0)
    model = build_model(BACKBONE)
    params, buffers = split_state(model)
    params = {k: v.detach() for k, v in params.items()}
    x, y = task(n, classes)
    return model, params, buffers, x, y


def test_task_buffers_are_support_stats_and_copies() -> None:
    model, params, buffers, x, y = _setup(2)
    before = {k: v.clone() for k, v in buffers.items()}
    tb = task_buffers(model, params, buffers, x)
    assert all(torch.equal(before[k], buffers[k]) for k in before)  # stored stats untouched
    first = model.backbone["0"][0](x)  # conv before the first BN
    assert torch.allclose(tb["backbone.0.1.running_mean"], first.mean((0, 2, 3)), atol=1e-5)
    assert torch.equal(tb["classifier.0.convs.4.2.running_mean"], buffers["classifier.0.convs.4.2.running_mean"])


def test_support_forward_computes_what_the_task_buffers_model_computes() -> None:
    """The inner loop's support forward (BN statistics of the batch under the current params) equals an eval-mode
    forward with ``task_buffers`` of the same params and images: what adaptation minimises is what ships."""
    model, params, buffers, x, y = _setup(1)  # 1-shot: 4x4 feature maps at stride 16, where the two differ most
    tb = task_buffers(model, params, buffers, x)
    with torch.no_grad():
        inner_out = support_forward(model, params, tb, x, bn_stats="support")["out"]
        shipped = forward(model, params, tb, x)["out"]
    assert torch.allclose(inner_out, shipped, atol=1e-4), float((inner_out - shipped).abs().max())


def test_one_step_lowers_loss_and_keeps_buffers_one_shot() -> None:
    model, params, buffers, x, y = _setup(1, classes=2)  # 1-shot, 2 classes
    was_training = {m: m.training for m in model.modules()}
    stored = {k: v.clone() for k, v in buffers.items()}
    tb = task_buffers(model, params, buffers, x)
    p = expand_head(params, 2)
    seen = []
    fast = inner_loop(model, p, tb, x, y, steps=1, lr=1e-4, adapt_names=None, create_graph=False, loss_fn=_loss,
                      on_step=lambda s, q: seen.append(s), bn_stats="support")  # BN statistics follow the params
    with torch.no_grad():  # what a model with the support's statistics predicts, before and after the step
        before = _loss(forward(model, p, tb, x), y)
        after = _loss(forward(model, fast, task_buffers(model, fast, buffers, x), x), y)
    assert after < before and seen == [0, 1]
    assert all(torch.equal(stored[k], buffers[k]) for k in stored)
    assert all(m.training == t for m, t in was_training.items())  # every module's mode restored
    assert all(torch.equal(params[k], model.state_dict()[k]) for k in params)  # module weights untouched


def test_adapt_names_and_adam_and_meta_sgd_rates() -> None:
    torch.manual_seed(0)
    net = TinyNet()
    params, buffers = split_state(net)
    params = {k: v.detach() for k, v in params.items()}
    x, y = task(2, size=24)
    tb = task_buffers(net, params, buffers, x)
    loss = lambda o, t: seg_loss(o, t)  # noqa: E731
    head = {"classifier.4.weight", "classifier.4.bias"}
    fast = inner_loop(net, params, tb, x, y, steps=2, lr=0.1, adapt_names=head, create_graph=False, loss_fn=loss)
    assert torch.equal(fast["body.0.weight"], params["body.0.weight"])
    assert not torch.equal(fast["classifier.4.weight"], params["classifier.4.weight"])
    losses: list[float] = []
    inner_loop(net, params, tb, x, y, steps=5, lr=0.05, adapt_names=None, create_graph=False, loss_fn=loss,
               optimizer="adam", losses=losses)
    assert losses[-1] < losses[0]
    rates = {k: torch.full_like(v, 0.1, requires_grad=True) for k, v in params.items()}
    fast = inner_loop(net, params, tb, x, y, steps=1, lr=rates, adapt_names=None, create_graph=False, loss_fn=loss)
    q = loss(forward(net, fast, tb, x), y)
    (g,) = torch.autograd.grad(q, [rates["body.0.weight"]])
    assert g.abs().sum() > 0  # rates receive a (first-order) meta-gradient


def test_balanced_loss_weights_classes_by_inverse_frequency() -> None:
    logits = torch.randn(1, 2, 4, 4)
    y = torch.zeros(1, 4, 4, dtype=torch.int64)
    y[0, 0, :2] = 1  # 2 fg pixels, 14 bg
    y[0, 3, 3] = 255
    w = torch.tensor([15 / 13, 15 / 2])  # 13 bg + 2 fg labelled pixels
    ref = torch.nn.functional.cross_entropy(logits, y, weight=w, ignore_index=255)
    assert torch.allclose(seg_loss(logits, y, balance=True), ref)
    assert not torch.allclose(seg_loss(logits, y), ref)


def test_pretrained_bn_stats_keep_the_backbone_statistics() -> None:
    from metaseg.meta.inner import model_mode, support_stat_layer

    model, params, buffers, x, y = _setup(2)
    tb = task_buffers(model, params, buffers, x, bn_stats="pretrained")
    backbone = [k for k in buffers if k.startswith("backbone.") and k.endswith("running_mean")]
    decoder = [k for k in buffers if k.startswith("classifier.") and k.endswith("running_mean")
               and not k.startswith("classifier.0.convs.4.")]  # the ASPP pooling BN always keeps its stats
    assert backbone and decoder
    assert all(torch.equal(tb[k], buffers[k]) for k in backbone)  # stored (pre-trained) statistics kept
    assert all(not torch.equal(tb[k], buffers[k]) for k in decoder)  # the decoder's from the support set
    support = task_buffers(model, params, buffers, x)
    assert not torch.equal(support[backbone[0]], buffers[backbone[0]])  # the default: every layer from the support
    assert support_stat_layer("classifier.1", "pretrained") and not support_stat_layer("backbone.0.1", "pretrained")
    with model_mode(model, bn_train=True, bn_stats="pretrained"):
        assert not model.backbone["0"][1].training and model.classifier[2].training
    with pytest.raises(ValueError, match="unknown bn_stats"):
        support_stat_layer("backbone.0.1", "batch")
