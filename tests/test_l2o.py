"""l2o: the learned LSTM optimiser starts as SGD, its meta-gradient is exact, its task embedding separates domains,
and adaptation (adapt / evaluate) runs the very rule meta-training unrolled."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from meta_helpers import LITE, TinyDeepLab, task

from metaseg.meta import algorithms
from metaseg.meta.algorithms import make_algorithm
from metaseg.meta.finetune import adapt, init_to_dict, load_init
from metaseg.meta.heads import DecoderOnly, body_features, expand_head
from metaseg.meta.inner import inner_loop, seg_loss, split_state, task_buffers
from metaseg.meta.l2o import LearnedOptimizer, task_features
from metaseg.models.adapted import plain_deeplab
from metaseg.models.deeplab import build_model

SMALL = {"hidden": 3, "embedding": 4}


def _task(seed: int, domain: str = "a", *, size: int = 16, shots: int = 2, dtype=torch.float64) -> SimpleNamespace:
    x, y = task(shots + 2, 1, seed=seed, size=size)
    x = x.to(dtype)
    return SimpleNamespace(support_x=x[:shots], support_y=y[:shots], query_x=x[shots:], query_y=y[shots:],
                           class_ids=(1,), domain=domain)


def _tiny(seed: int = 0, width: int = 4) -> TinyDeepLab:
    torch.manual_seed(seed)
    return TinyDeepLab(width).double()


def test_the_untrained_optimiser_is_an_sgd_inner_loop() -> None:
    """Meta-training starts from plain SGD at the inner lr: five steps of the freshly initialised LSTM move the
    decoder as five SGD steps do, within 5 % of the displacement."""
    net, t = _tiny(), _task(1)
    params, buffers = split_state(net)
    tb = task_buffers(net, params, buffers, t.support_x)
    feats = body_features(net, params, tb, t.support_x)
    decoder, db = DecoderOnly(net, (16, 16)), {k: v for k, v in tb.items() if k.startswith("classifier.")}
    start = {k: v.detach() for k, v in expand_head(params, 1).items() if k.startswith("classifier.")}
    torch.manual_seed(1)
    opt = LearnedOptimizer(4, **SMALL).double()
    rule = opt.rule(opt.embed(torch.randn(2, 4, dtype=torch.float64)), 0.5)
    run = lambda optimizer: inner_loop(decoder, start, db, feats, t.support_y, steps=5, lr=0.5,  # noqa: E731
                                       optimizer=optimizer, adapt_names=None, create_graph=False, loss_fn=seg_loss,
                                       bn_stats="support")
    learned, sgd = (torch.cat([v.detach().view(-1) for v in run(o).values()]) for o in (rule, "sgd"))
    moved = (sgd - torch.cat([v.view(-1) for v in start.values()])).norm()
    assert moved > 0.05 and (learned - sgd).norm() <= 0.05 * moved


def _objective(algo, tasks) -> torch.Tensor:
    """What one step minimises: the tasks' mean query loss after the unrolled steps + the contrastive term."""
    loss = sum(algo.task_loss(t)[0] for t in tasks) / len(tasks)
    return loss + algo.batch_loss()[0]


def test_one_meta_step_trains_the_optimiser_and_embedding_with_the_exact_gradient(monkeypatch) -> None:
    """The meta-gradient reaching the LSTM, the embedding projection and the initialisation (body and decoder) is
    the finite-difference gradient of the step's objective (query loss through both unrolled second-order steps, plus
    the contrastive term); one step changes every learned tensor. The BN statistics the query is predicted with and
    the body features the embedding reads are computed without grad (constants to the meta-gradient: the
    embedding never trains the body), so both are frozen at the unperturbed point for the finite differences."""
    replay = {"on": False}

    def frozen(real):
        recorded, at = [], {"i": 0}

        def call(*args, **kw):
            if not replay["on"]:
                out = real(*args, **kw)
                recorded.append({k: v.detach() for k, v in out.items()} if isinstance(out, dict) else out.detach())
                return recorded[-1]
            at["i"] += 1
            return recorded[(at["i"] - 1) % len(recorded)]
        return call

    real_buffers = algorithms.task_buffers
    monkeypatch.setattr(algorithms, "task_buffers", frozen(real_buffers))
    monkeypatch.setattr(algorithms, "task_features", frozen(algorithms.task_features))
    net, tasks = _tiny(), [_task(1, "a"), _task(2, "b")]
    algo = make_algorithm("l2o", net, inner_lr=0.5, aux_weight=0.0, outer_optimizer="sgd", outer_lr=0.0,
                          l2o={**SMALL, "unroll": 2, "contrastive_weight": 0.5, "learned_lr": 0.0})
    tensors = {**dict(net.named_parameters()), **algo.extra_parameters()}
    _objective(algo, tasks).backward()
    grads = {k: v.grad.clone() for k, v in tensors.items()}
    replay["on"] = True
    eps = 1e-6
    for k in ("l2o.weight_in", "l2o.weight_task", "l2o.bias", "l2o.readout", "l2o.readout_bias", "l2o.project.weight",
              "backbone.layers.0.weight", "classifier.0.weight", "classifier.4.weight"):
        assert grads[k].abs().max() > 0, k
        flat = tensors[k].data.view(-1)
        for i in (0, len(flat) - 1):  # readout: the step-size and the additive column
            flat[i] += eps
            plus = float(_objective(algo, tasks).detach())
            flat[i] -= 2 * eps
            minus = float(_objective(algo, tasks).detach())
            flat[i] += eps
            fd = (plus - minus) / (2 * eps)
            assert grads[k].view(-1)[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-9), (k, i)
    monkeypatch.setattr(algorithms, "task_buffers", real_buffers)
    algo = make_algorithm("l2o", net, inner_lr=0.5, aux_weight=0.0, outer_lr=1e-3, l2o={**SMALL, "unroll": 2})
    before = {k: v.detach().clone() for k, v in algo.extra_parameters().items()}
    m = algo.step(tasks)
    assert all(not torch.equal(before[k], v) for k, v in algo.extra_parameters().items())
    assert {"contrastive", "embed_dist_same", "embed_dist_cross"} <= set(m)


def _domain_task(seed: int, domain: int, size: int = 16) -> SimpleNamespace:
    """Toy domains: the background's colour and stripes belong to the domain, the object's colour to the task."""
    g = torch.Generator().manual_seed(seed)
    _, y = task(4, 1, seed=seed, size=size)
    background = torch.zeros(3, 1, 1)
    background[domain % 3] = 1.0
    stripes = torch.sin(torch.arange(size) * (0.5 + domain)).view(1, 1, size)
    colour = 1.5 * torch.randn(3, 1, 1, generator=g)
    x = torch.where((y == 1).unsqueeze(1), colour, background + 0.5 * stripes)
    x = (x + 0.1 * torch.randn(x.shape, generator=g)).double()
    return SimpleNamespace(support_x=x[:2], support_y=y[:2], query_x=x[2:], query_y=y[2:], class_ids=(1,),
                           domain=str(domain))


def test_tasks_of_one_domain_get_closer_embeddings_after_short_training() -> None:
    """After 15 meta-steps on three toy domains (meta-batches of two tasks from each of two domains), held-out
    tasks of one domain lie closer together than tasks of two domains (mean embedding distance under half), and
    the ratio of the two has fallen below half the untrained projection's (which the objects' colours swamp)."""
    net = _tiny(width=8)
    algo = make_algorithm("l2o", net, inner_lr=0.1, aux_weight=0.0, outer_lr=1e-3, bn_stats="pretrained",
                          l2o={**SMALL, "unroll": 1, "contrastive_weight": 1.0, "learned_lr": 0.03})
    held_out = [_domain_task(1000 + 10 * d + i, d) for d in range(3) for i in range(3)]

    def distances() -> tuple[float, float]:
        with torch.no_grad():
            params, buffers = split_state(net)
            views = [task_features(body_features(net, params, buffers, t.support_x)["out"], t.support_y)
                     for t in held_out]  # bn_stats pretrained: the body normalises with its stored statistics
            emb = algo.learned.embed(torch.stack(views))
        d = torch.cdist(emb, emb)
        same = torch.tensor([[a.domain == b.domain for b in held_out] for a in held_out])
        off = ~torch.eye(len(held_out), dtype=torch.bool)
        return float(d[same & off].mean()), float(d[~same].mean())

    same0, cross0 = distances()
    for step in range(15):
        algo.step([_domain_task(10 * step + 3 * d + j, d) for d in (step % 3, (step + 1) % 3) for j in range(2)])
    same, cross = distances()
    assert same < 0.5 * cross and same / cross < 0.5 * same0 / cross0, (same0, cross0, same, cross)


def test_adaptation_runs_the_rule_meta_training_unrolled(tmp_path) -> None:
    """The exported init adapts (``finetune.adapt``, what the adapt and evaluate stages call) with its learned
    optimiser: ``unroll`` steps reproduce meta-training's inner loop, the Adam / lr settings do not apply to it, the
    init survives its file, and the adapted model is an ordinary DeepLab state_dict."""
    torch.manual_seed(0)
    model = build_model(LITE, body_stage=4)
    algo = make_algorithm("l2o", model, inner_lr=0.05, l2o={**SMALL, "unroll": 2})
    for v in algo.extra_parameters().values():  # a trained-looking optimiser: not SGD any more
        v.data.add_(0.3 * torch.randn_like(v))
    t = _task(3, size=32, dtype=torch.float32)
    out = {k: v.detach() for k, v in algo.adapted_query(t)[0].items()}
    init = algo.export_init(backbone=LITE, image_size=32, body_stage=4)
    path = tmp_path / "l2o.pt"
    torch.save(init_to_dict(init), path)
    init = load_init(path)
    assert init.learned_optimizer is not None and init.adapt_names == sorted(algo.adapt_names)
    adapted = adapt(init, t.support_x, t.support_y, 1, steps=2)
    assert torch.allclose(adapted.predict_logits(t.query_x), out["out"], atol=1e-3)  # float32, logits ~3
    other = adapt(init, t.support_x, t.support_y, 1, steps=2, optimizer="adam", lr=1.0, body_lr=1.0)
    assert all(torch.equal(other.params[k], v) for k, v in adapted.params.items())
    init.learned_optimizer = None
    sgd = adapt(init, t.support_x, t.support_y, 1, steps=2, lr=0.05)
    assert not torch.allclose(sgd.predict_logits(t.query_x), out["out"], atol=1e-2)  # the learned rule made the step
    plain = plain_deeplab(LITE, 2, body_stage=4).eval()
    plain.load_state_dict(adapted.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(t.query_x)["out"], adapted.predict_logits(t.query_x), atol=1e-4)
    assert all(not k.startswith("backbone.") for k in init.adapt_names)  # the body stays as meta-trained
