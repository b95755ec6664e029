"""Heads: the 2-row [bg, fg] head expanded to n classes, and the prototype (protonet) head baked into a 1x1 conv.

* ``expand_head``: ``[bg, fg] -> [bg, fg, ..., fg]`` (n copies of fg) with ``torch.cat`` of views, so gradients
  reach the 2-row meta-parameters; the copies diverge after the first inner step.
* ``HeadOnly`` / ``DecoderOnly``: the final 1x1 convs over cached decoder features (ANIL), the whole decoder over
  cached body features (l2o), so an inner loop that leaves the body alone computes its features once per task.
* Prototypes: masked average pooling of support features per class (0 = background), cosine logits x scale.
  ``bake_prototypes`` writes them into the classifier's 1x1 conv: weight = scale * p_hat / mean support feature
  norm, bias 0. At the feature resolution this multiplies every logit of a pixel by the same positive factor
  (|f| / mean norm), so the argmax equals the cosine classifier's exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaseg.meta.inner import IGNORE, Params, model_mode
from metaseg.models.deeplab import HEAD_NAMES


def expand_rows(t: Tensor, num_classes: int) -> Tensor:
    """[2, ...] -> [1 + num_classes, ...] as [row0, row1 x num_classes], differentiably."""
    if t.shape[0] != 2:
        raise ValueError(f"expected a 2-row head tensor [bg, fg], got shape {tuple(t.shape)}")
    return torch.cat([t[:1], t[1:2].expand(num_classes, *t.shape[1:])], 0)


def expand_head(params: dict[str, Tensor], num_classes: int, names: tuple[str, ...] = HEAD_NAMES) -> dict[str, Tensor]:
    """A new dict with every head tensor in ``names`` expanded to ``num_classes`` foreground rows."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return {k: expand_rows(v, num_classes) if k in names else v for k, v in params.items()}


def _sub(d: Params, prefix: str, drop: str | None = None) -> Params:
    p = prefix + "."
    out = {k[len(p):]: v for k, v in d.items() if k.startswith(p)}
    return {k: v for k, v in out.items() if drop is None or not k.startswith(drop)}


def body_features(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> dict[str, Tensor]:
    """Eval-mode features of the body, what DeepLab's decoder reads: {"out": [B,D,h,w], "aux": ... (if any)}."""
    with model_mode(model, bn_train=False):
        return dict(functional_call(model.backbone, (_sub(params, "backbone"), _sub(buffers, "backbone")), (x,)))


def body_channels(model: nn.Module) -> int:
    """D, the channels of the body's "out" features: the input channels of the decoder's first conv."""
    return next(p for n, p in model.named_parameters() if n.startswith("classifier.") and p.dim() == 4).shape[1]


def deeplab_features(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> dict[str, Tensor]:
    """Eval-mode features entering the final 1x1 convs: {"out": [B,256,h,w], "aux": [B,10,h',w'] (if any)}."""
    f = body_features(model, params, buffers, x)
    with model_mode(model, bn_train=False):
        feats = {"out": functional_call(nn.Sequential(*list(model.classifier)[:4]), (_sub(params, "classifier", "4."),
                                                                _sub(buffers, "classifier")), (f["out"],))}
        if getattr(model, "aux_classifier", None) is not None:
            aux_body = nn.Sequential(*list(model.aux_classifier)[:4])
            feats["aux"] = functional_call(aux_body, (_sub(params, "aux_classifier", "4."),
                                                      _sub(buffers, "aux_classifier")), (f["aux"],))
    return feats


def masked_average(feat: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Prototypes [1 + num_classes, D]: per class c (0 = bg) the mean feature over its pixels (255 ignored),
    the label map pooled to the feature grid as soft masks (area average)."""
    valid = (y != IGNORE)
    onehot = F.one_hot(torch.where(valid, y, 0).long(), num_classes + 1).permute(0, 3, 1, 2).to(feat.dtype)
    onehot = onehot * valid.unsqueeze(1).to(feat.dtype)
    w = F.adaptive_avg_pool2d(onehot, feat.shape[-2:])  # [S, C+1, h, w]
    num = torch.einsum("schw,sdhw->cd", w, feat)
    return num / w.sum((0, 2, 3)).clamp_min(1e-6).unsqueeze(1)


def cosine_logits(feat: Tensor, protos: Tensor, scale: Tensor | float) -> Tensor:
    """[B, C+1, h, w] = scale * cos(f, p_c) at the feature resolution."""
    return scale * torch.einsum("bdhw,cd->bchw", F.normalize(feat, dim=1), F.normalize(protos, dim=1))


def mean_feature_norm(feat: Tensor) -> Tensor:
    return feat.norm(dim=1).mean().clamp_min(1e-6)


def bake_prototypes(protos: Tensor, scale: Tensor | float, feature_norm: Tensor | float) -> tuple[Tensor, Tensor]:
    """1x1 conv (weight [C+1, D, 1, 1], bias [C+1]) equal to the cosine head up to a per-pixel positive factor."""
    w = scale * F.normalize(protos, dim=1) / feature_norm
    return w[:, :, None, None], torch.zeros(protos.shape[0], dtype=protos.dtype, device=protos.device)


def proto_head(feats: dict[str, Tensor], support_feats: dict[str, Tensor], support_y: Tensor, num_classes: int,
               scale: Tensor | float, size: tuple[int, int]) -> dict[str, Tensor]:
    """Cosine-prototype logits for the query features, upsampled like DeepLab's head (bilinear)."""
    out = {}
    for key, f in feats.items():
        protos = masked_average(support_feats[key], support_y, num_classes)
        out[key] = F.interpolate(cosine_logits(f, protos, scale), size=size, mode="bilinear", align_corners=False)
    return out


def baked_head_params(support_feats: dict[str, Tensor], support_y: Tensor, num_classes: int,
                      scale: Tensor | float) -> dict[str, Tensor]:
    """{"classifier.4.weight": ..., "classifier.4.bias": ..., "aux_classifier.4.*"} from the support set."""
    out = {}
    for key, prefix in (("out", "classifier.4"), ("aux", "aux_classifier.4")):
        if key not in support_feats:
            continue
        f = support_feats[key]
        w, b = bake_prototypes(masked_average(f, support_y, num_classes), scale, mean_feature_norm(f))
        out[f"{prefix}.weight"], out[f"{prefix}.bias"] = w, b
    return out


def _decode(main: nn.Module, aux: nn.Module | None, feats: dict[str, Tensor],
            size: tuple[int, int]) -> dict[str, Tensor]:
    """DeepLabV3.forward after the body: each head on its features, upsampled bilinearly to the input size."""
    up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    out = {"out": up(main(feats["out"]))}
    if aux is not None and "aux" in feats:
        out["aux"] = up(aux(feats["aux"]))
    return out


class HeadOnly(nn.Module):
    """The final 1x1 convs of a DeepLab as a module over cached features (ANIL's inner loop runs on this)."""

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.classifier = nn.ModuleDict({"4": model.classifier[4]})
        aux = getattr(model, "aux_classifier", None)
        self.aux_classifier = nn.ModuleDict({"4": aux[4]}) if aux is not None else None
        self.size = size

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        aux = self.aux_classifier["4"] if self.aux_classifier is not None else None
        return _decode(self.classifier["4"], aux, feats, self.size)


class DecoderOnly(nn.Module):
    """DeepLab's decoder (``classifier`` and ``aux_classifier``, upsampled as DeepLabV3.forward does) as a module
    over body features: l2o's inner loop runs on it, the body's features computed once per task. Its parameter and
    buffer names are the full model's (``classifier.*``), so BatchNorm follows ``support_stat_layer`` as there."""

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.classifier, self.aux_classifier = model.classifier, getattr(model, "aux_classifier", None)
        self.size = size

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        return _decode(self.classifier, self.aux_classifier, feats, self.size)
