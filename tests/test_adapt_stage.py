"""The `adapt` stage: deterministic deployment, the shipped file is what was adapted, reload without training code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval_helpers import SEED, make_workspace
from timing_helpers import read_apart
from metaseg.adapt import AdaptSettings, adapt_deployment, baseline_init
from metaseg.config import ConfigError, ModelConfig, TrainConfig
from metaseg.data.prepared import PreparedDataset
from metaseg.data.splits import load_deploy, load_splits
from metaseg.io import read_json
from metaseg.meta import finetune
from metaseg.models.adapted import load_adapted
from metaseg.models.backbones import lite_imagenet_state_dict, normalization

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
DOMAIN = "xray"
TINY_MODEL = ModelConfig(backbone="mobilenet_v3_large", backbone_weights=None, bn_stats="support")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("adapt"))
    cmd = [sys.executable, str(ROOT / "pipeline/adapt.py"), "--params", "params.yaml", "--init",
           "models/train/fomaml.pt", "--domain", DOMAIN, "--prepared", "data/prepared", "--splits", "data/splits",
           "--out", f"models/adapted/{DOMAIN}/fomaml.pt", "--results", f"results/adapt/{DOMAIN}/fomaml"]
    proc = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def _inputs(root: Path) -> tuple[PreparedDataset, object, list[int]]:
    ds = PreparedDataset(root / "data/prepared")
    deploy = load_deploy(root / "data/splits/deploy.json")[DOMAIN]
    return ds, deploy, load_splits(root / "data/splits/splits.json")["pools"][DOMAIN]["test"]


def test_stage_ships_a_model_that_learned_and_scores_the_test_pool(ws: Path) -> None:
    m = read_json(ws / f"results/adapt/{DOMAIN}/fomaml/metrics.json")
    assert m["support_loss_after"] < m["support_loss_before"]  # adaptation fitted the deployment support set
    _, deploy, test = _inputs(ws)
    assert m["test_images"] == len(test) and m["support_images"] == len(deploy.support)
    assert 0 <= m["test_miou"] <= 100 and 0 <= m["test_fbiou"] <= 100
    assert m["reload_max_abs_logit_diff"] < 1e-4  # the file computes what the inner loop computed
    _, meta = load_adapted(ws / f"models/adapted/{DOMAIN}/fomaml.pt")
    assert meta["class_names"] == ["background", "disc", "box", "triangle", "cross"]
    assert (meta["domain"], meta["algorithm"], meta["steps"], meta["image_size"]) == (DOMAIN, "fomaml", 2, 64)
    mean, std = normalization("mobilenet_v3_large")  # the init's backbone normalisation travels with the model
    assert (meta["mean"], meta["std"], meta["arch"]["output_stride"]) == (list(mean), list(std), 16)


def test_adapt_time_goes_to_timings_not_metrics(ws: Path) -> None:
    _, timings = read_apart(ws / f"results/adapt/{DOMAIN}/fomaml")
    assert set(timings) == {"adapt_seconds"} and timings["adapt_seconds"] > 0


def test_same_seed_gives_identical_adapted_weights(ws: Path, tmp_path: Path) -> None:
    ds, deploy, test = _inputs(ws)
    init = finetune.load_init(ws / "models/train/fomaml.pt")
    adapt_deployment(ds.domain(DOMAIN), deploy, test, init, tmp_path / "again.pt", settings=AdaptSettings(steps=2),
                     seed=SEED, device=torch.device("cpu"))
    a = torch.load(ws / f"models/adapted/{DOMAIN}/fomaml.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "again.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BLOCKED = '''
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("metaseg.train", "metaseg.meta", "metaseg.adapt", "metaseg.evaluate")):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
import torch
from metaseg.models.adapted import load_adapted
model, meta = load_adapted(sys.argv[1])
with torch.no_grad():
    out = model(torch.load(sys.argv[2]))["out"]
torch.save(out, sys.argv[3])
'''


def test_adapted_model_reloads_without_training_code(ws: Path, tmp_path: Path) -> None:
    path = ws / f"models/adapted/{DOMAIN}/fomaml.pt"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, _ = load_adapted(path)
    with torch.no_grad():
        expected = model(x)["out"]
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert got.shape == (2, 5, 64, 64) and torch.allclose(got, expected)


def test_divergence_is_a_one_line_error_and_writes_nothing(ws: Path, tmp_path: Path) -> None:
    ds, deploy, test = _inputs(ws)
    # unclipped steps at an absurd lr: BN renormalises most layers (its statistics follow the params), but the
    # unnormalised 1x1 head's logits overflow, so the support loss is no longer finite
    init = baseline_init("scratch", model=TINY_MODEL, train=TrainConfig(inner_clip=None), image_size=64,
                         scratch_lr=1e-4, seed=SEED)
    with pytest.raises(ConfigError, match="diverged"):
        adapt_deployment(ds.domain(DOMAIN), deploy, test, init, tmp_path / "bad.pt",
                         settings=AdaptSettings(steps=3, lr=1e30), seed=SEED, device=torch.device("cpu"))
    assert not (tmp_path / "bad.pt").exists()


def test_support_augment_is_seeded_and_keeps_labels() -> None:
    from metaseg.adapt import support_augment

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g).clamp(-2, 2)
    y = torch.zeros(2, 64, 64, dtype=torch.int64)
    y[:, 10:40, 10:40] = 1
    y[:, :3] = 255
    norm = normalization("mobilenet_v3_large")
    xa, ya = support_augment(64, torch.Generator().manual_seed(5), norm)(x, y)
    xb, yb = support_augment(64, torch.Generator().manual_seed(5), norm)(x, y)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == x.shape and xa.dtype == torch.float32 and ya.dtype == torch.int64
    assert set(ya.unique().tolist()) <= {0, 1, 255}  # nearest-neighbour masks: no blended labels


def test_baseline_inits() -> None:
    """scratch = random weights at scratch_lr; imagenet = the pre-trained Lite0 body with a fresh decoder at the
    train inner lr, its BN statistics kept; both adapt the train.inner_params parameters with the train loss."""
    train = TrainConfig(inner_params="decoder", inner_lr=0.02, dice_weight=0.5)
    scratch = baseline_init("scratch", model=TINY_MODEL, train=train, image_size=64, scratch_lr=1e-4, seed=SEED)
    assert (scratch.algorithm, scratch.inner_lr, scratch.bn_stats) == ("scratch", 1e-4, "support")
    assert scratch.adapt_names and all(n.startswith(("classifier.", "aux_classifier.")) for n in scratch.adapt_names)
    assert scratch.extras["dice_weight"] == 0.5 and scratch.norm == tuple(map(list, normalization(TINY_MODEL.backbone)))
    lite = ModelConfig(backbone="efficientnet_lite0", backbone_weights="imagenet", bn_stats="pretrained")
    init = baseline_init("imagenet", model=lite, train=TrainConfig(), image_size=64, scratch_lr=1e-4, seed=SEED)
    assert (init.algorithm, init.inner_lr, init.bn_stats, init.adapt_names) == ("imagenet", 0.01, "pretrained", None)
    assert init.norm == tuple(map(list, normalization("efficientnet_lite0")))
    stem = lite_imagenet_state_dict("efficientnet_lite0")["features.0.0.weight"]
    assert torch.equal(init.params["backbone.0.0.weight"], stem)
    with pytest.raises(ConfigError, match="backbone_weights"):
        baseline_init("imagenet", model=TINY_MODEL, train=train, image_size=64, scratch_lr=1e-4, seed=SEED)
    with pytest.raises(ConfigError, match="unknown init 'imagnet'"):
        baseline_init("imagnet", model=lite, train=train, image_size=64, scratch_lr=1e-4, seed=SEED)


@pytest.mark.parametrize(("stride", "stage"), [(16, None), (8, 5)])
def test_lite0_imagenet_init_deploys_with_its_normalisation(ws: Path, tmp_path: Path, stride: int,
                                                            stage: int | None) -> None:
    """The imagenet baseline on EfficientNet-Lite0 (pretrained BN statistics in the body) adapts and ships a file
    that computes what the inner loop computed, carrying Lite's mean/std and the output stride."""
    ds, deploy, test = _inputs(ws)
    lite = ModelConfig(backbone="efficientnet_lite0", backbone_weights="imagenet", bn_stats="pretrained",
                       output_stride=stride, body_stage=stage)
    init = baseline_init("imagenet", model=lite, train=TrainConfig(), image_size=64, scratch_lr=1e-4, seed=SEED)
    m, _ = adapt_deployment(ds.domain(DOMAIN), deploy, test[:4], init, tmp_path / "lite.pt",
                            settings=AdaptSettings(steps=1), seed=SEED, device=torch.device("cpu"))
    assert m["reload_max_abs_logit_diff"] < 1e-4 and m["support_loss_after"] < m["support_loss_before"]
    model, meta = load_adapted(tmp_path / "lite.pt")
    mean, std = normalization("efficientnet_lite0")
    assert (meta["mean"], meta["std"]) == (list(mean), list(std))
    assert meta["arch"] == {"backbone": "efficientnet_lite0", "num_classes": 5, "output_stride": stride,
                            "body_stage": stage}
    # the body kept its ImageNet statistics (bn_stats: pretrained), so the shipped file holds them
    stats = lite_imagenet_state_dict("efficientnet_lite0")["features.0.1.running_var"]
    assert torch.equal(model.state_dict()["backbone.0.1.running_var"], stats)
