"""Shared tiny fixtures for the export / check / infer tests, built once per pytest process.

A learnable toy task (three vertical bands per image: dark noise = background, bright red = class 1, bright blue =
class 2, ignore pixels on the band edges), a mobilenet_v3_large DeepLabv3 trained on it for a few Adam steps (so the
logits are not degenerate and a quantisation error shows up in the mIoU), written as an adapted model, a prepared
dataset and splits.json, then exported once to fp32 / fp16 / int8. ``bundle(LITE)`` builds the same for an
EfficientNet-Lite0 DeepLabv3 (its own input normalisation, output stride 16)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metaseg.config import CheckConfig, ExportConfig
from metaseg.data.prepared import DomainData, write_prepared
from metaseg.io import write_json
from metaseg.models.adapted import plain_deeplab, save_adapted
from metaseg.models.backbones import normalization

SIZE = 64  # prepared / training resolution
RESIZE = "pad"  # prepare.resize the toy model is exported with: infer.py letterboxes like prepare
N_IMAGES = 32
TEST = list(range(12, N_IMAGES))  # calibration uses the first images, the check the rest
CLASS_NAMES = ["background", "red", "blue"]
DOMAIN, ALGORITHM = "toy", "transfer"
BACKBONE = "mobilenet_v3_large"
LITE = "efficientnet_lite0"


def toy_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, size, size, 3] and masks [n, size, size]: three vertical bands in random order and widths,
    dark noise = 0 (background), bright red = 1, bright blue = 2; the pixel columns at band edges are 255 (ignore)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        cuts = np.sort(rng.choice(np.arange(size // 5, 4 * size // 5), 2, replace=False))
        edges = [0, int(cuts[0]), int(cuts[1]), size]
        for band, cls in enumerate(rng.permutation(3)):
            a, b = edges[band], edges[band + 1]
            if cls:
                hi, lo = rng.integers(170, 256, (size, b - a)), rng.integers(0, 70, (size, b - a, 2))
                images[i, :, a:b] = np.dstack([hi, lo]) if cls == 1 else np.dstack([lo, hi])
            masks[i, :, a:b] = cls
        masks[i, :, edges[1]] = masks[i, :, edges[2]] = 255
    return images, masks


def _normalise(images: np.ndarray, backbone: str = BACKBONE) -> torch.Tensor:
    mean, std = normalization(backbone)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def train_toy_model(steps: int = 24, seed: int = 0, backbone: str = BACKBONE) -> dict[str, torch.Tensor]:
    """A few Adam steps on fresh toy images, then BN statistics re-estimated; returns the state_dict."""
    torch.manual_seed(seed)
    model = plain_deeplab(backbone, len(CLASS_NAMES))
    images, masks = toy_images(8 * steps, SIZE, seed + 1)
    x, y = _normalise(images, backbone), torch.from_numpy(masks).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        sl = slice(8 * step, 8 * step + 8)
        loss = F.cross_entropy(model(x[sl])["out"], y[sl], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in model.modules():  # exact BN statistics over 64 images (cumulative average)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for i in range(0, 64, 16):
            model(x[i:i + 16])
    return model.state_dict()


@dataclass(frozen=True)
class Bundle:
    root: Path
    adapted: Path
    prepared: Path
    splits: Path
    onnx_root: Path  # <root>/onnx, holding toy/transfer/model.*.onnx
    export_metrics: dict[str, float]
    export_timings: dict[str, float]

    @property
    def onnx_dir(self) -> Path:
        return self.onnx_root / DOMAIN / ALGORITHM


def adapted_root(bundle: Bundle) -> Path:
    return bundle.adapted.parent.parent


def export_config() -> ExportConfig:
    return ExportConfig(export_size=SIZE, calibration_images=TEST[0])


def check_config(**changes: object) -> CheckConfig:
    """The params defaults except a check size that differs from the export size and few latency runs."""
    return CheckConfig(**{"check_size": 80, "latency_runs": 3, "warmup_runs": 1, **changes})


@functools.lru_cache(maxsize=2)
def bundle(backbone: str = BACKBONE) -> Bundle:
    """Build everything once per process and backbone (about 30 s on two busy cores), cleaned up at exit."""
    from export.onnx_export import export_adapted, int8_reduce_range

    root = Path(tempfile.mkdtemp(prefix=f"metaseg-onnx-test-{backbone}-"))
    atexit.register(shutil.rmtree, root, True)
    adapted = root / "adapted" / DOMAIN / f"{ALGORITHM}.pt"
    mean, std = normalization(backbone)
    save_adapted(adapted, train_toy_model(backbone=backbone), backbone=backbone, class_names=CLASS_NAMES,
                 image_size=SIZE, mean=mean, std=std, domain=DOMAIN, algorithm=ALGORITHM, shots=5, steps=24)
    images, masks = toy_images(N_IMAGES, SIZE, seed=123)
    write_prepared(root / "prepared", [DomainData(DOMAIN, CLASS_NAMES[1:], images, masks)], source="synthetic",
                   image_size=SIZE)
    cfg = export_config()
    write_json(root / "splits.json", {"pools": {DOMAIN: {"support": list(range(12)), "test": TEST}}})
    metrics, timings = export_adapted(adapted, root / "onnx" / DOMAIN / ALGORITHM, root / "prepared",
                                      precisions=list(cfg.precisions), opset=cfg.opset, export_size=cfg.export_size,
                                      calibration_images=cfg.calibration_images, params={"export": cfg},
                                      resize=RESIZE, int8_reduce_range=int8_reduce_range(cfg.int8_reduce_range))
    return Bundle(root, adapted, root / "prepared", root / "splits.json", root / "onnx", metrics, timings)
