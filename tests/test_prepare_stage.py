"""pipeline/prepare.py end to end (subprocess): outputs, flat metrics, and bad input -> exit 2, output untouched."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from params_helpers import write_params
from PIL import Image
from timing_helpers import read_apart

from metaseg.data.prepared import PreparedDataset

ROOT = Path(__file__).resolve().parents[1]


def stage(cwd: Path, prepare: dict) -> subprocess.CompletedProcess:
    write_params(cwd / "params.yaml", base={"seed": 0, "image_size": 32}, prepare=prepare)
    # as DVC runs it (python -m pipeline.prepare), with the repository importable from the test's own folder
    path = os.pathsep.join([str(ROOT), str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "MPLBACKEND": "Agg", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", "params.yaml",
                           "--out", "data/prepared", "--results", "results/prepare"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def bad_folder(root: Path) -> None:
    """Domain 'dom' with one good pair and one image whose mask is missing (32 px: prepare.min_image_side's default)."""
    (root / "dom/images").mkdir(parents=True)
    (root / "dom/masks").mkdir()
    (root / "dom/labels.yaml").write_text("classes: {1: thing}\nignore: [255]\n")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    for stem in ("a", "b"):
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / f"dom/images/{stem}.png")
    Image.fromarray(mask).save(root / "dom/masks/a.png")


def test_synthetic_run_writes_every_output(tmp_path: Path) -> None:
    proc = stage(tmp_path, {"source": "synthetic", "synthetic_domains": 2, "images_per_domain": 4})
    assert proc.returncode == 0, proc.stderr
    ds = PreparedDataset(tmp_path / "data/prepared")
    assert ds.domain_names == ["meadow", "marble"] and ds.domain("marble").images.shape == (4, 32, 32, 3)
    metrics, timings = read_apart(tmp_path / "results/prepare")  # the clock readings stay out of metrics.json
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # flat scalars only
    assert timings["seconds"] >= 0 and timings["images_per_s"] > 0
    assert metrics["domains"] == 2 and metrics["images"] == 8 and metrics["skipped"] == 0
    assert metrics["domain.meadow.images"] == 4
    assert json.loads((tmp_path / "results/prepare/skipped.json").read_text()) == []
    png = tmp_path / "results/prepare/plots/samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_fail_exits_2_and_leaves_output_as_it_was(tmp_path: Path) -> None:
    bad_folder(tmp_path / "raw")
    old = tmp_path / "data/prepared"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("previous run")
    proc = stage(tmp_path, {"source": "folder", "root": "raw", "on_error": "fail"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "dom/images/b.png: missing mask" in lines[0]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"]  # no temp folder left
    assert [p.name for p in old.iterdir()] == ["manifest.json"] and (old / "manifest.json").read_text() == "previous run"
    assert not (tmp_path / "results").exists()


def test_bad_input_skip_lists_it_and_counts_it(tmp_path: Path) -> None:
    bad_folder(tmp_path / "raw")
    proc = stage(tmp_path, {"source": "folder", "root": "raw", "on_error": "skip"})
    assert proc.returncode == 0, proc.stderr
    skipped = json.loads((tmp_path / "results/prepare/skipped.json").read_text())
    assert skipped == [{"file": "dom/images/b.png", "reason": "missing mask dom/masks/b.png"}]
    assert json.loads((tmp_path / "results/prepare/metrics.json").read_text())["skipped"] == 1
    assert "WARNING" in proc.stderr and "skipped 1" in proc.stderr
    assert PreparedDataset(tmp_path / "data/prepared").domain("dom").items[0].stem == "a"


@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_image_below_min_image_side_is_a_bad_file(tmp_path: Path, on_error: str) -> None:
    bad_folder(tmp_path / "raw")
    (tmp_path / "raw/dom/images/b.png").unlink()
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(tmp_path / "raw/dom/images/c.png")
    Image.fromarray(np.ones((1, 1), np.uint8)).save(tmp_path / "raw/dom/masks/c.png")
    proc = stage(tmp_path, {"source": "folder", "root": "raw", "on_error": on_error, "min_image_side": 16})
    reason = "image is 1x1 px, below prepare.min_image_side (16 px on the short side)"
    if on_error == "fail":
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and f"dom/images/c.png: {reason}" in lines[0]
        return
    assert proc.returncode == 0, proc.stderr
    skipped = json.loads((tmp_path / "results/prepare/skipped.json").read_text())
    assert skipped == [{"file": "dom/images/c.png", "reason": reason}]


@pytest.mark.parametrize("prepare, words", [({"source": "folder", "root": "nowhere"}, "prepare.root"),
                                             ({"source": "folder"}, "prepare.root"),
                                             ({"source": "synthetic", "colour": 1}, "prepare.colour")])
def test_config_and_root_errors_are_one_line(tmp_path: Path, prepare: dict, words: str) -> None:
    proc = stage(tmp_path, prepare)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr
    assert not (tmp_path / "data").exists()
