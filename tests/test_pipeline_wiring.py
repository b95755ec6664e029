"""params.yaml and dvc.yaml stay in step with the config classes: one name per stage, params flow one way."""
from __future__ import annotations

from pathlib import Path

import yaml

from metaseg.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _stage(name: str) -> dict:
    stage = DVC[name]
    return stage.get("do", stage)


def _declared(name: str) -> set[str]:
    return {p for p in _stage(name).get("params", []) if isinstance(p, str)}


def test_params_yaml_spells_out_every_key() -> None:
    # DVC templating and `dvc params diff` see only what params.yaml writes, not the config defaults
    for section, cls in SECTIONS.items():
        assert set(PARAMS[section]) == set(cls.model_fields), section


def test_one_name_per_stage() -> None:
    for name in DVC:
        assert (ROOT / "pipeline" / f"{name}.py").is_file(), name
        assert name in SECTIONS, name
        assert f"pipeline/{name}.py" in _stage(name)["cmd"]


def test_train_stages_rerun_on_their_keys_only() -> None:
    # every TrainConfig key but the list of algorithms: adding an algorithm does not retrain the others
    keys = {p.removeprefix("train.") for p in _declared("train") if p.startswith("train.")}
    assert keys == set(SECTIONS["train"].model_fields) - {"algorithms"}


def test_splits_change_does_not_rerun_prepare() -> None:
    assert not any(p.startswith("splits") for p in _declared("prepare"))
    assert "splits" in _declared("splits")
