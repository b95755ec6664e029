"""The `evaluate` stage: stored episodes drive the numbers, reproducible, metric keys, report and plot files."""
from __future__ import annotations

import math

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval_helpers import ALGORITHMS, SEED, TEST_DOMAINS, make_workspace
from meta_helpers import LOSS
from timing_helpers import read_apart
from metaseg.adapt import AdaptSettings
from metaseg.cli import InputError
from metaseg.config import ConfigError, ModelConfig, TrainConfig
from metaseg.data.prepared import PreparedDataset
from metaseg.data.splits import load_episodes, load_splits
from metaseg.evaluate import EvalResult, evaluate_inits, load_inits, shared_norm
from metaseg.io import read_json
from metaseg.meta import finetune

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
INITS = [*ALGORITHMS, "scratch"]
SHOTS = [1, 2]
STEPS = 2


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("evaluate"))
    cmd = [sys.executable, str(ROOT / "pipeline/evaluate.py"), "--params", "params.yaml", "--models", "models/train",
           "--prepared", "data/prepared", "--splits", "data/splits", "--results", "results/evaluate"]
    proc = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def test_metrics_keys_per_domain_init_shot_and_mean(ws: Path) -> None:
    m = read_json(ws / "results/evaluate/metrics.json")
    for init in [*INITS, *(f"{i}_noadapt" for i in INITS)]:
        for k in SHOTS:
            for d in TEST_DOMAINS:
                for field in ("miou", "fbiou", "episode_miou"):
                    assert 0 <= m[f"{d}.{init}.shot{k}.{field}"] <= 100, (d, init, k, field)
                # a half-width, not a score: with a handful of episodes t(0.975, n-1) makes it exceed 100
                assert math.isfinite(m[f"{d}.{init}.shot{k}.ci95"]) and m[f"{d}.{init}.shot{k}.ci95"] >= 0
            assert m[f"mean.{init}.shot{k}.miou"] == pytest.approx(
                sum(m[f"{d}.{init}.shot{k}.miou"] for d in TEST_DOMAINS) / len(TEST_DOMAINS), abs=1e-3)
    assert "claim.delta_points" in m


def test_speed_goes_to_timings_not_metrics(ws: Path) -> None:
    _, timings = read_apart(ws / "results/evaluate")
    assert timings["speed.episodes_per_s"] > 0 and timings["speed.seconds"] > 0
    assert {f"speed.{init}.episodes_per_s" for init in INITS} <= set(timings)


def test_report_table_and_plot_files(ws: Path) -> None:
    out = ws / "results/evaluate"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| domain | K | fomaml | transfer | scratch | winner | CI vs runner-up |" in report
    for d in TEST_DOMAINS:
        assert f"| {d} | 1 |" in report and f"| {d} | 2 |" in report
    assert "Claim check (1-shot" in report and ("): MET.**" in report or "): NOT MET.**" in report)
    assert "`fomaml` is the best meta-learning algorithm by meta-val score (`fomaml` 12.5)" in report
    with open(out / "plots/curve.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["init"], int(r["shot"]), int(r["step"])) for r in rows} == {
        (i, k, s) for i in INITS for k in SHOTS for s in range(STEPS + 1)}  # 0, 1, 2: every step on the grid
    for name in ("shots.csv", "domains.csv", *(f"{d}_overlays.png" for d in TEST_DOMAINS)):
        assert (out / "plots" / name).stat().st_size > 0, name
    # step 0 of the curve is the no-adaptation score
    m = read_json(out / "metrics.json")
    step0 = {(r["init"], r["shot"]): float(r["miou"]) for r in rows if r["step"] == "0"}
    assert step0[("fomaml", "1")] == pytest.approx(m["mean.fomaml_noadapt.shot1.miou"], abs=1e-3)


def _run(ws: Path, episodes: dict) -> EvalResult:
    init = finetune.load_init(ws / "models/train/fomaml.pt")
    return evaluate_inits(PreparedDataset(ws / "data/prepared"), episodes, {"fomaml": init}, domains=["xray"],
                          shots=[1], settings=AdaptSettings(steps=1), device=torch.device("cpu"), seed=SEED,
                          progress=False)


def test_stored_episodes_are_the_ones_used_and_runs_repeat(ws: Path) -> None:
    episodes = load_episodes(ws / "data/splits/episodes.json")
    a, b = _run(ws, episodes), _run(ws, episodes)
    ea, eb = a.curves[("xray", "fomaml", 1)], b.curves[("xray", "fomaml", 1)]
    assert [s.per_episode for s in ea] == [s.per_episode for s in eb]  # same episodes, same numbers
    # swap the query of the first stored episode for another test image: its score changes, the other's doesn't
    first = episodes["xray"][1][0]
    test = load_splits(ws / "data/splits/splits.json")["pools"]["xray"]["test"]
    other = next(i for i in test if i not in first.query)
    changed = {**episodes, "xray": {1: [dataclasses.replace(first, query=(other,)), *episodes["xray"][1][1:]]}}
    c = _run(ws, changed).curves[("xray", "fomaml", 1)][-1]
    assert c.per_episode[0] != ea[-1].per_episode[0]
    assert c.per_episode[1:] == ea[-1].per_episode[1:]


def test_worker_processes_give_the_one_process_numbers(ws: Path) -> None:
    """evaluate.workers spreads (domain, K) units over spawned processes: same scores, same order, same overlays."""
    episodes = load_episodes(ws / "data/splits/episodes.json")
    episodes = {d: {k: eps[:2] for k, eps in per_k.items()} for d, per_k in episodes.items()}
    inits = {"fomaml": finetune.load_init(ws / "models/train/fomaml.pt"),
             "transfer": finetune.load_init(ws / "models/train/transfer.pt")}
    torch.set_num_threads(1)
    kw = dict(domains=TEST_DOMAINS, shots=SHOTS, settings=AdaptSettings(steps=1), device=torch.device("cpu"),
              seed=SEED, progress=False, overlay_images=1)
    one = evaluate_inits(PreparedDataset(ws / "data/prepared"), episodes, inits, workers=1, **kw)
    two = evaluate_inits(PreparedDataset(ws / "data/prepared"), episodes, inits, workers=2, **kw)
    assert list(one.curves) == list(two.curves)
    for key in one.curves:
        assert [s.per_episode for s in one.curves[key]] == [s.per_episode for s in two.curves[key]], key
        assert [s.miou for s in one.curves[key]] == [s.miou for s in two.curves[key]], key
    assert one.diverged == two.diverged
    for d in TEST_DOMAINS:
        assert [o.caption for o in one.overlays[d]] == [o.caption for o in two.overlays[d]]
        for a, b in zip(one.overlays[d], two.overlays[d]):
            assert a.preds.keys() == b.preds.keys() and all((a.preds[n] == b.preds[n]).all() for n in a.preds)


def test_a_failing_worker_is_an_error_not_a_hang(ws: Path) -> None:
    episodes = load_episodes(ws / "data/splits/episodes.json")
    bad = {d: {k: eps[:1] for k, eps in per_k.items()} for d, per_k in episodes.items()}
    first = bad[TEST_DOMAINS[0]][SHOTS[0]][0]
    bad[TEST_DOMAINS[0]][SHOTS[0]] = [dataclasses.replace(first, query=(10 ** 6,))]  # no such image
    init = {"fomaml": finetune.load_init(ws / "models/train/fomaml.pt")}
    with pytest.raises(RuntimeError, match="evaluate worker failed"):
        evaluate_inits(PreparedDataset(ws / "data/prepared"), bad, init, domains=TEST_DOMAINS, shots=SHOTS,
                       settings=AdaptSettings(steps=1), device=torch.device("cpu"), seed=SEED, progress=False,
                       workers=2)


def test_inits_must_match_the_model_backbone_and_normalisation(ws: Path) -> None:
    kw = dict(train=TrainConfig(), image_size=64, scratch_lr=1e-4, seed=SEED)
    tiny = ModelConfig(backbone="mobilenet_v3_large", backbone_weights=None, bn_stats="support")
    inits = load_inits(ws / "models/train", ALGORITHMS, ["scratch"], torch.device("cpu"), model=tiny, **kw)
    assert list(inits) == INITS and inits["scratch"].algorithm == "scratch"
    assert shared_norm(inits) == inits["fomaml"].norm
    lite = ModelConfig(backbone="efficientnet_lite0", backbone_weights=None, bn_stats="support")
    with pytest.raises(InputError, match="trained with backbone mobilenet_v3_large, but model.backbone is "
                                         "efficientnet_lite0"):
        load_inits(ws / "models/train", ["fomaml"], [], torch.device("cpu"), model=lite, **kw)
    with pytest.raises(ConfigError, match="imagenet init needs model.backbone_weights"):
        load_inits(ws / "models/train", ["fomaml"], ["imagenet"], torch.device("cpu"), model=tiny, **kw)
    other = finetune.fresh_init("scratch", "efficientnet_lite0", 64, inner_lr=1e-4, seed=0, backbone_weights=None,
                                  loss=LOSS)
    with pytest.raises(InputError, match="input normalisation"):
        shared_norm({"fomaml": inits["fomaml"], "lite": other})


def test_evaluate_scores_full_network_metasgd_and_protonet_inits(ws: Path, tmp_path: Path) -> None:
    """The inits the train stage writes for first-order MAML (every parameter adapts), Meta-SGD (learned rates)
    and protonet (prototypes baked into the head, head-only fine-tuning) load from their files and are adapted
    and scored by the evaluate code like any other init, curve and no-adaptation score included; Meta-SGD's file
    keeps its learned rates, and zero rates leave its score where it started."""
    from metaseg.meta.algorithms import make_algorithm
    from metaseg.models.deeplab import build_model

    inits = {}
    for i, name in enumerate(("fomaml", "metasgd", "protonet")):
        torch.manual_seed(200 + i)
        algo = make_algorithm(name, build_model("mobilenet_v3_large"), inner_steps=1, inner_lr=0.01, outer_lr=1e-3,
                              bn_stats="support")
        torch.save({**finetune.init_to_dict(algo.export_init(backbone="mobilenet_v3_large", image_size=64)),
                    "val_miou": 1.0}, tmp_path / f"{name}.pt")
        inits[name] = finetune.load_init(tmp_path / f"{name}.pt")
    assert inits["fomaml"].adapt_names is None and inits["metasgd"].inner_lrs
    assert inits["protonet"].head == "prototype" and inits["protonet"].proto_scale is not None
    frozen = dataclasses.replace(inits["metasgd"], algorithm="metasgd_zero",
                                 inner_lrs={k: torch.zeros_like(v) for k, v in inits["metasgd"].inner_lrs.items()})
    episodes = {d: {k: eps[:1] for k, eps in per_k.items()}
                for d, per_k in load_episodes(ws / "data/splits/episodes.json").items()}
    result = evaluate_inits(PreparedDataset(ws / "data/prepared"), episodes, {**inits, "metasgd_zero": frozen},
                            domains=TEST_DOMAINS, shots=SHOTS, device=torch.device("cpu"), seed=SEED, progress=False,
                            settings=AdaptSettings(steps=STEPS, lr=None, optimizer="sgd"))  # the learned rates
    for d in TEST_DOMAINS:
        for k in SHOTS:
            for name in (*inits, "metasgd_zero"):
                curve = result.curves[(d, name, k)]
                assert len(curve) == STEPS + 1 and all(math.isfinite(s.miou) for s in curve), (d, name, k)
            zero = result.curves[(d, "metasgd_zero", k)]
            assert zero[-1].per_episode == zero[0].per_episode  # no step taken: the rates are the learned ones
    learned = [result.curves[(d, "metasgd", k)] for d in TEST_DOMAINS for k in SHOTS]
    assert any(c[-1].per_episode != c[0].per_episode for c in learned)  # while the learned rates do move it


def test_step_budget_comes_from_meta_val_and_the_report_shows_it(ws: Path) -> None:
    """The stage scores the meta-val episodes too and reports each init after the step count meta-val preferred:
    the steps equal an independent meta-val run's argmax, the score equals the meta-test curve at that step."""
    from metaseg.evaluate import choose_budget

    m = read_json(ws / "results/evaluate/metrics.json")
    episodes = load_episodes(ws / "data/splits/episodes.json")
    inits = {a: finetune.load_init(ws / f"models/train/{a}.pt") for a in ALGORITHMS}
    from metaseg.config import AdaptConfig

    kw = {"shots": SHOTS, "settings": AdaptSettings.from_config(AdaptConfig(steps=STEPS)),
          "device": torch.device("cpu"), "seed": SEED, "progress": False}
    val_eps = {"desert": {k: episodes["desert"][k][:5] for k in SHOTS}}
    val = evaluate_inits(PreparedDataset(ws / "data/prepared"), val_eps, inits, domains=["desert"], **kw)
    with open(ws / "results/evaluate/plots/curve.csv", encoding="utf-8") as f:
        curve = {(r["init"], int(r["shot"]), int(r["step"])): float(r["miou"]) for r in csv.DictReader(f)}
    budget = choose_budget(val, val, val_domains=["desert"], shots=SHOTS)
    for a in ALGORITHMS:
        for k in SHOTS:
            steps = int(m[f"budget.{a}.shot{k}.steps"])
            assert steps == budget.steps[(a, k)], (a, k)
            assert m[f"budget.mean.{a}.shot{k}.miou"] == pytest.approx(curve[(a, k, steps)], abs=1e-3)
    report = (ws / "results/evaluate/report.md").read_text(encoding="utf-8")
    assert "## At the step budget chosen on meta-val" in report and "| fomaml | 1 |" in report
    assert "budget.claim.delta_points" in m
