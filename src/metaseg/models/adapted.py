"""The deployable artefact: an adapted model that reloads with torchvision alone (no training code, no checkpoint state).

``models/adapted/<domain>/<algorithm>.pt`` is one dict::

    state_dict   plain torchvision DeepLabv3 state_dict (aux head dropped), num_classes = C + 1
    arch         {"backbone": str, "num_classes": int, "output_stride": int, "body_stage": int | None}
    class_names  ["background", <class 1>, ..., <class C>]  (index order = logit channel order)
    mean, std    the backbone's per-channel input normalisation (RGB, applied to images scaled to [0, 1])
    image_size   training/prepared resolution (int)
    domain, algorithm, shots, steps  provenance
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaseg.cli import InputError
from metaseg.io import load_torch, save_with
from metaseg.models.backbones import BACKBONES, LITE, lite_deeplab_body

_BUILDERS = {
    "mobilenet_v3_large": "deeplabv3_mobilenet_v3_large",
    "resnet50": "deeplabv3_resnet50",
    "resnet101": "deeplabv3_resnet101",
}


def _lite_deeplab(backbone: str, num_classes: int, *, aux_loss: bool, output_stride: int,
                  body_stage: int | None) -> nn.Module:
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCNHead

    body, out_idx, out_ch, aux_idx = lite_deeplab_body(backbone, output_stride, body_stage)
    layers = {str(out_idx): "out", **({str(aux_idx): "aux"} if aux_loss else {})}
    aux = FCNHead(body[aux_idx][-1].out_channels, num_classes) if aux_loss else None
    return DeepLabV3(IntermediateLayerGetter(body, return_layers=layers), DeepLabHead(out_ch, num_classes), aux)


def plain_deeplab(backbone: str, num_classes: int, *, aux_loss: bool = False, output_stride: int = 16,
                  body_stage: int | None = None) -> nn.Module:
    """A torchvision DeepLabv3 (torchvision's classes only), randomly initialised, nothing downloaded.

    EfficientNet-Lite bodies take ``output_stride`` (8 or 16) and ``body_stage`` (where the body ends; None = the
    last MBConv stage); the stock builders have their own (MobileNetV3: 16, ResNet: 8) and take neither."""
    from torchvision.models import segmentation

    if backbone in LITE:
        return _lite_deeplab(backbone, num_classes, aux_loss=aux_loss, output_stride=output_stride,
                             body_stage=body_stage)
    if body_stage is not None:
        raise ValueError(f"body_stage is for the efficientnet_lite backbones; {backbone} takes null")
    if backbone not in _BUILDERS:
        raise ValueError(f"unknown backbone '{backbone}' (expected one of {', '.join(BACKBONES)})")
    builder = getattr(segmentation, _BUILDERS[backbone])
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)


def save_adapted(path: str | Path, state_dict: dict[str, torch.Tensor], *, backbone: str, class_names: list[str],
                 image_size: int, mean: tuple[float, ...], std: tuple[float, ...], output_stride: int = 16,
                 body_stage: int | None = None, **provenance: Any) -> None:
    """Atomically write an adapted model; drops any aux-head tensors. ``mean``/``std``: the backbone's input
    normalisation (it travels with the model into ONNX metadata and the edge script)."""
    sd = {k: v.detach().cpu().clone() for k, v in state_dict.items() if not k.startswith("aux_classifier.")}
    obj = {"state_dict": sd, "arch": {"backbone": backbone, "num_classes": len(class_names),
                                      "output_stride": int(output_stride), "body_stage": body_stage},
           "class_names": list(class_names), "mean": list(mean), "std": list(std), "image_size": int(image_size),
           **provenance}
    save_with(path, lambda p: torch.save(obj, p))


def load_adapted(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the adapted model (eval mode) from its file; returns (model, metadata without the weights)."""
    obj = load_torch(path, what="adapted model", hint="run the adapt stage first", map_location=map_location)
    if not isinstance(obj, dict) or not {"arch", "state_dict"} <= set(obj):
        raise InputError(f"{path}: not a metaseg adapted model (expected a dict with 'arch' and 'state_dict')")
    arch = obj["arch"]
    model = plain_deeplab(arch["backbone"], arch["num_classes"], aux_loss=False,
                          output_stride=int(arch.get("output_stride", 16)), body_stage=arch.get("body_stage"))
    model.load_state_dict(obj["state_dict"])
    model.eval()
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model, meta
