"""The deployable artefact: an adapted model that reloads with torchvision alone (no training code, no checkpoint state).

``models/adapted/<domain>/<algorithm>.pt`` is one dict::

    state_dict   plain torchvision DeepLabv3 state_dict (aux head dropped), num_classes = C + 1
    arch         {"backbone": str, "num_classes": int}
    class_names  ["background", <class 1>, ..., <class C>]  (index order = logit channel order)
    mean, std    per-channel input normalisation (RGB, applied to images scaled to [0, 1])
    image_size   training/prepared resolution (int)
    domain, algorithm, shots, steps  provenance
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaseg.io import save_with

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, the torchvision convention
STD = (0.229, 0.224, 0.225)

_BUILDERS = {
    "mobilenet_v3_large": "deeplabv3_mobilenet_v3_large",
    "resnet50": "deeplabv3_resnet50",
    "resnet101": "deeplabv3_resnet101",
}


def plain_deeplab(backbone: str, num_classes: int, *, aux_loss: bool = False) -> nn.Module:
    """A stock torchvision DeepLabv3, randomly initialised, nothing downloaded."""
    from torchvision.models import segmentation

    if backbone not in _BUILDERS:
        raise ValueError(f"unknown backbone '{backbone}' (expected one of {', '.join(_BUILDERS)})")
    builder = getattr(segmentation, _BUILDERS[backbone])
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)


def save_adapted(path: str | Path, state_dict: dict[str, torch.Tensor], *, backbone: str, class_names: list[str],
                 image_size: int, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD,
                 **provenance: Any) -> None:
    """Atomically write an adapted model; drops any aux-head tensors."""
    sd = {k: v.detach().cpu().clone() for k, v in state_dict.items() if not k.startswith("aux_classifier.")}
    obj = {"state_dict": sd, "arch": {"backbone": backbone, "num_classes": len(class_names)},
           "class_names": list(class_names), "mean": list(mean), "std": list(std), "image_size": int(image_size),
           **provenance}
    save_with(path, lambda p: torch.save(obj, p))


def load_adapted(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the adapted model (eval mode) from its file; returns (model, metadata without the weights)."""
    obj = torch.load(path, map_location=map_location, weights_only=True)
    model = plain_deeplab(obj["arch"]["backbone"], obj["arch"]["num_classes"], aux_loss=False)
    model.load_state_dict(obj["state_dict"])
    model.eval()
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model, meta
