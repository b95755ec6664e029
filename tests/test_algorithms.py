from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from meta_helpers import BACKBONE, SIZE, TinyNet, task

from metaseg.meta.algorithms import ALGORITHMS, make_algorithm
from metaseg.meta.finetune import adapt
from metaseg.meta.inner import forward, inner_loop, seg_loss, split_state, task_buffers
from metaseg.models.deeplab import build_model
from metaseg.meta.heads import expand_head


def _task(n_support: int = 1, n_query: int = 1, seed: int = 0, size: int = SIZE, dtype=torch.float32):
    x, y = task(n_support + n_query, 1, seed=seed, size=size)
    x = x.to(dtype)
    return SimpleNamespace(support_x=x[:n_support], support_y=y[:n_support], query_x=x[n_support:],
                           query_y=y[n_support:], class_ids=(1,))


def _tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().double()


def test_maml_meta_gradient_matches_finite_differences_and_differs_from_fomaml() -> None:
    t = _task(2, 2, size=12, dtype=torch.float64)
    net = _tiny()
    grads = {}
    for name in ("maml", "fomaml"):
        algo = make_algorithm(name, net, inner_steps=2, inner_lr=0.5, aux_weight=0.0)
        net.zero_grad()
        loss, _ = algo.task_loss(t)
        loss.backward()
        grads[name] = {k: p.grad.clone() for k, p in net.named_parameters()}
    params, buffers = split_state(net)

    def adapt_support(p: dict) -> dict:  # inner steps on the support set, BN statistics following the params
        return inner_loop(net, expand_head(p, 1), buffers, t.support_x, t.support_y, steps=2, lr=0.5,
                          adapt_names=None, create_graph=False, loss_fn=seg_loss, bn_stats="support")

    base = {k: v.detach().clone() for k, v in params.items()}
    # the query is predicted with the support's statistics under the adapted params, computed without grad: the
    # meta-gradient treats them as constants, so they stay fixed at the unperturbed point here
    tb = task_buffers(net, {k: v.detach() for k, v in adapt_support(base).items()}, buffers, t.support_x)

    def meta_loss(p: dict) -> float:
        return float(seg_loss(forward(net, adapt_support(p), tb, t.query_x), t.query_y).detach())

    eps = 1e-6
    for k in ("body.0.weight", "classifier.0.weight", "classifier.4.weight"):
        for i in (0, 3):
            plus, minus = dict(base), dict(base)
            e = torch.zeros_like(base[k]).view(-1)
            e[i] = eps
            plus[k], minus[k] = base[k] + e.view_as(base[k]), base[k] - e.view_as(base[k])
            fd = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
            assert grads["maml"][k].view(-1)[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-8), (k, i)
    diff = sum(float((grads["maml"][k] - grads["fomaml"][k]).abs().sum()) for k in base)
    assert diff > 1e-6



@pytest.mark.parametrize("name", ["anil", "metasgd"])
def test_second_order_meta_gradient_matches_finite_differences(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """ANIL (body and head, through the head's inner steps on body features) and Meta-SGD (weights and the learned
    rates) backpropagate the exact second-order meta-gradient. The query's BN statistics are computed without grad
    (constants to the meta-gradient), so they are frozen at the unperturbed point for the finite differences."""
    import metaseg.meta.algorithms as algorithms

    real, recorded, replay = algorithms.task_buffers, [], {"on": False, "i": 0}

    def frozen_buffers(*args, **kw):
        if not replay["on"]:
            recorded.append({k: v.detach() for k, v in real(*args, **kw).items()})
            return recorded[-1]
        out = recorded[replay["i"] % len(recorded)]
        replay["i"] += 1
        return out

    monkeypatch.setattr(algorithms, "task_buffers", frozen_buffers)
    if name == "anil":  # head-only inner loop on DeepLab body features: a real (tiny, random) DeepLab
        torch.manual_seed(0)
        t, net = _task(2, 2, size=32, dtype=torch.float64), build_model(BACKBONE, backbone_weights=None).double()
        keys = ["backbone.0.0.weight", "classifier.0.project.0.weight", "classifier.4.weight"]
    else:
        t, net = _task(2, 2, size=12, dtype=torch.float64), _tiny()
        keys = ["body.0.weight", "classifier.4.weight", "lr:body.0.weight", "lr:classifier.0.weight"]
    algo = make_algorithm(name, net, inner_steps=2, inner_lr=0.5 if name == "metasgd" else 0.01, aux_weight=0.0)
    tensors = dict(net.named_parameters()) | {f"lr:{k}": v for k, v in algo.extra_parameters().items()}
    for v in tensors.values():
        v.grad = None
    loss, _ = algo.task_loss(t)
    loss.backward()
    grads = {k: torch.zeros_like(v) if v.grad is None else v.grad.clone() for k, v in tensors.items()}
    replay["on"] = True
    eps = 1e-7  # the random DeepLab body is sharply curved: 1e-6 leaves a 2e-4 truncation error, 1e-7 converges
    for k in keys:
        for i in (0, 3):
            flat = tensors[k].data.view(-1)
            flat[i] += eps
            plus = float(algo.task_loss(t)[0])
            flat[i] -= 2 * eps
            minus = float(algo.task_loss(t)[0])
            flat[i] += eps
            fd = (plus - minus) / (2 * eps)
            assert grads[k].view(-1)[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-8), (k, i)


def test_metasgd_rates_change_after_a_step() -> None:
    net = _tiny().float()
    algo = make_algorithm("metasgd", net, inner_steps=1, inner_lr=0.1, aux_weight=0.0)
    before = {k: v.detach().clone() for k, v in algo.lrs.items()}
    algo.step([_task(size=12)])
    assert any(not torch.equal(before[k], v) for k, v in algo.lrs.items())
    assert algo.export_init(backbone=BACKBONE, image_size=12).inner_lrs is not None  # its norm: a known backbone


def test_reptile_update_is_the_interpolation() -> None:
    net = _tiny().float()
    algo = make_algorithm("reptile", net, inner_steps=2, inner_lr=0.1, outer_optimizer="sgd", outer_lr=0.25,
                          aux_weight=0.0)
    tasks = [_task(seed=s, size=12) for s in (1, 2)]
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    target = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in tasks:
        tb = task_buffers(net, theta, dict(net.named_buffers()), t.support_x)
        fast = inner_loop(net, expand_head(theta, 1), tb, t.support_x, t.support_y, steps=2, lr=0.1, adapt_names=None,
                          create_graph=False, loss_fn=seg_loss, bn_stats="support")
        for k in target:
            target[k] += fast[k].detach() / 2
    algo.step(tasks)
    for k, p in net.named_parameters():
        assert torch.allclose(p, theta[k] + 0.25 * (target[k] - theta[k]), atol=1e-6), k



@pytest.mark.parametrize("setting", [{"outer_optimizer": "adam"}, {"weight_decay": 0.5}, {"outer_clip": 1e-3},
                                     {"outer_lr": 0.5}])
def test_reptile_honours_the_outer_settings(setting: dict[str, object]) -> None:
    """Every train.* outer setting acts on Reptile too (it used to run plain SGD at a fixed epsilon)."""
    def updated(**kw: object) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = _tiny().float()
        algo = make_algorithm("reptile", net, inner_steps=1, inner_lr=0.1, aux_weight=0.0,
                              **{"outer_optimizer": "sgd", "outer_lr": 0.25, **kw})
        algo.step([_task(seed=1, size=12)])
        return {k: v.detach().clone() for k, v in net.named_parameters()}

    plain, changed = updated(), updated(**setting)
    assert any(not torch.allclose(plain[k], changed[k]) for k in plain), setting


def test_transfer_loss_drops() -> None:
    net = _tiny().float()
    algo = make_algorithm("transfer", net, outer_lr=1e-2, aux_weight=0.0)
    tasks = [_task(2, 2, size=12)]
    losses = [algo.step(tasks)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0]


def test_anil_head_only_path_equals_the_generic_loop_and_leaves_body() -> None:
    torch.manual_seed(0)
    model = build_model(BACKBONE)
    algo = make_algorithm("anil", model, inner_steps=2, inner_lr=0.1)
    t = _task()
    out, fast = algo.adapted_query(t)
    assert set(fast) == algo.adapt_names  # the body never enters the inner loop
    params, buffers = split_state(model)
    tb = task_buffers(model, params, buffers, t.support_x)
    ref = inner_loop(model, expand_head(params, 1), tb, t.support_x, t.support_y, steps=2, lr=0.1,
                     adapt_names=algo.adapt_names, create_graph=False, loss_fn=algo.loss_fn)
    assert all(torch.equal(ref[k], params[k]) for k in params if k not in algo.adapt_names)
    assert torch.allclose(out["out"], forward(model, ref, tb, t.query_x)["out"], atol=1e-4)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_steps_one_shot_and_its_init_adapts(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(BACKBONE)
    stored = {k: v.clone() for k, v in model.named_buffers()}
    algo = make_algorithm(name, model, inner_steps=1, inner_lr=1e-4, outer_lr=1e-4)
    m = algo.step([_task(seed=3)])
    assert math.isfinite(m["loss"]) and 0.0 <= m["miou"] <= 1.0
    if name != "transfer":  # transfer trains BN the standard way; meta-learners never touch stored stats
        assert all(torch.equal(stored[k], v) for k, v in model.named_buffers())
    init = algo.export_init(backbone=BACKBONE, image_size=SIZE)
    if name == "protonet":
        assert init.head == "prototype" and init.proto_scale != 10.0  # the scale is learned
    t = _task(seed=4)
    adapted = adapt(init, t.support_x, t.support_y, 1, steps=1)
    assert adapted.predict_logits(t.query_x).shape == (1, 2, SIZE, SIZE)


@pytest.mark.parametrize("which", ["decoder", "head"])
def test_inner_params_limit_what_the_inner_loop_updates(which: str) -> None:
    from metaseg.models.deeplab import inner_param_names

    torch.manual_seed(0)
    model = build_model(BACKBONE)
    names = inner_param_names(model, which)
    assert inner_param_names(model, "all") is None
    assert names and all(n.startswith(("classifier.", "aux_classifier.")) for n in names)
    if which == "head":
        assert names == {"classifier.4.weight", "classifier.4.bias", "aux_classifier.4.weight", "aux_classifier.4.bias"}
    algo = make_algorithm("fomaml", model, inner_steps=1, inner_lr=0.1, inner_params=which)
    _, fast = algo.adapted_query(_task())
    params = dict(model.named_parameters())
    assert all(torch.equal(fast[k], params[k]) for k in params if k not in names)  # the rest stays as it is
    assert any(not torch.equal(fast[k], params[k]) for k in names if fast[k].shape == params[k].shape)
    assert algo.export_init(backbone=BACKBONE, image_size=SIZE).adapt_names == sorted(names)
    with pytest.raises(ValueError, match="unknown inner_params"):
        inner_param_names(model, "body")
