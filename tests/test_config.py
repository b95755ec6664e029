"""params.yaml validation: every bad value or missing key stops a stage before any work, one line naming it, exit 2."""
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
        ("train", {"nproc": 2, "nnodes": 2, "meta_batch": 3}, "4 processes but meta_batch = 3 tasks"),
        ("train", {"nproc": 0}, "train.nproc"),
        ("train", {"algorithms": ["l2o", "lstm"]}, "train.algorithms"),
        ("train", {"l2o": {"hidden": 0}}, "train.l2o.hidden"),
        ("train", {"l2o": {"contrastive_weight": -1}}, "train.l2o.contrastive_weight"),
        ("train", {"l2o": {"hiden": 4}}, "unknown key 'train.l2o.hiden' (allowed in 'train.l2o': hidden, unroll,"),
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


def _committed() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "missing sections base, model, prepare, splits, train, adapt, evaluate, export, check"),
        ("train:\n", "'train.algorithms', 'train.iterations'"),  # a section left empty
    ],
)
def test_an_incomplete_file_is_an_error_naming_what_is_missing(tmp_path: Path, text: str, needle: str) -> None:
    """No code default decides a run: params.yaml spells out every section and key (an empty file used to run on
    code defaults that differ from the committed file)."""
    params = {name: section for name, section in _committed().items() if name != "train"}
    p = tmp_path / "params.yaml"
    p.write_text(text if not text else yaml.safe_dump(params) + text)
    with pytest.raises(ConfigError) as err:
        load_config(p, "base")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    params = _committed()
    del params["train"]["outer_lr"], params["check"]["latency_runs"]
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"^'train.outer_lr': missing from .*params.yaml"):
        load_config(p, "base")  # any stage: the whole file is checked
    params["train"]["outer_lr"] = 1e-4
    del params["train"]["l2o"]["unroll"]  # a key of a nested block is named with its block
    p.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"^'train.l2o.unroll': missing from .*params.yaml"):
        load_config(p, "base")
    params["train"]["outer_lrr"] = 0.1  # a misspelt key reads as unknown, not as its right name missing
    p.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"unknown key 'train.outer_lrr'"):
        load_config(p, "base")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("base:\n  seed: 0\n  image_size: [1\nmodel: {}\n",
         "line 4, column 6: expected ',' or ']', but got ':' (while parsing a flow sequence from line 3, column 15)"),
        ("base:\n  seed: 0\n   image_size: 1\n", "line 3, column 14: mapping values are not allowed here"),
    ],
)
def test_malformed_yaml_names_line_and_column(tmp_path: Path, text: str, needle: str) -> None:
    """The position DVC's own message gives (1-based line and column), on one line."""
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p, "base")
    message = str(err.value)
    assert message.startswith(f"{p}: not valid YAML: ") and needle in message and "\n" not in message


def _validate(tmp_path: Path, params: dict) -> subprocess.CompletedProcess[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "-m", "pipeline.validate", "--params", str(p), "--out",
                           str(tmp_path / "validate" / "params.ok")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_validate_stage_stops_a_typo_in_a_section_no_stage_reruns_for(tmp_path: Path) -> None:
    """dvc.yaml runs this stage first, always: a typo under train: fails the run even when train is up to date."""
    params = _committed()
    ok = _validate(tmp_path, params)
    assert ok.returncode == 0, ok.stderr
    stamp = (tmp_path / "validate" / "params.ok").read_bytes()
    params["train"]["iteratons"] = params["train"].pop("iterations")
    bad = _validate(tmp_path / "bad", params)
    assert bad.returncode == 2
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown key 'train.iteratons'")
    assert not (tmp_path / "bad" / "validate").exists()
    params["train"]["iterations"] = 999  # a valid change: the stamp the other stages depend on stays the same
    del params["train"]["iteratons"]
    assert _validate(tmp_path, params).returncode == 0
    assert (tmp_path / "validate" / "params.ok").read_bytes() == stamp
