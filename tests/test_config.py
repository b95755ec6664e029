"""params.yaml validation: every bad value stops a stage before any work, with one line naming the key, exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metaseg.config import SECTIONS, ConfigError, load_config, parse_section

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid_and_complete() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = load_config(ROOT / "params.yaml", *SECTIONS)
    assert set(cfg) == set(SECTIONS)
    for name, section in raw.items():
        # every key written in params.yaml is a field of its config class (and so documented there)
        assert set(section) <= set(SECTIONS[name].model_fields), name


def test_config_objects_are_frozen() -> None:
    cfg = parse_section("base", {"seed": 3})
    with pytest.raises(Exception):
        cfg.seed = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("section", "raw", "needle"),
    [
        ("base", {"sead": 1}, "unknown key 'base.sead'"),
        ("base", {"image_size": 100}, "base.image_size"),
        ("base", {"image_size": "big"}, "base.image_size"),
        ("base", {"device": "tpu"}, "base.device"),
        ("splits", {"shots": [1, -5]}, "splits.shots"),
        ("splits", {"episodes": 0}, "splits.episodes"),
        ("splits", {"meta_val": ["a"], "meta_test": ["a"]}, "'a' is listed in both meta_val and meta_test"),
        ("train", {"algorithms": ["maml", "dreamer"]}, "train.algorithms"),
        ("train", {"inner_lr": -0.1}, "train.inner_lr"),
        ("prepare", {"source": "coco"}, "prepare.source"),
        ("prepare", {"min_image_side": 0}, "prepare.min_image_side"),
        ("model", {"backbone": "efficientnet_lite3"}, "model.backbone"),
        ("model", {"backbone": "resnet50", "output_stride": 8}, "output_stride 8 is for the efficientnet_lite"),
        ("model", {"output_stride": 32}, "model.output_stride"),
        ("model", {"backbone": "resnet50", "body_stage": 5}, "body_stage is for the efficientnet_lite"),
        ("model", {"body_stage": 3}, "model.body_stage"),
        ("adapt", {"body_lr": 0}, "adapt.body_lr"),
        ("model", {"backbone_weights": None}, "bn_stats 'pretrained' needs pre-trained backbone statistics"),
        ("model", {"bn_stats": "batch"}, "model.bn_stats"),
        ("train", {"inner_params": "body"}, "train.inner_params"),
        ("evaluate", {"inits": ["scratch", "imagnet"]}, "evaluate.inits"),
    ],
)
def test_bad_values_name_the_key(section: str, raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_section(section, raw)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("base: {seed: 1}\ntrian: {iterations: 3}\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(p, "base")


def test_a_stage_exits_2_with_one_line_before_any_work(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"]["image_size"] = 100
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    out = tmp_path / "prepared"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "prepare.py"), "--params", str(p), "--out", str(out),
         "--results", str(tmp_path / "results")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines and "base.image_size" in lines[-1] and "multiple of 8" in lines[-1]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1
    assert not out.exists() and not (tmp_path / "results").exists()
