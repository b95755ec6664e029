"""Tiny shared inputs for the meta-learning tests (64 px, mobilenet_v3_large, seeded)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


BACKBONE = "mobilenet_v3_large"
LITE = "efficientnet_lite0"
SIZE = 64
# finetune.fresh_init's loss settings: the TrainConfig defaults (what the old scratch_init defaulted to)
LOSS = {"aux_weight": 0.4, "dice_weight": 0.0, "class_balance": True, "inner_clip": 10.0}


def task(n_images: int, num_classes: int = 1, *, seed: int = 0, size: int = SIZE) -> tuple[Tensor, Tensor]:
    """Images with bright squares per class (learnable), labels 0..num_classes, a few 255 pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_images, 3, size, size, generator=g) * 0.3
    y = torch.zeros(n_images, size, size, dtype=torch.int64)
    for i in range(n_images):
        for c in range(1, num_classes + 1):
            s = min(16, size // 3)
            r, q = torch.randint(0, size - s, (2,), generator=g).tolist()
            y[i, r:r + s, q:q + s] = c
            x[i, c % 3, r:r + s, q:q + s] += 1.5 + 0.3 * c
    y[:, :2, :2] = 255
    return x, y


class TinyNet(nn.Module):
    """conv-BN-relu-conv with a 2-row 1x1 head named like DeepLab's (classifier.4)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.Tanh())
        self.classifier = nn.Sequential(nn.Conv2d(width, width, 1), nn.Identity(), nn.Identity(), nn.Tanh(),
                                        nn.Conv2d(width, 2, 1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.classifier(self.body(x))}


class TinyDeepLab(nn.Module):
    """DeepLab's layout in miniature: ``backbone`` (conv-BN-tanh, stride 2) -> {"out"}, ``classifier`` (3x3
    conv-BN-tanh, the 2-row 1x1 head at index 4), upsampled to the input; names as DeepLab's (backbone.*,
    classifier.*), so the body/decoder split, the head expansion and ``DecoderOnly`` apply."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.backbone = _TinyBody(width)
        self.classifier = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.Identity(),
                                        nn.Tanh(), nn.Conv2d(width, 2, 1))
        self.aux_classifier = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.classifier(self.backbone(x)["out"])
        return {"out": nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)}


class _TinyBody(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.Tanh())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.layers(x)}


def make_fixture(root, *, size: int = SIZE, n: int = 8, domains: tuple[str, ...] = ("a", "b", "c", "d")):
    """A tiny prepared dataset (random arrays, one square class per image) + splits (val 'c', test 'd')."""
    from pathlib import Path

    import numpy as np

    from metaseg.config import SplitsConfig
    from metaseg.data.prepared import DomainData, Item, write_prepared
    from metaseg.data.splits import make_splits, write_splits
    from metaseg.data.prepared import PreparedDataset

    root = Path(root)
    rng = np.random.default_rng(0)
    data = []
    for d in domains:
        images = rng.integers(0, 120, (n, size, size, 3), dtype=np.uint8)
        masks = np.zeros((n, size, size), np.uint8)
        for i in range(n):
            r, q = rng.integers(0, size // 2, 2)
            masks[i, r:r + size // 3, q:q + size // 3] = 1 + i % 2
            images[i][masks[i] > 0] += np.uint8(100)
        data.append(DomainData(d, ["x", "y"], images, masks, [Item(f"{d}{i}", f"fixture:{d}:{i}", "0") for i in range(n)]))
    write_prepared(root / "prepared", data, source="synthetic", image_size=size)
    cfg = SplitsConfig(meta_val=[domains[2]], meta_test=[domains[3]], shots=[1], queries=1, episodes=2, deploy_shots=1)
    write_splits(root / "splits", make_splits(PreparedDataset(root / "prepared"), cfg, seed=0))
    return root / "prepared", root / "splits"
