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
