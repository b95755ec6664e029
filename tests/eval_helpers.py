"""A tiny workspace for the adapt / evaluate stage tests: synthetic 64 px domains, stored splits, two 'trained' inits.

The inits are seeded random models saved in the trained-init format (``finetune.init_to_dict``) under algorithm
names, so the stages run without a meta-training run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from meta_helpers import LOSS
from params_helpers import full_params
from metaseg.config import SplitsConfig
from metaseg.data.prepared import PreparedDataset, write_prepared
from metaseg.data.splits import make_splits, write_splits
from metaseg.data.synthetic import generate_domain
from metaseg.meta import finetune
from metaseg.models.deeplab import HEAD_NAMES


SIZE = 64
BACKBONE = "mobilenet_v3_large"
TEST_DOMAINS = ["xray", "neon"]
ALGORITHMS = ["fomaml", "transfer"]
SEED = 0


def params(**sections: dict[str, object]) -> dict[str, dict[str, object]]:
    base: dict[str, dict[str, object]] = {
        "base": {"seed": SEED, "image_size": SIZE, "device": "cpu"},
        # the tiny random-init backbone, not the params default (Lite0 with ImageNet weights): fast stage tests
        "model": {"backbone": BACKBONE, "backbone_weights": None, "bn_stats": "support"},
        "splits": {"meta_train": ["meadow"], "meta_val": ["desert"], "meta_test": TEST_DOMAINS, "shots": [1, 2],
                   "episodes": 2, "queries": 1, "support_pool": 0.5, "deploy_shots": 1},
        "train": {"algorithms": ALGORITHMS},
        "adapt": {"steps": 2},
        "evaluate": {"overlay_images": 2, "inits": ["scratch"]},  # no imagenet baseline: random-init backbone
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return full_params(**base)  # a stage needs every key spelled out


def make_workspace(root: Path, **sections: dict[str, object]) -> Path:
    """root/{params.yaml, data/prepared, data/splits, models/train/<alg>.pt}; returns root."""
    p = params(**sections)
    (root / "params.yaml").write_text(yaml.safe_dump(p), encoding="utf-8")
    names = ["meadow", "desert", *TEST_DOMAINS]
    write_prepared(root / "data/prepared", [generate_domain(n, 12, SIZE, SEED) for n in names], source="synthetic",
                   image_size=SIZE)
    dataset = PreparedDataset(root / "data/prepared")
    write_splits(root / "data/splits", make_splits(dataset, SplitsConfig(**p["splits"]), seed=SEED))
    (root / "models/train").mkdir(parents=True)
    for i, alg in enumerate(ALGORITHMS):
        init = finetune.fresh_init("scratch", BACKBONE, SIZE, inner_lr=0.05, seed=100 + i, backbone_weights=None,
                                     loss=LOSS)
        init = dataclasses.replace(init, algorithm=alg, adapt_names=list(HEAD_NAMES))  # ANIL-like: stable at 0.05
        # as the train stage writes it: the weights plus the meta-val score they were chosen on
        torch.save({**finetune.init_to_dict(init), "val_miou": 12.5}, root / f"models/train/{alg}.pt")
    return root
