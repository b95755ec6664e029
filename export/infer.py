"""Standalone edge inference for a metaseg ONNX model: onnxruntime + numpy + Pillow only (no torch, no metaseg).

    python export/infer.py MODEL INPUT --out DIR [--overlay] [--providers cpu|cuda]

MODEL is a ``model.{fp32,fp16,int8}.onnx`` written by the export stage; everything the preprocessing needs (class
names, mean/std, training resolution) is read from the model's ``metadata_props``. INPUT is an image file or a folder
of images (not recursive). For each image ``<stem>`` the script writes ``DIR/<stem>.png``: a palette PNG whose pixel
values are class indices (0 = background) with a fixed colour per class, the same size as the input image; with
``--overlay`` also ``DIR/<stem>.overlay.png`` (image blended with the class colours).

Resizing: the image reaches the model the way the prepare stage fed the training images (the ``resize``
metadata, ``prepare.resize``), so objects appear at the scale the model was adapted at: ``pad`` scales the long side
to the training resolution and letterboxes the square with black (exactly ``metaseg.data.importing.fit``),
``stretch`` resizes to the square, ``crop`` scales the short side to the resolution (both sides multiples of 8) and
keeps the whole image (every pixel needs a label). The per-class logits of the image's own region are resized back
to the original size (bilinear) before the argmax, which gives smoother boundaries than resizing the label map.
Errors (missing model, no images, unreadable image) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
REQUIRED_METADATA = ("class_names", "mean", "std", "image_size", "resize", "palette")
RESIZE_MODES = ("pad", "stretch", "crop")


class InferError(Exception):
    """A one-line, user-facing problem (exit code 2)."""


def preprocess(rgb: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 NCHW [1, 3, H, W]: scale to [0, 1], then (x - mean) / std per channel."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def model_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) with the short side at ``resolution`` and both sides rounded to multiples of 8, aspect kept."""
    scale = resolution / min(height, width)
    return (max(8, int(round(height * scale / 8)) * 8), max(8, int(round(width * scale / 8)) * 8))


def read_metadata(session: ort.InferenceSession, model: Path) -> dict[str, object]:
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in REQUIRED_METADATA if k not in props]
    if missing:
        raise InferError(f"{model}: metadata_props lack {', '.join(missing)} "
                         "(not a metaseg export; re-run the export stage)")
    meta = {"class_names": json.loads(props["class_names"]), "mean": json.loads(props["mean"]),
            "std": json.loads(props["std"]), "image_size": int(props["image_size"]), "resize": props["resize"],
            "palette": np.asarray(json.loads(props["palette"]), dtype=np.uint8).reshape(-1, 3)}
    if len(meta["palette"]) < len(meta["class_names"]):
        raise InferError(f"{model}: metadata palette has {len(meta['palette'])} colours for "
                         f"{len(meta['class_names'])} classes (re-run the export stage)")
    return meta


def open_session(model: Path, providers: str) -> ort.InferenceSession:
    if not model.is_file():
        raise InferError(f"{model}: model file not found")
    names = ["CUDAExecutionProvider", "CPUExecutionProvider"] if providers == "cuda" else ["CPUExecutionProvider"]
    if providers == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InferError("--providers cuda: this onnxruntime build has no CUDAExecutionProvider (use --providers cpu)")
    try:
        return ort.InferenceSession(str(model), providers=names)
    except Exception as err:  # onnxruntime raises several types for a bad file
        raise InferError(f"{model}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InferError(f"{path}: no such image file or folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InferError(f"{path}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InferError(f"{path}: unreadable image ({err.__class__.__name__})") from None


def model_input(image: Image.Image, size: int, mode: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The uint8 RGB array the model sees and the (top, left, height, width) box of the image inside it, resized as
    the prepare stage resized the training images (``prepare.resize``; ``pad`` pixel for pixel like
    ``metaseg.data.importing.fit``)."""
    width, height = image.size
    if mode == "stretch":
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)), (0, 0, size, size)
    if mode == "crop":
        h, w = model_size(height, width, size)
        return np.asarray(image.resize((w, h), Image.Resampling.BILINEAR)), (0, 0, h, w)
    if mode != "pad":
        raise InferError(f"model metadata: unknown resize mode '{mode}' (expected one of {', '.join(RESIZE_MODES)})")
    scale = size / max(height, width)
    nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = np.asarray(image.resize((nw, nh), Image.Resampling.BILINEAR))
    return canvas, (top, left, nh, nw)


def predict(session: ort.InferenceSession, meta: dict[str, object], image: Image.Image) -> np.ndarray:
    """Class index map uint8 [H, W] at the image's own size."""
    width, height = image.size
    size = int(meta["image_size"])  # type: ignore[call-overload]
    pixels, (top, left, h, w) = model_input(image, size, str(meta["resize"]))
    x = preprocess(pixels, meta["mean"], meta["std"])  # type: ignore[arg-type]
    logits = session.run(None, {session.get_inputs()[0].name: x})[0][0][:, top:top + h, left:left + w]  # [C, h, w]
    if (h, w) != (height, width):
        logits = np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize(
            (width, height), Image.Resampling.BILINEAR)) for c in logits])
    return logits.argmax(axis=0).astype(np.uint8)


def save_mask(path: Path, mask: np.ndarray, colours: np.ndarray) -> None:
    im = Image.fromarray(mask, mode="P")
    im.putpalette(colours.reshape(-1).tolist())
    im.save(path)


def save_overlay(path: Path, image: Image.Image, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> None:
    rgb = np.asarray(image).astype(np.float32)
    blended = np.where((mask > 0)[..., None], (1 - alpha) * rgb + alpha * colours[mask], rgb)
    Image.fromarray(blended.round().astype(np.uint8)).save(path)


def run(model: Path, input_path: Path, out: Path, *, overlay: bool = False, providers: str = "cpu") -> list[Path]:
    session = open_session(model, providers)
    meta = read_metadata(session, model)
    images = list_images(input_path)
    colours = meta["palette"]  # the class colours of the evaluate report (metaseg.overlay.palette)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        image = load_rgb(path)
        mask = predict(session, meta, image)
        save_mask(out / f"{path.stem}.png", mask, colours)
        written.append(out / f"{path.stem}.png")
        if overlay:
            save_overlay(out / f"{path.stem}.overlay.png", image, mask, colours)
    print(f"{len(images)} image(s) -> {out} (provider {session.get_providers()[0]}, "
          f"classes: {', '.join(meta['class_names'])})")  # type: ignore[arg-type]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment images with a metaseg ONNX model (writes palette PNG masks).")
    parser.add_argument("model", type=Path, help="model.{fp32,fp16,int8}.onnx from the export stage")
    parser.add_argument("input", type=Path, help="an image file or a folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output folder for <stem>.png masks")
    parser.add_argument("--overlay", action="store_true", help="also write <stem>.overlay.png (image + mask colours)")
    parser.add_argument("--providers", choices=("cpu", "cuda"), default="cpu", help="execution provider (default cpu)")
    args = parser.parse_args(argv)
    try:
        run(args.model, args.input, args.out, overlay=args.overlay, providers=args.providers)
    except InferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
