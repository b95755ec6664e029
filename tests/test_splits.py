"""The `splits` stage: split invariants, determinism, one-line errors, and the stage script end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from params_helpers import write_params

from metaseg.config import ConfigError, SplitsConfig, parse_section
from metaseg.data.episodes import Episode
from metaseg.data.prepared import DomainData, PreparedDataset, write_prepared
from metaseg.data.sampler import TrainSampler
from metaseg.data.splits import (SplitLeakError, load_deploy, load_episodes, load_splits, make_splits, validate_splits,
                                 write_splits)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
DOMAINS = {"a": ["x", "y"], "b": ["x", "y", "z"], "c": ["x"], "val": ["p", "q"], "t1": ["cat", "dog"], "t2": ["rock"]}


def make_domain(name: str, classes: list[str], n: int, rng: np.random.Generator) -> DomainData:
    """Random images; each mask has a random subset of classes as blocks, some 255, ~1 in 8 background only."""
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        if i % 8 == 7:
            masks[i, :2] = 255
            continue
        for c in range(1, len(classes) + 1):
            if rng.random() < 0.6 or c == 1 + i % len(classes):
                r, s = rng.integers(0, SIZE - 4, 2)
                masks[i, r:r + 4, s:s + 4] = c
        masks[i, -1, -1] = 255
    return DomainData(name, classes, images, masks)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    write_prepared(root, [make_domain(d, cls, 24, rng) for d, cls in DOMAINS.items()], source="test", image_size=SIZE)
    return root


def cfg(**kw: object) -> SplitsConfig:
    base = {"meta_val": ["val"], "meta_test": ["t1", "t2"], "shots": [1, 3], "episodes": 10, "queries": 2,
            "support_pool": 0.5, "deploy_shots": 2}
    return SplitsConfig(**{**base, **kw})


def present(ds: PreparedDataset, name: str, i: int, c: int) -> bool:
    return bool((ds.domain(name).masks[i] == c).any())


def test_roles_resolved_and_invariants_hold(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    r = make_splits(ds, cfg(), seed=0)
    assert r.splits["meta_train"] == ["a", "b", "c"]
    assert validate_splits(ds, r.splits, r.episodes, r.deploy, train_domains=["a", "b", "c"]) == 3 * 2 * 10


def test_no_image_in_both_support_and_query(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    r = make_splits(ds, cfg(ways=2, shots=[1, 2], meta_test=["t1"]), seed=1)
    for per_k in r.episodes.values():
        for eps in per_k.values():
            for ep in eps:
                assert not set(ep.support) & set(ep.query)
    ep = r.episodes["val"][1][0]
    leaked = {**r.episodes, "val": {**r.episodes["val"], 1: [Episode("val", ep.class_ids, ep.support, ep.support[:1])]}}
    with pytest.raises(SplitLeakError, match="both support and query"):
        validate_splits(ds, r.splits, leaked, r.deploy)


def test_every_support_image_contains_its_class(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    r = make_splits(ds, cfg(ways=2, shots=[1, 2], meta_test=["t1"]), seed=2)
    for name, per_k in r.episodes.items():
        for k, eps in per_k.items():
            for ep in eps:
                assert len(ep.support) == k * len(ep.class_ids)
                for j, c in enumerate(ep.class_ids):
                    assert all(present(ds, name, i, c) for i in ep.support[j * k:(j + 1) * k])
                assert all(any(present(ds, name, i, c) for c in ep.class_ids) for i in ep.query)


def test_pools_disjoint_and_episodes_use_them(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    r = make_splits(ds, cfg(), seed=0)
    for name, pools in r.splits["pools"].items():
        sup, test = set(pools["support"]), set(pools["test"])
        assert not sup & test and sup | test == set(range(len(ds.domain(name))))
        for eps in r.episodes[name].values():
            assert all(set(ep.support) <= sup and set(ep.query) <= test for ep in eps)
    bad = {**r.splits, "pools": {**r.splits["pools"], "t2": {"support": [0, 1], "test": [1, 2]}}}
    with pytest.raises(SplitLeakError, match="both the support and the test pool"):
        validate_splits(ds, bad, r.episodes, r.deploy)


def test_training_sampler_never_reaches_held_out_images(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    r = make_splits(ds, cfg(), seed=0)
    sampler = TrainSampler(ds, r.splits["meta_train"], ways=1, shots=2, queries=2, seed=0)
    seen = {sampler.sample().domain for _ in range(2000)}
    assert seen == {"a", "b", "c"}  # every meta-train domain, nothing held out
    validate_splits(ds, r.splits, r.episodes, r.deploy, train_domains=sampler.domains)
    with pytest.raises(SplitLeakError, match="held-out domains"):
        validate_splits(ds, r.splits, r.episodes, r.deploy, train_domains=["a", "t1"])


def test_deploy_covers_every_class(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    r = make_splits(ds, cfg(deploy_shots=3), seed=0)
    assert set(r.deploy) == {"t1", "t2"}
    for name, ep in r.deploy.items():
        sup = set(r.splits["pools"][name]["support"])
        assert set(ep.support) <= sup and ep.class_ids == tuple(range(1, ds.domain(name).num_classes + 1))
        for c in ep.class_ids:
            assert sum(present(ds, name, i, c) for i in ep.support) >= 3
    validate_splits(ds, r.splits, r.episodes, r.deploy, deploy_shots=3)
    short = {**r.deploy, "t2": Episode("t2", (1,), r.deploy["t2"].support[:2], ())}
    with pytest.raises(SplitLeakError, match=r"classes \[1\] have fewer than 3 images"):
        validate_splits(ds, r.splits, r.episodes, short, deploy_shots=3)


def write_all(ds: PreparedDataset, out: Path, seed: int) -> dict[str, bytes]:
    write_splits(out, make_splits(ds, cfg(), seed=seed))
    return {f: (out / f).read_bytes() for f in ("splits.json", "episodes.json", "deploy.json")}


def test_same_seed_byte_identical_different_seed_differs(prepared: Path, tmp_path: Path) -> None:
    ds = PreparedDataset(prepared)
    first, again = write_all(ds, tmp_path / "1", 7), write_all(ds, tmp_path / "2", 7)
    assert first == again
    other = write_all(ds, tmp_path / "3", 8)
    assert all(first[f] != other[f] for f in first)


def test_load_functions_round_trip(prepared: Path, tmp_path: Path) -> None:
    ds = PreparedDataset(prepared)
    r = make_splits(ds, cfg(), seed=0)
    write_splits(tmp_path, r)
    assert load_episodes(tmp_path / "episodes.json") == r.episodes
    assert load_deploy(tmp_path / "deploy.json") == r.deploy
    assert load_splits(tmp_path / "splits.json") == r.splits


def test_too_many_shots_names_domain_class_and_count(prepared: Path) -> None:
    ds = PreparedDataset(prepared)
    n = sum(present(ds, "t2", i, 1) for i in make_splits(ds, cfg(), seed=0).splits["pools"]["t2"]["support"])
    with pytest.raises(ValueError) as err:
        make_splits(ds, cfg(shots=[50]), seed=0)
    msg = str(err.value)
    assert "\n" not in msg and "'val'" in msg and "class 'p' (id 1)" in msg and "support" in msg
    with pytest.raises(ValueError, match=rf"'t2' class 'rock' \(id 1\) has {n} support-pool images, 40 needed"):
        make_splits(ds, cfg(deploy_shots=40, meta_test=["t2"]), seed=0)


def test_domain_with_fewer_classes_than_ways(prepared: Path) -> None:
    with pytest.raises(ValueError, match="'t2' has 1 classes, fewer than ways=2"):
        make_splits(PreparedDataset(prepared), cfg(ways=2), seed=0)


def test_domain_in_two_roles_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'val' is listed in both meta_val and meta_test"):
        parse_section("splits", {"meta_val": ["val"], "meta_test": ["val"]})


def test_unknown_domain_names_the_key(prepared: Path) -> None:
    with pytest.raises(ConfigError, match=r"'splits.meta_test': domain 'nope' .*available: a, b, c, val, t1, t2"):
        make_splits(PreparedDataset(prepared), cfg(meta_test=["nope"]), seed=0)
    with pytest.raises(ConfigError, match="no domain left for meta-training"):
        make_splits(PreparedDataset(prepared), cfg(meta_val=["a", "b", "c", "val"]), seed=0)


def run_stage(tmp_path: Path, prepared: Path, splits: dict[str, object]) -> subprocess.CompletedProcess[str]:
    params = tmp_path / "params.yaml"
    write_params(params, base={"seed": 3}, splits=splits)
    cmd = [sys.executable, str(ROOT / "pipeline" / "splits.py"), "--params", str(params), "--prepared", str(prepared),
           "--out", str(tmp_path / "splits"), "--results", str(tmp_path / "results")]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_stage_script_writes_files_and_metrics(prepared: Path, tmp_path: Path) -> None:
    good = {"meta_val": ["val"], "meta_test": ["t1"], "shots": [1, 2], "episodes": 4, "support_pool": 0.5,
            "deploy_shots": 2}
    proc = run_stage(tmp_path, prepared, good)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == ["deploy.json", "episodes.json", "splits.json"]
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["meta_train_domains"] == 4 and metrics["episodes"] == 2 * 2 * 4
    assert metrics["t1.support_pool"] + metrics["t1.test_pool"] == 24
    before = (tmp_path / "splits" / "episodes.json").read_bytes()
    bad = run_stage(tmp_path, prepared, {**good, "meta_test": ["nope"]})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "splits.meta_test" in bad.stderr
    assert (tmp_path / "splits" / "episodes.json").read_bytes() == before  # a failed run leaves the old outputs
