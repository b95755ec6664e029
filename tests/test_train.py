from __future__ import annotations

import json
import math

import pytest
import torch
from meta_helpers import SIZE, make_fixture

from metaseg.config import BaseConfig, ModelConfig, TrainConfig
from metaseg.meta import algorithms
from metaseg.train import TrainingDiverged, train

BASE = BaseConfig(seed=0, image_size=SIZE, device="cpu")
MODEL = ModelConfig(backbone="mobilenet_v3_large", backbone_weights=None, bn_stats="support")  # tiny, random init
CFG = TrainConfig(iterations=4, meta_batch=1, shots=1, queries=1, inner_steps=1, inner_lr=1e-4, outer_lr=1e-4,
                  val_every=2, val_episodes=1, checkpoint_every=2, augment=True)


def _run(tmp, prepared, splits, name: str, cfg: TrainConfig = CFG, **kw):
    d = tmp / name
    return d, train("fomaml", prepared=prepared, splits=splits, out=d / "init.pt", checkpoints=d / "ck",
                    results=d / "results", base=BASE, model_cfg=MODEL, cfg=cfg, **kw)


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
    summary = json.loads((full / "results" / "metrics.json").read_text())
    assert summary["iterations"] == 4 and math.isfinite(summary["s_per_step"])
    assert {p.name for p in (full / "results" / "plots" / "metrics").glob("*.tsv")} >= {"loss.tsv", "val_miou.tsv"}
    rows = (part / "results" / "plots" / "metrics" / "loss.tsv").read_text().strip().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # no duplicates after resuming
    val_rows = (full / "results" / "plots" / "metrics" / "val_miou.tsv").read_text().strip().splitlines()
    assert [r.split("\t")[0] for r in val_rows[1:]] == ["0", "2", "4"]


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
