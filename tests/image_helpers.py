"""One picture saved in every format the shared image reader (export/image_reader.py) must read alike, and files it
must refuse: written with Pillow, or byte by byte where Pillow cannot write them (16-bit colour PNG, a PNG header
that claims 182 megapixels)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bits: int, colour_type: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of ``samples`` (grey [H, W] or RGB(A) [H, W, 3 | 4]); the rows use each of the five PNG filters in
    turn, so a decoder's unfiltering at two bytes per sample is exercised, not just the unfiltered case."""
    height, width = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    raw = samples.astype(">u2").reshape(height, -1).view(np.uint8).astype(np.int32)  # big-endian bytes per row
    bpp = 2 * channels
    rows, prior = [], np.zeros(raw.shape[1], np.int32)
    for y, row in enumerate(raw):
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
        guess = left + prior - upleft
        paeth = np.where((abs(guess - left) <= abs(guess - prior)) & (abs(guess - left) <= abs(guess - upleft)), left,
                         np.where(abs(guess - prior) <= abs(guess - upleft), prior, upleft))
        kind = y % 5  # none, sub, up, average, paeth
        predicted = [np.zeros_like(row), left, prior, (left + prior) // 2, paeth][kind]
        rows.append(bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes())
        prior = row
    return _png(width, height, 16, {1: 0, 3: 2, 4: 6}[channels], b"".join(rows))


def bomb_png(width: int = 14000, height: int = 13000) -> bytes:
    """A few bytes whose header claims width x height (182 megapixels by default): over Pillow's decompression-bomb
    limit, refused before any pixel is decoded."""
    return _png(width, height, 8, 0, b"\x00" * 16)


def picture(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` reduced to at most 256 colours (so a palette PNG holds it exactly) and darkened to a peak of about 200
    (so a 16-bit version is not full range: stretching by the image's own maximum would show)."""
    levels = (rgb.astype(np.int32) * 200 // 255) // 40 * 40 + 10  # 6 levels per channel: 216 colours at most
    return levels.astype(np.uint8)


def save_versions(folder: Path, rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Save one picture (uint8 RGB from ``picture``) and its grey version in every format, each file under its own
    stem; returns file name -> the 8-bit RGB array each file must read as."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = rgb[..., 0]  # a single-channel picture of the same scene
    colours, index = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    Image.fromarray(rgb).save(folder / "rgb8.png")
    Image.fromarray(rgb).save(folder / "rgb8_tiff.tif")
    Image.fromarray(np.dstack([rgb, np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None].repeat(len(rgb), 0)])
                    ).save(folder / "rgba.png")  # alpha from transparent to opaque: dropped, not composited
    palette = Image.fromarray(index.reshape(rgb.shape[:2]).astype(np.uint8), mode="P")
    palette.putpalette(colours.reshape(-1).tolist())
    palette.save(folder / "palette.png")
    (folder / "rgb16.png").write_bytes(png16(rgb.astype(np.uint16) * 257))
    (folder / "rgb12in16.png").write_bytes(png16(np.round(rgb * (4095 / 255)).astype(np.uint16)))
    Image.fromarray(grey).save(folder / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16_tiff.tif")
    (folder / "grey12in16.png").write_bytes(png16(np.round(grey * (4095 / 255)).astype(np.uint16)))
    grey_rgb = np.repeat(grey[..., None], 3, axis=2)
    return {p.name: (grey_rgb if p.name.startswith("grey") else rgb) for p in sorted(folder.iterdir())}
