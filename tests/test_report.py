"""report.claim_check: the verdict and its numbers come from one paired statistic; the best meta-learning
algorithm is the one meta-val chose, never the one that happens to score best on the test episodes."""
from __future__ import annotations

import numpy as np

from metaseg.evaluate import EvalResult
from metaseg.report import claim_check
from metaseg.scoring import Interval, Scores

DOMAIN = "xray"


def _result(per_episode: dict[str, list[float]]) -> EvalResult:
    def scores(values: list[float]) -> Scores:
        m = float(np.mean(values))
        return Scores(miou=m, fbiou=m, class_iou={1: m}, episode=Interval(m, m, m, len(values), "t"),
                      episodes=len(values), per_episode=tuple(values))

    curves = {(DOMAIN, init, 1): [scores(v), scores(v)] for init, v in per_episode.items()}
    return EvalResult(curves=curves, overlays={}, speed={}, steps=1)


def _claim(result: EvalResult, meta_val: dict[str, float]) -> tuple[str, dict[str, float]]:
    return claim_check(result, domains=[DOMAIN], shots=[1], meta_algs=list(meta_val), meta_val=meta_val)


def test_best_algorithm_is_chosen_on_meta_val_not_on_the_test_episodes() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.4, 12)
    result = _result({"fomaml": list(base + 0.10), "anil": list(base + 0.30), "transfer": list(base)})
    text, m = _claim(result, {"fomaml": 40.0, "anil": 20.0})  # anil is far better on test, fomaml on meta-val
    assert "`fomaml` vs `transfer`" in text and m["claim.delta_points"] == np.float64(10.0).round(4)
    assert "chosen before any test episode was seen" in text


def test_verdict_comes_from_the_paired_difference() -> None:
    # accumulated means differ by 6 points, but the per-episode differences straddle zero: not met
    diffs = np.array([0.40, -0.30, 0.35, -0.25, 0.30, -0.14])
    base = np.full(6, 0.5)
    result = _result({"fomaml": list(base + diffs), "transfer": list(base)})
    text, m = _claim(result, {"fomaml": 30.0})
    assert m["claim.delta_points"] == round(100 * diffs.mean(), 4) and m["claim.ci_low"] < 0
    assert m["claim.met"] == 0.0 and "NOT MET" in text and "the CI reaches zero" in text
    # a consistent +8 points on every episode: met, and the line says MET (not NOT MET)
    steady = _result({"fomaml": list(base + 0.08 + 0.001 * np.arange(6)), "transfer": list(base)})
    text, m = _claim(steady, {"fomaml": 30.0})
    assert m["claim.met"] == 1.0 and m["claim.ci_low"] > 0 and "): MET.**" in text and "NOT MET" not in text


def test_imagenet_baseline_is_claimed_against_too_and_no_meta_val_score_refuses() -> None:
    base = np.full(4, 0.3)
    result = _result({"fomaml": list(base + 0.01), "transfer": list(base), "imagenet": list(base - 0.1)})
    text, m = _claim(result, {"fomaml": 30.0})
    assert "`fomaml` vs `imagenet`" in text and m["claim.imagenet.delta_points"] == round(11.0, 4)
    text, m = _claim(result, {"fomaml": float("nan")})
    assert "not possible" in text and m == {}


def _curves(per_step: dict[tuple[str, str], list[float]], steps: int = 3) -> EvalResult:
    """An EvalResult whose curve for (domain, init) has the given mIoU at steps 0..steps (every step on the grid)."""
    def scores(m: float) -> Scores:
        return Scores(miou=m, fbiou=m, class_iou={1: m}, episode=Interval(m, m, m, 2, "t"), episodes=2,
                      per_episode=(m, m))

    return EvalResult(curves={(d, i, 1): [scores(m) for m in ms] for (d, i), ms in per_step.items()}, overlays={},
                      speed={}, steps=steps)


def test_budget_is_chosen_on_meta_val_and_read_on_meta_test() -> None:
    """Each init's step count is the meta-val argmax (mean over meta-val domains, ties to fewer steps); the meta-test
    score reported for it is the test curve at that step, however the test curve looks."""
    from metaseg.evaluate import budget_metrics, choose_budget

    val = _curves({("v1", "a"): [.1, .5, .5, .2], ("v2", "a"): [.1, .3, .3, .2],  # a: tie at 1 and 2 -> 1 step
                   ("v1", "b"): [.6, .2, .2, .2], ("v2", "b"): [.4, .2, .2, .2],  # b: adapting hurts -> 0 steps
                   ("v1", "c"): [.1, np.nan, .2, .3], ("v2", "c"): [.1, np.nan, .2, .3]})  # c: NaN never wins
    test = _curves({(DOMAIN, "a"): [.0, .1, .9, .9], (DOMAIN, "b"): [.0, .8, .8, .8], (DOMAIN, "c"): [.0, .0, .0, .7]})
    b = choose_budget(val, test, val_domains=["v1", "v2"], shots=[1])
    assert b.steps == {("a", 1): 1, ("b", 1): 0, ("c", 1): 3}
    assert b.val_miou[("a", 1)] == 40.0 and b.val_miou[("b", 1)] == 50.0
    assert [b.result.final(DOMAIN, i, 1).miou for i in "abc"] == [.1, .0, .7]  # the test curve at the chosen step
    m = budget_metrics(b, domains=[DOMAIN], shots=[1])
    assert m["budget.a.shot1.steps"] == 1 and m["budget.mean.a.shot1.miou"] == 10.0
    assert test.final(DOMAIN, "a", 1).miou == .9  # the fixed-budget result is left as it was
