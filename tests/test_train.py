from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from meta_helpers import SIZE, make_fixture
from params_helpers import write_params
from timing_helpers import read_apart

from metaseg.config import AdaptConfig, BaseConfig, ModelConfig, SplitsConfig, TrainConfig
from metaseg.meta import algorithms
from metaseg import train as train_mod
from metaseg.train import TrainingDiverged, train

BASE = BaseConfig(seed=0, image_size=SIZE, device="cpu")
MODEL = ModelConfig(backbone="mobilenet_v3_large", backbone_weights=None, bn_stats="support")  # tiny, random init
CFG = TrainConfig(iterations=4, meta_batch=1, shots=1, queries=1, inner_steps=1, inner_lr=1e-4, outer_lr=1e-4,
                  val_every=2, val_episodes=1, checkpoint_every=2, augment=True)
ADAPT = AdaptConfig(steps=1, lr=1e-4, optimizer="sgd")


def _run(tmp, prepared, splits, name: str, cfg: TrainConfig = CFG, **kw):
    d = tmp / name
    return d, train("fomaml", prepared=prepared, splits=splits, out=d / "init.pt", checkpoints=d / "ck",
                    results=d / "results", base=BASE, model_cfg=MODEL, cfg=cfg,
                    adapt_cfg=kw.pop("adapt_cfg", ADAPT), **kw)


def test_resumed_run_reaches_the_same_weights(tmp_path) -> None:
    prepared, splits = make_fixture(tmp_path)
    full, metrics = _run(tmp_path, prepared, splits, "full")
    part, stopped = _run(tmp_path, prepared, splits, "part", stop_after=2)
    assert stopped is None and not (part / "init.pt").exists() and (part / "ck" / "last.pt").exists()
    _, resumed = _run(tmp_path, prepared, splits, "part")
    a = torch.load(full / "ck" / "last.pt", weights_only=False)["algorithm"]["model"]
    b = torch.load(part / "ck" / "last.pt", weights_only=False)["algorithm"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ia, ib = torch.load(full / "init.pt", weights_only=False), torch.load(part / "init.pt", weights_only=False)
    assert ia["iteration"] == ib["iteration"] and all(torch.equal(ia["params"][k], ib["params"][k]) for k in ia["params"])
    summary, timings = read_apart(full / "results")  # DVCLive's summary keeps the quality numbers only
    assert summary["iterations"] == 4 and {"loss", "query_miou", "val_miou", "best_val_miou"} <= set(summary)
    assert set(timings) == {"train_time_s", "s_per_step"} and math.isfinite(timings["s_per_step"])
    assert {p.name for p in (full / "results" / "plots" / "metrics").glob("*.tsv")} >= {"loss.tsv", "val_miou.tsv"}
    rows = (part / "results" / "plots" / "metrics" / "loss.tsv").read_text().strip().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # no duplicates after resuming
    step_rows = (part / "results" / "plots" / "metrics" / "step_time_s.tsv").read_text().strip().splitlines()
    assert step_rows[0] == "step\tstep_time_s" and [r.split("\t")[0] for r in step_rows[1:]] == ["1", "2", "3", "4"]
    assert all(float(r.split("\t")[1]) > 0 for r in step_rows[1:])
    read_apart(part / "results")
    val_rows = (full / "results" / "plots" / "metrics" / "val_miou.tsv").read_text().strip().splitlines()
    assert [r.split("\t")[0] for r in val_rows[1:]] == ["0", "2", "4"]


def _curves(results: Path) -> dict[str, list[list[str]]]:
    return {p.stem: [r.split("\t") for r in p.read_text().splitlines()]
            for p in sorted((results / "plots" / "metrics").glob("*.tsv"))}


def test_curves_survive_two_kills_and_dvc_deleting_the_plots(tmp_path) -> None:
    """Under `dvc repro` a rerun stage starts with its plots deleted: the resumed run's curves still equal the
    uninterrupted run's, row for row (step_time_s: same steps, its own times)."""
    import shutil

    prepared, splits = make_fixture(tmp_path)
    full, _ = _run(tmp_path, prepared, splits, "full")
    part = tmp_path / "part"
    for stop in (2, 3):  # the second kill comes after iteration 3, past the checkpoint at 2
        _, stopped = _run(tmp_path, prepared, splits, "part", stop_after=stop)
        assert stopped is None
        shutil.rmtree(part / "results")  # what DVC does to a stage's non-persistent outputs before rerunning it
    _run(tmp_path, prepared, splits, "part")
    want, got = _curves(full / "results"), _curves(part / "results")
    assert set(want) == set(got) >= {"loss", "query_miou", "lr", "val_miou", "step_time_s"}
    for name in want:
        if name == "step_time_s":
            assert [r[0] for r in got[name]] == [r[0] for r in want[name]] == ["step", "1", "2", "3", "4"]
        else:
            assert got[name] == want[name], name
    assert [r[0] for r in want["val_miou"]] == ["step", "0", "2", "4"]
    assert json.loads((part / "results" / "metrics.json").read_text()) == json.loads(
        (full / "results" / "metrics.json").read_text())


def test_nan_loss_stops_with_one_line_and_writes_nothing(tmp_path, monkeypatch) -> None:
    prepared, splits = make_fixture(tmp_path)
    real, calls = algorithms.FOMAML.step, {"n": 0}

    def step(self, tasks):
        calls["n"] += 1
        m = real(self, tasks)
        return {**m, "loss": float("nan")} if calls["n"] == 3 else m

    monkeypatch.setattr(algorithms.FOMAML, "step", step)
    d = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"iteration 3; .*last.pt \(iteration 2\)") as err:
        _run(tmp_path, prepared, splits, "nan")
    assert "\n" not in str(err.value)
    assert not (d / "init.pt").exists()
    assert torch.load(d / "ck" / "last.pt", weights_only=False)["iteration"] == 2


def test_meta_val_scores_as_the_evaluate_stage_does(tmp_path, monkeypatch) -> None:
    """The number a checkpoint is chosen on is the evaluate stage's number: the same function, the adapt rule."""
    prepared, splits = make_fixture(tmp_path)
    seen = []
    real = train_mod.evaluate_inits

    def spy(*args, **kw):
        seen.append(kw["settings"])
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "evaluate_inits", spy)
    adapt_cfg = AdaptConfig(steps=2, lr=3e-4, body_lr=1e-5, optimizer="adam")
    d, metrics = _run(tmp_path, prepared, splits, "val", adapt_cfg=adapt_cfg)
    assert len(seen) == 3 and all(s.steps == 2 and s.optimizer == "adam" and s.lr == 3e-4 and s.body_lr == 1e-5
                                  for s in seen)
    best = torch.load(d / "init.pt", weights_only=False)
    assert best["val_miou"] == pytest.approx(metrics["best_val_miou"])
    assert 0 <= metrics["best_val_miou"] <= 100  # percent, like the evaluate report


def test_all_nan_validation_ships_the_last_iteration_not_the_untrained_init(tmp_path, monkeypatch) -> None:
    prepared, splits = make_fixture(tmp_path)
    monkeypatch.setattr(train_mod, "meta_validate", lambda *a, **k: float("nan"))
    d, metrics = _run(tmp_path, prepared, splits, "nanval")
    shipped = torch.load(d / "init.pt", weights_only=False)
    assert shipped["iteration"] == CFG.iterations and metrics["best_iteration"] == CFG.iterations
    last = torch.load(d / "ck" / "last.pt", weights_only=False)["algorithm"]["model"]
    assert all(torch.equal(shipped["params"][k], last[k]) for k in shipped["params"])


def test_empty_meta_val_is_rejected() -> None:
    with pytest.raises(ValueError, match="meta_val must name at least one domain"):
        SplitsConfig(meta_val=[], meta_test=["x"])


def test_meta_validate_is_the_evaluate_stage_number(tmp_path) -> None:
    """meta_validate (final step only) equals what the evaluate stage reports for the same init and episodes."""
    from metaseg.adapt import AdaptSettings
    from metaseg.data.prepared import PreparedDataset
    from metaseg.evaluate import evaluate_inits
    from metaseg.meta.algorithms import make_algorithm
    from metaseg.models.deeplab import build_model

    prepared, splits = make_fixture(tmp_path)
    dataset = PreparedDataset(prepared)
    roles = json.loads((splits / "splits.json").read_text())
    episodes = train_mod.val_episodes(splits / "episodes.json", roles["meta_val"], 1, 2)
    torch.manual_seed(0)
    algo = make_algorithm("fomaml", build_model(MODEL.backbone, backbone_weights=None), inner_lr=1e-3)
    settings = AdaptSettings(steps=3, lr=1e-3, optimizer="adam")
    kw = {"backbone": MODEL.backbone, "image_size": SIZE}
    score = train_mod.meta_validate(algo, dataset, episodes, settings=settings, device=torch.device("cpu"), seed=0,
                                    **kw)
    init = algo.export_init(**kw)
    full = evaluate_inits(dataset, episodes, {"x": init}, domains=sorted(episodes), shots=[1], settings=settings,
                          device=torch.device("cpu"), seed=0, progress=False)
    assert math.isfinite(score)
    assert score == pytest.approx(100 * sum(full.final(d, "x", 1).miou for d in episodes) / len(episodes), abs=1e-3)


def test_query_labels_never_reach_adaptation(tmp_path) -> None:
    """Scrambling the query images' masks changes the scores but not one predicted pixel: adaptation (evaluate,
    meta-validation) sees the support labels only."""
    import numpy as np

    from metaseg.adapt import AdaptSettings
    from metaseg.data.prepared import PreparedDataset
    from metaseg.evaluate import evaluate_inits
    from metaseg.meta.finetune import fresh_init
    from meta_helpers import LOSS

    prepared, splits = make_fixture(tmp_path)
    episodes = train_mod.val_episodes(splits / "episodes.json", ["d"], 1, 2)
    init = fresh_init("scratch", MODEL.backbone, SIZE, inner_lr=1e-3, seed=0, backbone_weights=None, loss=LOSS)
    settings = AdaptSettings(steps=2, lr=1e-3, optimizer="adam")

    def run():
        ds = PreparedDataset(prepared)
        r = evaluate_inits(ds, episodes, {"x": init}, domains=["d"], shots=[1], settings=settings,
                           device=torch.device("cpu"), seed=0, progress=False, overlay_images=10)
        return [o.preds["x"] for o in r.overlays["d"]], r.final("d", "x", 1).miou

    preds, score = run()
    masks_path = prepared / "d" / "masks.npy"
    masks = np.load(masks_path)
    stored = episodes["d"][1]
    queries = sorted({q for ep in stored for q in ep.query} - {s for ep in stored for s in ep.support})
    masks[queries] = np.where(masks[queries] == 0, 1, 0).astype(np.uint8)  # every query label flipped
    np.save(masks_path, masks)
    scrambled, scrambled_score = run()
    assert len(preds) == len(scrambled) > 0
    assert all(np.array_equal(a, b) for a, b in zip(preds, scrambled))
    assert scrambled_score != score


def test_stage_rejects_more_shots_than_a_domain_holds_with_one_line(tmp_path) -> None:
    """train.shots + train.queries above every meta-train class's image count: exit 2 with one line naming the key
    and the limit, before anything is written (a 14-line ValueError traceback, exit 1, before)."""
    prepared, splits = make_fixture(tmp_path)  # 8 images per domain, each class in 4 of them
    params = write_params(tmp_path / "params.yaml", base={"image_size": SIZE, "device": "cpu"},
                          model=MODEL.model_dump(), train={"shots": 4, "queries": 1})
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", str(params), "--algorithm", "fomaml",
                           "--prepared", str(prepared), "--splits", str(splits), "--out", str(out / "init.pt"),
                           "--checkpoints", str(out / "ck"), "--results", str(out / "results")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and len([ln for ln in lines if ln.startswith("error:")]) == 1
    assert lines[-1].startswith("error: 'train.shots': ") and "at most 4 " in lines[-1]
    assert not out.exists()


def test_a_corrupt_checkpoint_is_one_line_not_a_silent_fresh_start(tmp_path) -> None:
    from metaseg.cli import InputError

    prepared, splits = make_fixture(tmp_path)
    (tmp_path / "bad" / "ck").mkdir(parents=True)
    (tmp_path / "bad" / "ck" / "last.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(InputError, match=r"last.pt: not a readable training checkpoint .*delete it") as err:
        _run(tmp_path, prepared, splits, "bad")
    assert "\n" not in str(err.value) and not (tmp_path / "bad" / "init.pt").exists()


def test_a_checkpoint_of_other_params_is_not_resumed(tmp_path, caplog) -> None:
    """`dvc exp run -S train.outer_lr=...` finds the persistent checkpoint of the previous params: it must start afresh
    (with a warning), giving exactly the weights of a clean run with the new params."""
    prepared, splits = make_fixture(tmp_path)
    other = CFG.model_copy(update={"outer_lr": 3e-4})
    _, stopped = _run(tmp_path, prepared, splits, "mixed", stop_after=2)
    assert stopped is None
    with caplog.at_level("WARNING"):
        mixed, _ = _run(tmp_path, prepared, splits, "mixed", cfg=other)
    assert "written with another config; starting a fresh run" in caplog.text
    clean, _ = _run(tmp_path, prepared, splits, "clean", cfg=other)
    a = torch.load(mixed / "ck" / "last.pt", weights_only=False)["algorithm"]["model"]
    b = torch.load(clean / "ck" / "last.pt", weights_only=False)["algorithm"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_l2o_logs_its_embedding_distances_and_ships_its_optimiser(tmp_path) -> None:
    """train@l2o: the contrastive term and the same- / cross-domain embedding distances reach DVCLive every
    iteration a batch has such pairs, and the shipped init carries the learned optimiser adaptation runs."""
    from metaseg.meta.finetune import adapt, load_init
    from metaseg.models.backbones import normalization

    prepared, splits = make_fixture(tmp_path)
    model = ModelConfig(backbone="efficientnet_lite0", body_stage=4, backbone_weights=None, bn_stats="support")
    cfg = TrainConfig(**{**CFG.model_dump(), "iterations": 2, "meta_batch": 3, "val_every": 2,
                         "l2o": {"hidden": 2, "unroll": 1}})
    d = tmp_path / "l2o"
    train("l2o", prepared=prepared, splits=splits, out=d / "init.pt", checkpoints=d / "ck", results=d / "results",
          base=BASE, model_cfg=model, cfg=cfg, adapt_cfg=ADAPT)
    plots = d / "results" / "plots" / "metrics"
    for name in ("contrastive", "embed_dist_same"):  # support and query of one task: a same-domain pair always
        rows = (plots / f"{name}.tsv").read_text().strip().splitlines()
        steps, values = zip(*(r.split("\t") for r in rows[1:]))
        assert steps == ("1", "2") and all(float(v) >= 0 for v in values)
    init = load_init(d / "init.pt")
    assert init.algorithm == "l2o" and init.learned_optimizer is not None
    x = torch.zeros(1, 3, SIZE, SIZE)
    y = torch.zeros(1, SIZE, SIZE, dtype=torch.int64)
    y[:, :20, :20] = 1
    assert init.norm == tuple(map(list, normalization("efficientnet_lite0")))
    assert adapt(init, x, y, 1, steps=2).predict_logits(x).shape == (1, 2, SIZE, SIZE)
