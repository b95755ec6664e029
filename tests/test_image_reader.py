"""export/image_reader.py: one picture reads as the same uint8 RGB in every format and bit depth; JPEGs decode
reduced but never below what the caller needs; refusals are one-line ImageErrors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.image_reader import ImageError, bits_used, fitted_size, read_rgb, to_uint8
from tests.image_helpers import bomb_png, picture, save_versions


def _scene(height: int = 24, width: int = 40) -> np.ndarray:
    rgb = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rgb[:, : width // 3, 0] = 255  # a bright band: the grey version reaches the top of its range too
    return picture(rgb)


def test_every_version_of_a_picture_reads_the_same(tmp_path: Path) -> None:
    for name, want in save_versions(tmp_path, _scene()).items():
        got, stored = read_rgb(tmp_path / name)
        assert stored == (40, 24) and got.dtype == np.uint8, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_high_bit_depth_is_scaled_by_the_depth_used_not_the_image_maximum() -> None:
    assert [bits_used(p) for p in (0, 255, 256, 1023, 1024, 4095, 4096, 65535, 70000)] == \
        [8, 8, 10, 10, 12, 12, 14, 16, 17]
    dark12 = np.array([0, 1000, 2100], np.uint16)  # 12 bits used, far below the 16-bit top
    np.testing.assert_array_equal(to_uint8(dark12), [0, 62, 131])  # 1000 / 4095 * 255, not stretched to 255
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0], np.float32)), [0, 128, 255])


def test_jpeg_is_decoded_reduced_but_never_below_twice_the_requested_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    asked = []
    full, stored = read_rgb(tmp_path / "big.jpg")
    small, stored_too = read_rgb(tmp_path / "big.jpg", shrink=lambda w, h: asked.append((w, h)) or (90, 70))
    assert stored == stored_too == (800, 600) and asked == [(800, 600)] and full.shape == (600, 800, 3)
    assert small.shape == (150, 200, 3)  # 1/4: 1/8 (100 x 75) would fall below twice the 90 x 70 asked for


def test_fitted_size_per_resize_mode() -> None:
    assert fitted_size(90, 50, 64, "pad") == (64, 36)
    assert fitted_size(90, 50, 64, "crop") == (115, 64)
    assert fitted_size(90, 50, 64, "stretch") == (64, 64)
    with pytest.raises(ValueError, match="unknown resize mode 'zoom'"):
        fitted_size(90, 50, 64, "zoom")


@pytest.mark.parametrize("case", ["garbage", "bomb"])
def test_refusals_are_one_line_image_errors(case: str, tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(bomb_png() if case == "bomb" else b"not a png")
    with pytest.raises(ImageError) as err:
        read_rgb(path)
    assert "\n" not in str(err.value)
    assert ("too large" if case == "bomb" else "unreadable") in str(err.value)
