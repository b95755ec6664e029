"""Standalone edge inference for a metaseg ONNX model: onnxruntime + numpy + Pillow only (no torch, no metaseg).

    python export/infer.py MODEL INPUT --out DIR [--overlay] [--providers cpu|cuda]

MODEL is a ``model.{fp32,fp16,int8}.onnx`` written by the export stage; everything the preprocessing needs (class
names, mean/std, training resolution) is read from the model's ``metadata_props``. INPUT is an image file or a folder
of images (not recursive). Images are read by ``image_reader.py`` (copy it beside this script), the module the
prepare stage reads training images with: 16-bit and 12-bit-in-16 files, grey, palette and RGBA (alpha dropped) reach
the model exactly as they reached training. For each image ``<name>`` (file name with its extension, so
``photo.jpg`` and ``photo.png`` never share an output) the script writes ``DIR/<name>.png``: a palette PNG whose
pixel values are class indices (0 = background) with a fixed colour per class, the same size as the input image; with
``--overlay`` also ``DIR/<name>.overlay.png`` (image blended with the class colours). Files are written atomically.

Resizing: the image reaches the model the way the prepare stage fed the training images (the ``resize``
metadata, ``prepare.resize``), so objects appear at the scale the model was adapted at: ``pad`` scales the long side
to the training resolution and letterboxes the square with black (exactly ``metaseg.data.importing.fit``),
``stretch`` resizes to the square, ``crop`` scales the short side to the resolution (both sides multiples of 8) and
keeps the whole image (every pixel needs a label). A JPEG is decoded at a reduced scale no smaller than that (as
prepare does), so a 6000x4000 photo never sits in memory at full size. The per-class logits of the image's own
region are resized back to the original size (bilinear, in strips of rows) before the argmax, which gives smoother
boundaries than resizing the label map.

Errors print ``error: ...`` lines on stderr and exit with code 2: one line for a missing model, an empty folder or a
bad ``--out``; for a folder, one line per image that could not be read (unreadable, over Pillow's decompression-bomb
limit, ...) or written, after every good image has been processed, then a count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

try:  # on the device: image_reader.py copied beside this script
    from image_reader import IMAGE_SUFFIXES, RESIZE_MODES, ImageError, describe, fitted_size, read_rgb
except ModuleNotFoundError as missing:  # in the repository (tests, the export stage): the export package
    if missing.name != "image_reader":
        raise
    try:
        from export.image_reader import IMAGE_SUFFIXES, RESIZE_MODES, ImageError, describe, fitted_size, read_rgb
    except ModuleNotFoundError as also_missing:
        if also_missing.name not in ("export", "export.image_reader"):
            raise
        print("error: image_reader.py not found: copy export/image_reader.py beside infer.py", file=sys.stderr)
        raise SystemExit(2) from None

REQUIRED_METADATA = ("class_names", "mean", "std", "image_size", "resize", "palette")
STRIP_ROWS = 256  # output rows per step when the logits are resized back to the image (bounds the memory)


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


def input_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """(w, h) a width x height image is resized to for the model: ``pad`` and ``stretch`` as prepare resized the
    training images (``image_reader.fitted_size``), ``crop`` the short side at ``size`` on multiples of 8."""
    if mode not in RESIZE_MODES:
        raise InferError(f"model metadata: unknown resize mode '{mode}' (expected one of {', '.join(RESIZE_MODES)})")
    if mode == "crop":
        h, w = model_size(height, width, size)
        return w, h
    return fitted_size(width, height, size, mode)


def model_input(rgb: np.ndarray, resized: tuple[int, int], size: int,
                mode: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The uint8 RGB array the model sees and the (top, left, height, width) box of the image inside it: ``rgb``
    resized to ``resized`` (``input_size`` of the stored size; ``rgb`` itself may be smaller, a reduced JPEG decode)
    and, for ``pad``, letterboxed on a black size x size square, pixel for pixel like ``metaseg.data.importing.fit``."""
    nw, nh = resized
    pixels = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BILINEAR))
    if mode != "pad":
        return pixels, (0, 0, nh, nw)
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = pixels
    return canvas, (top, left, nh, nw)


def upsample_argmax(logits: np.ndarray, width: int, height: int, rows: int = STRIP_ROWS) -> np.ndarray:
    """argmax over classes of ``logits`` [C, h, w] resized (bilinear) to height x width: uint8 [height, width].
    Computed ``rows`` output rows at a time (Pillow's ``box``: the same coefficients as one full resize), so memory
    is C x rows x width floats, not C full-size planes."""
    _, h, w = logits.shape
    if (h, w) == (height, width):
        return logits.argmax(axis=0).astype(np.uint8)
    planes = [Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)) for c in logits]
    mask = np.empty((height, width), np.uint8)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        box = (0.0, top * h / height, float(w), bottom * h / height)
        strip = np.stack([np.asarray(p.resize((width, bottom - top), Image.Resampling.BILINEAR, box=box))
                          for p in planes])
        mask[top:bottom] = strip.argmax(axis=0)
    return mask


def predict(session: ort.InferenceSession, meta: dict[str, object], rgb: np.ndarray,
            stored: tuple[int, int]) -> np.ndarray:
    """Class index map uint8 [H, W] at the image's stored (width, height); ``rgb`` as ``read_rgb`` returned it."""
    width, height = stored
    size, mode = int(meta["image_size"]), str(meta["resize"])  # type: ignore[call-overload]
    pixels, (top, left, h, w) = model_input(rgb, input_size(width, height, size, mode), size, mode)
    x = preprocess(pixels, meta["mean"], meta["std"])  # type: ignore[arg-type]
    logits = session.run(None, {session.get_inputs()[0].name: x})[0][0][:, top:top + h, left:left + w]  # [C, h, w]
    return upsample_argmax(logits, width, height)


def _save(image: Image.Image, path: Path) -> None:
    """PNG written to a temp name, then renamed: a killed run never leaves a half file that looks whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_mask(path: Path, mask: np.ndarray, colours: np.ndarray) -> None:
    im = Image.fromarray(mask, mode="P")
    im.putpalette(colours.reshape(-1).tolist())
    _save(im, path)


def save_overlay(path: Path, rgb: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> None:
    """The image blended with its class colours where the mask is not background, ``STRIP_ROWS`` rows at a time."""
    out = np.empty_like(rgb)
    for top in range(0, len(mask), STRIP_ROWS):
        part, labels = rgb[top:top + STRIP_ROWS].astype(np.float32), mask[top:top + STRIP_ROWS]
        blended = np.where((labels > 0)[..., None], (1 - alpha) * part + alpha * colours[labels], part)
        out[top:top + STRIP_ROWS] = blended.round().astype(np.uint8)
    _save(Image.fromarray(out), path)


def make_out_folder(out: Path, input_path: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InferError(f"--out {out}: exists and is not a folder (masks are written into a folder)")
    if input_path.is_dir() and out.resolve() == input_path.resolve():
        raise InferError(f"--out {out}: is the input folder (its masks would be read as images next time; "
                         "choose another folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InferError(f"--out {out}: cannot create it ({describe(err)})") from None


def segment(session: ort.InferenceSession, meta: dict[str, object], path: Path, out: Path, overlay: bool) -> Path:
    """Read, predict and write one image; raises ImageError (unreadable) or OSError (not writable)."""
    size, mode = int(meta["image_size"]), str(meta["resize"])  # type: ignore[call-overload]
    rgb, stored = read_rgb(path, lambda width, height: input_size(width, height, size, mode))
    mask = predict(session, meta, rgb, stored)
    del rgb
    colours = meta["palette"]  # the class colours of the evaluate report (metaseg.overlay.palette)
    save_mask(out / f"{path.name}.png", mask, colours)  # type: ignore[arg-type]
    if overlay:  # blended with the full-size image: decoded again, without the reduction
        save_overlay(out / f"{path.name}.overlay.png", read_rgb(path)[0], mask, colours)  # type: ignore[arg-type]
    return out / f"{path.name}.png"


def run(model: Path, input_path: Path, out: Path, *, overlay: bool = False,
        providers: str = "cpu") -> tuple[list[Path], list[tuple[Path, str]]]:
    """Segment every image; returns the masks written and the (image, reason) of each one that failed."""
    session = open_session(model, providers)
    meta = read_metadata(session, model)
    images = list_images(input_path)
    make_out_folder(out, input_path)
    written, failed = [], []
    for path in images:
        try:
            written.append(segment(session, meta, path, out, overlay))
        except ImageError as err:
            failed.append((path, str(err)))
        except OSError as err:
            failed.append((path, f"cannot write its mask to {out} ({describe(err)})"))
    if written:
        print(f"{len(written)} of {len(images)} image(s) -> {out} (provider {session.get_providers()[0]}, "
              f"classes: {', '.join(meta['class_names'])})")  # type: ignore[arg-type]
    return written, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment images with a metaseg ONNX model (writes palette PNG masks).")
    parser.add_argument("model", type=Path, help="model.{fp32,fp16,int8}.onnx from the export stage")
    parser.add_argument("input", type=Path, help="an image file or a folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output folder for <name>.png masks (photo.jpg.png)")
    parser.add_argument("--overlay", action="store_true", help="also write <name>.overlay.png (image + mask colours)")
    parser.add_argument("--providers", choices=("cpu", "cuda"), default="cpu", help="execution provider (default cpu)")
    args = parser.parse_args(argv)
    try:
        written, failed = run(args.model, args.input, args.out, overlay=args.overlay, providers=args.providers)
    except InferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, reason in failed:
        print(f"error: {path}: {reason}", file=sys.stderr)
    if failed and written:
        print(f"error: {len(failed)} of {len(failed) + len(written)} image(s) failed (listed above); the others were "
              f"written to {args.out}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
