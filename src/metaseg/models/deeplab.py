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

import torch
import torch.nn.functional as F
from torch import nn

from metaseg.models.adapted import plain_deeplab

log = logging.getLogger(__name__)

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


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local torchvision backbone state_dict into ``model.backbone``; one-line ValueError on mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file not found")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    # accept a full classification model's state_dict ("features.N..." -> "N...") as well as the backbone's own
    if isinstance(sd, dict) and any(k.startswith("features.") for k in sd):
        sd = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
    own = model.backbone.state_dict()
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(sd).__name__}")
    missing = sorted(set(own) - set(sd))
    bad = sorted(k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or bad:
        what = (f"missing key '{missing[0]}'" if missing else
                f"shape mismatch at '{bad[0]}' {tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}")
        raise ValueError(f"{path}: not a backbone state_dict for this model ({what}; {len(missing)} missing, "
                         f"{len(bad)} mismatched)")
    model.backbone.load_state_dict({k: sd[k] for k in own})
    log.info("loaded backbone weights from %s", path)


def build_model(backbone: str, *, aux_loss: bool = True, backbone_weights: str | Path | None = None) -> nn.Module:
    """DeepLabv3 with a 2-class head (bg, fg), meta-learning safe; never downloads anything."""
    model = plain_deeplab(backbone, 2, aux_loss=aux_loss)
    _swap_hardsigmoid(model)
    _freeze_pooling_bn(model)
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights)
    return model


def head_names(model: nn.Module) -> set[str]:
    """Names of the final 1x1 convs' parameters (main and aux head): what ANIL adapts."""
    names = {n for n, _ in model.named_parameters()}
    return {n for n in HEAD_NAMES if n in names}
