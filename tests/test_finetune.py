from __future__ import annotations

import pytest
import torch
from meta_helpers import BACKBONE, LOSS, SIZE, task

from metaseg.meta.finetune import TrainedInit, adapt, fresh_init, init_to_dict, load_init
from metaseg.meta.inner import forward
from metaseg.models.adapted import plain_deeplab
from metaseg.models.deeplab import head_names


def _init() -> TrainedInit:
    return fresh_init("scratch", BACKBONE, SIZE, inner_lr=1e-4, seed=0, backbone_weights=None, loss=LOSS)


def test_one_and_four_class_from_same_init_and_reload_identical() -> None:
    init = _init()
    stored = {k: v.clone() for k, v in init.buffers.items()}
    for classes in (1, 4):
        x, y = task(2, classes, seed=classes)
        steps_seen: list[int] = []
        model = adapt(init, x, y, classes, steps=2, on_step=lambda s, m: steps_seen.append(s))
        assert steps_seen == [0, 1, 2]
        assert model.support_loss_after < model.support_loss_before
        logits = model.predict_logits(x)
        assert logits.shape == (2, classes + 1, SIZE, SIZE)
        plain = plain_deeplab(BACKBONE, classes + 1).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.allclose(plain(x)["out"], logits, atol=1e-5)
    assert all(torch.equal(stored[k], init.buffers[k]) for k in stored)  # stored BN buffers untouched


def test_one_shot_every_path_and_roundtrip(tmp_path) -> None:
    base = _init()
    x, y = task(1, 2)
    inits = {
        "replicated": base,
        "anil": TrainedInit(**{**base.__dict__, "adapt_names": sorted(head_names(plain_deeplab(BACKBONE, 2, aux_loss=True)))}),
        "metasgd": TrainedInit(**{**base.__dict__, "inner_lrs": {k: torch.full_like(v, 1e-4) for k, v in base.params.items()}}),
        "protonet": TrainedInit(**{**base.__dict__, "head": "prototype", "proto_scale": 10.0}),
    }
    for name, init in inits.items():
        path = tmp_path / f"{name}.pt"
        torch.save(init_to_dict(init), path)
        loaded = load_init(path)
        assert (loaded.output_stride, loaded.bn_stats, loaded.norm) == (init.output_stride, init.bn_stats, init.norm)
        model = adapt(loaded, x, y, 2, steps=1, lr=1e-5 if name == "replicated" else None, optimizer="adam" if name == "replicated" else "sgd")
        assert model.predict_logits(x).shape == (1, 3, SIZE, SIZE), name
        assert model.support_loss_after < model.support_loss_before, name
        if name == "anil":
            sd = model.state_dict()
            assert torch.equal(sd["backbone.0.0.weight"], base.params["backbone.0.0.weight"])
    proto0 = adapt(inits["protonet"], x, y, 2, steps=0)
    assert proto0.support_loss_after == proto0.support_loss_before


def test_head_only_path_equals_the_generic_loop() -> None:
    """The cached-feature head-only path (ANIL) adapts exactly like the generic full-model loop (forced by an
    identity augment): the body does not move, so its BN statistics do not either."""
    base = _init()
    anil = TrainedInit(**{**base.__dict__, "adapt_names": sorted(head_names(plain_deeplab(BACKBONE, 2, aux_loss=True)))})
    x, y = task(1, 2)
    model = adapt(anil, x, y, 2, steps=1)
    generic = adapt(anil, x, y, 2, steps=1, augment=lambda a, b: (a, b))
    assert torch.allclose(generic.predict_logits(x), model.predict_logits(x), atol=1e-4)


def test_head_only_curve_predictions_equal_full_forward() -> None:
    """The adaptation curve of a head-only init (ANIL) predicts from cached body features: the per-step
    predictions must equal a full forward of the same per-step params, for a new query tensor too."""
    base = _init()
    anil = TrainedInit(**{**base.__dict__, "inner_lr": 0.5,
                          "adapt_names": sorted(head_names(plain_deeplab(BACKBONE, 2, aux_loss=True)))})
    x, y = task(2, 1, seed=3)
    query, _ = task(2, 1, seed=4)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_step(step: int, model) -> None:
        cached = model.predict_logits(query)
        again = model.predict_logits(query)  # cache hit
        full = forward(model.module, model.params, model.buffers, query)["out"]
        seen.append((cached, full))
        assert torch.equal(cached, again)
        other = query.clone()  # a different tensor with equal values goes through the body again
        assert torch.allclose(model.predict_logits(other), full, atol=1e-5)

    final = adapt(anil, x, y, 1, steps=3, on_step=on_step)
    assert len(seen) == 4
    for cached, full in seen:
        assert torch.allclose(cached, full, atol=1e-5)
    assert not torch.allclose(seen[0][0], seen[-1][0])  # the head did change
    assert torch.allclose(final.predict_logits(query), seen[-1][1], atol=1e-5)


@pytest.mark.parametrize("learned", [False, True])
def test_body_lr_scales_only_the_backbone_step(learned: bool) -> None:
    """adapt.body_lr: one SGD step moves the backbone by body_lr x its gradient and the decoder/head by lr x its
    gradient (Meta-SGD: its learned rates, the body's scaled by body_lr / inner_lr)."""
    base = _init()  # rates large enough that a step is far above float32 rounding of the weights
    init = TrainedInit(**{**base.__dict__, "inner_lr": 0.1, "inner_lrs": {
        k: torch.full_like(v, 0.1) for k, v in base.params.items()} if learned else None})
    x, y = task(2, 2, seed=3)
    delta = {}
    for body_lr in (None, 1e-2):
        model = adapt(init, x, y, 2, steps=1, lr=None if learned else 0.1, body_lr=body_lr)
        start = adapt(init, x, y, 2, steps=0)
        delta[body_lr] = {k: model.params[k] - start.params[k] for k in start.params}
    body = [k for k in delta[None] if k.startswith("backbone.") and delta[None][k].abs().max() > 0]
    rest = [k for k in delta[None] if not k.startswith("backbone.") and delta[None][k].abs().max() > 0]
    assert body and rest
    for k in body:
        torch.testing.assert_close(delta[1e-2][k], delta[None][k] * 0.1, rtol=1e-3, atol=1e-6)
    for k in rest:
        torch.testing.assert_close(delta[1e-2][k], delta[None][k], rtol=1e-3, atol=1e-6)


def test_on_step_at_scores_only_the_asked_steps_with_the_same_models() -> None:
    """evaluate scores the curve on a grid of steps (``on_step_at``): the models it sees there are the ones a
    dense curve sees, and the adaptation itself is unchanged."""
    init = _init()
    x, y = task(2, 2, seed=5)
    dense: dict[int, torch.Tensor] = {}
    sparse: dict[int, torch.Tensor] = {}
    a = adapt(init, x, y, 2, steps=3, on_step=lambda s, m: dense.__setitem__(s, m.predict_logits(x)))
    b = adapt(init, x, y, 2, steps=3, on_step=lambda s, m: sparse.__setitem__(s, m.predict_logits(x)),
              on_step_at={0, 2, 3})
    assert sorted(dense) == [0, 1, 2, 3] and sorted(sparse) == [0, 2, 3]
    for s in sparse:
        assert torch.equal(sparse[s], dense[s]), s
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_curve_steps_grid() -> None:
    from metaseg.evaluate import curve_steps

    assert curve_steps(0) == [0]
    assert curve_steps(2) == [0, 1, 2]
    assert curve_steps(5) == [0, 1, 2, 3, 5]
    assert curve_steps(20) == [0, 1, 2, 3, 5, 10, 15, 20]
    assert curve_steps(25) == [0, 1, 2, 3, 5, 10, 15, 20, 25]
