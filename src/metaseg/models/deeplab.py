"""The trainable network: torchvision DeepLabv3 with a 2-row head [bg, fg], made safe for meta-learning.

Two changes to the stock model, both invisible in its state_dict (so an adapted model reloads into
``metaseg.models.adapted.plain_deeplab``):

* MobileNetV3's ``nn.Hardsigmoid`` (no double backward in PyTorch) is swapped for ``HardSigmoidExact``,
  ``relu6(x + 3) / 6``: the same function, differentiable twice (needed by second-order MAML / Meta-SGD).
* The BatchNorm of DeepLab's ASPP image-pooling branch normalises a 1x1 map (one value per channel for a
  batch of one), so it is an ``EvalBatchNorm2d``: it stays in eval mode whatever ``model.train()`` says
  (frozen statistics, learned affine). That is what makes 1-shot work in every path.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaseg.io import load_torch
from metaseg.models.adapted import plain_deeplab
from metaseg.models.backbones import (IMAGENET, LITE, efficientnet_lite, lite_imagenet_state_dict, map_in_order,
                                      torchvision_weights_file)

log = logging.getLogger(__name__)

BODY_PREFIX = "backbone."  # every parameter and buffer of the (pre-trained) body; the rest is the decoder
HEAD_NAMES = ("classifier.4.weight", "classifier.4.bias", "aux_classifier.4.weight", "aux_classifier.4.bias")


class HardSigmoidExact(nn.Module):
    """``relu6(x + 3) / 6``: identical to ``nn.Hardsigmoid`` but with a double backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class EvalBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that is always in eval mode (running statistics frozen, affine still learned)."""

    def train(self, mode: bool = True) -> EvalBatchNorm2d:
        return super().train(False)


def _swap_hardsigmoid(module: nn.Module) -> int:
    n = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Hardsigmoid):
            setattr(module, name, HardSigmoidExact())
            n += 1
        else:
            n += _swap_hardsigmoid(child)
    return n


def _freeze_pooling_bn(model: nn.Module) -> None:
    from torchvision.models.segmentation.deeplabv3 import ASPPPooling

    for mod in model.modules():
        if isinstance(mod, ASPPPooling):
            for i, child in enumerate(mod):
                if isinstance(child, nn.BatchNorm2d) and not isinstance(child, EvalBatchNorm2d):
                    frozen = EvalBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
                    frozen.load_state_dict(child.state_dict())
                    mod[i] = frozen
    model.train(model.training)


def _backbone_state(sd: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(sd).__name__}")
    # accept a full classification model's state_dict ("features.N..." -> "N...") as well as the backbone's own
    if any(k.startswith("features.") for k in sd):
        sd = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
    return sd


def load_backbone_state(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into ``model.backbone`` (every backbone tensor required, shapes equal); one-line ValueError."""
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(sd))
    bad = sorted(k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or bad:
        what = (f"missing key '{missing[0]}'" if missing else
                f"shape mismatch at '{bad[0]}' {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}")
        raise ValueError(f"{source}: not a backbone state_dict for this model ({what}; {len(missing)} missing, "
                         f"{len(bad)} mismatched)")
    model.backbone.load_state_dict({k: sd[k] for k in own})
    log.info("loaded backbone weights from %s", source)


def load_backbone_weights(model: nn.Module, path: str | Path, backbone: str | None = None) -> None:
    """Load a local backbone state_dict file into ``model.backbone``; one-line ValueError on mismatch.

    For an EfficientNet-Lite ``backbone`` a file in the efficientnet_pytorch layout (``_conv_stem...``) is mapped in
    order onto torchvision's names, as the packaged ImageNet weights are."""
    path = Path(path)
    raw = load_torch(path, what="PyTorch checkpoint of backbone weights", hint="model.backbone_weights")
    if backbone in LITE and isinstance(raw, dict) and any(k.startswith("_conv_stem") for k in raw):
        raw = map_in_order(raw, efficientnet_lite(backbone).state_dict(), what=f"{path.name} -> {backbone}")
    load_backbone_state(model, _backbone_state(raw, path), str(path))


def resolve_backbone_weights(model: nn.Module, backbone: str, weights: str | Path) -> None:
    """``imagenet``: the Lite package's file (sha256 and mapping checked) or torchvision's file in the torch hub
    cache (never downloaded: a missing file is a one-line error saying where to put it); else a local path."""
    if str(weights) != IMAGENET:
        load_backbone_weights(model, weights, backbone)
        return
    if backbone in LITE:
        sd = lite_imagenet_state_dict(backbone)
        load_backbone_state(model, _backbone_state(sd, Path(LITE[backbone].filename)),
                            f"{LITE[backbone].filename} (ImageNet, sha256 checked)")
        return
    path = torchvision_weights_file(backbone)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights for {backbone}: put torchvision's file {path.name} at {path} "
                                f"(nothing is downloaded at run time), or set model.backbone_weights to a local path "
                                f"or null")
    load_backbone_weights(model, path, backbone)


def build_model(backbone: str, *, aux_loss: bool = True, backbone_weights: str | Path | None = None,
                output_stride: int = 16, body_stage: int | None = None) -> nn.Module:
    """DeepLabv3 with a 2-class head (bg, fg), meta-learning safe; never downloads anything.

    ``backbone_weights``: None = random init, ``imagenet`` (see ``resolve_backbone_weights``) or a file path."""
    model = plain_deeplab(backbone, 2, aux_loss=aux_loss, output_stride=output_stride, body_stage=body_stage)
    _swap_hardsigmoid(model)
    _freeze_pooling_bn(model)
    if backbone_weights is not None:
        resolve_backbone_weights(model, backbone, backbone_weights)
    return model


def head_names(model: nn.Module) -> set[str]:
    """Names of the final 1x1 convs' parameters (main and aux head): what ANIL adapts."""
    names = {n for n, _ in model.named_parameters()}
    return {n for n in HEAD_NAMES if n in names}


INNER_PARAMS = ("all", "decoder", "head")  # train.inner_params: what the inner loop (and adaptation) updates


def inner_param_names(model: nn.Module, which: str) -> set[str] | None:
    """The parameter names an inner loop updates: None = all; ``decoder`` = DeepLab's heads (ASPP and FCN, the
    backbone fixed); ``head`` = the final 1x1 convs."""
    names = [n for n, _ in model.named_parameters()]
    if which == "all":
        return None
    if which == "decoder":
        return {n for n in names if n.startswith(("classifier.", "aux_classifier."))}
    if which == "head":
        return {n for n in HEAD_NAMES if n in names}
    raise ValueError(f"unknown inner_params '{which}' (expected one of {', '.join(INNER_PARAMS)})")
