"""Folder importer: label mapping, resize modes, every bad-input case in fail and skip mode, and the real samples."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from metaseg.cli import InputError
from metaseg.data.folder import import_folder
from metaseg.data.prepared import sha256_bytes
from tests.image_helpers import picture, save_versions

LABELS = {"classes": {3: "cat", 0: "sky"}, "ignore": [9]}  # value 0 is a class; ids follow file order: 3->1, 0->2


def write_domain(root: Path, name: str = "dom", n: int = 3, labels: dict = LABELS, w: int = 24, h: int = 16) -> Path:
    """n image/mask pairs: mask = 0 (top rows), 3 (a block), 9 (a line), 7 (undeclared, some pixels)."""
    d = root / name
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    (d / "labels.yaml").write_text(yaml.safe_dump(labels, sort_keys=False))
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.full((h, w), 7, np.uint8)
        mask[: h // 4] = 0
        mask[h // 2:, w // 3: 2 * w // 3] = 3
        mask[-1] = 9
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "images" / f"{i:02d}.png")
        Image.fromarray(mask).save(d / "masks" / f"{i:02d}.png")
    return d


def run(root: Path, on_error: str = "fail", size: int = 32, resize: str = "stretch", domains: list[str] | None = None,
        max_images: int | None = None, min_side: int = 8) -> tuple[dict, list]:
    out, skipped = import_folder(root, image_size=size, resize=resize, on_error=on_error, domains=domains or [],
                                 max_images=max_images, min_side=min_side, progress=False)
    return {d.name: d for d in out}, skipped


def test_label_mapping_follows_labels_yaml(tmp_path: Path) -> None:
    write_domain(tmp_path, w=32, h=32)
    got, skipped = run(tmp_path)
    d = got["dom"]
    assert skipped == [] and d.class_names == ["cat", "sky"]
    raw = np.asarray(Image.open(tmp_path / "dom/masks/00.png"))
    expected = np.select([raw == 3, raw == 0, raw == 9], [1, 2, 255], 0)  # 7 is undeclared -> background
    assert np.array_equal(d.masks[0], expected)
    assert d.items[0].source == "dom/images/00.png"
    assert d.items[0].sha256 == sha256_bytes((tmp_path / "dom/images/00.png").read_bytes())


@pytest.mark.parametrize("mode", ["stretch", "pad", "crop"])
def test_resize_modes(tmp_path: Path, mode: str) -> None:
    write_domain(tmp_path, w=48, h=24)
    d = run(tmp_path, size=32, resize=mode)[0]["dom"]
    assert d.images.shape == (3, 32, 32, 3) and d.masks.shape == (3, 32, 32)
    assert set(np.unique(d.masks)) <= {0, 1, 2, 255}  # nearest: no interpolated ids
    if mode == "pad":  # letterbox: 32x16 content, 8 rows of padding above and below
        assert (d.masks[:, :8] == 255).all() and (d.images[:, :8] == 0).all()
        assert (d.masks[:, 8] == 2).all()
    else:
        assert (d.masks[:, 0] == 2).all()


def test_rgba_jpeg_mixed_and_caps(tmp_path: Path) -> None:
    d = write_domain(tmp_path, n=4)
    rgba = np.zeros((16, 24, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(d / "images/01.png")
    Image.open(d / "images/02.png").save(d / "images/02.jpg", quality=95)
    (d / "images/02.png").unlink()
    got = run(tmp_path, max_images=3)[0]["dom"]
    assert [it.stem for it in got.items] == ["00", "01", "02"]
    assert got.images[1, ..., 0].min() == 200 and got.images[1, ..., 1].max() == 0


def test_every_version_of_a_picture_prepares_the_same_pixels(tmp_path: Path) -> None:
    """16-bit, 12-bit-in-16, RGBA, palette, TIFF and grey files of one picture store what its 8-bit file stores."""
    rgb = np.random.default_rng(5).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    rgb[:, :12, 0] = 255  # the grey version reaches the top of its range too
    d = write_domain(tmp_path, n=0)
    versions = save_versions(d / "images", picture(rgb))
    mask = np.zeros((20, 36), np.uint8)
    mask[5:15, 10:30] = 3
    for name in versions:
        Image.fromarray(mask).save(d / "masks" / f"{Path(name).stem}.png")
    got = run(tmp_path, size=32, resize="pad")[0]["dom"]
    stored = {Path(it.source).name: image for it, image in zip(got.items, got.images)}
    assert sorted(stored) == sorted(versions)
    for name, image in stored.items():
        assert np.array_equal(image, stored["grey8.png" if name.startswith("grey") else "rgb8.png"]), name


def test_domains_filter_and_unknown_domain(tmp_path: Path) -> None:
    write_domain(tmp_path, "a")
    write_domain(tmp_path, "b")
    assert list(run(tmp_path, domains=["b"])[0]) == ["b"]
    with pytest.raises(InputError, match="prepare.domains: 'zz'"):
        run(tmp_path, domains=["zz"])


def _garbage(d: Path) -> None:
    (d / "images/01.png").write_bytes(b"this is not a png")


def _truncated(d: Path) -> None:
    Image.open(d / "images/01.png").save(d / "images/01.jpg", quality=95)
    (d / "images/01.png").unlink()
    data = (d / "images/01.jpg").read_bytes()
    (d / "images/01.jpg").write_bytes(data[: len(data) // 2])


def _no_mask(d: Path) -> None:
    (d / "masks/01.png").unlink()


def _size_mismatch(d: Path) -> None:
    Image.fromarray(np.full((10, 10), 3, np.uint8)).save(d / "masks/01.png")


def _undeclared(d: Path) -> None:  # with 'background' declared, the value list is exhaustive
    (d / "labels.yaml").write_text(yaml.safe_dump({**LABELS, "background": [7]}, sort_keys=False))
    mask = np.asarray(Image.open(d / "masks/01.png")).copy()
    mask[0, 0] = 42
    Image.fromarray(mask).save(d / "masks/01.png")


def _no_class(d: Path) -> None:
    Image.fromarray(np.full((16, 24), 7, np.uint8)).save(d / "masks/01.png")


def _tiny(d: Path) -> None:  # a 1x1 image would become a solid 32x32 block labelled 100% one class
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(d / "images/01.png")
    Image.fromarray(np.full((1, 1), 3, np.uint8)).save(d / "masks/01.png")


# case -> (corrupt, file named in the report, words of the reason)
CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "unreadable": (_garbage, "dom/images/01.png", "unreadable"),
    "truncated": (_truncated, "dom/images/01.jpg", "truncated"),
    "missing_mask": (_no_mask, "dom/images/01.png", "missing mask"),
    "size_mismatch": (_size_mismatch, "dom/images/01.png", "but its mask is 10x10"),
    "undeclared_value": (_undeclared, "dom/masks/01.png", "[42] neither a class, ignored nor background"),
    "no_class_pixel": (_no_class, "dom/images/01.png", "no pixel of any class"),
    "too_small": (_tiny, "dom/images/01.png", "image is 1x1 px, below prepare.min_image_side (8 px"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_fail_mode_names_file_and_reason(tmp_path: Path, case: str) -> None:
    corrupt, file, reason = CASES[case]
    corrupt(write_domain(tmp_path))
    with pytest.raises(InputError) as err:
        run(tmp_path, on_error="fail")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / file) in msg and reason in msg


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_skip_mode_lists_it_and_keeps_the_rest(tmp_path: Path, case: str) -> None:
    corrupt, file, reason = CASES[case]
    corrupt(write_domain(tmp_path))
    got, skipped = run(tmp_path, on_error="skip")
    assert len(skipped) == 1 and skipped[0]["file"] == file and reason in skipped[0]["reason"]
    assert [it.stem for it in got["dom"].items] == ["00", "02"]


def test_missing_labels_yaml(tmp_path: Path) -> None:
    write_domain(tmp_path, "ok")
    (write_domain(tmp_path, "nolabels") / "labels.yaml").unlink()
    with pytest.raises(InputError, match="nolabels/labels.yaml: missing labels.yaml"):
        run(tmp_path)
    got, skipped = run(tmp_path, on_error="skip")
    assert list(got) == ["ok"] and skipped == [{"file": "nolabels/labels.yaml", "reason": skipped[0]["reason"]}]


def test_domain_without_usable_image(tmp_path: Path) -> None:
    write_domain(tmp_path, "ok")
    for p in (write_domain(tmp_path, "empty", n=2) / "masks").iterdir():
        p.unlink()
    with pytest.raises(InputError, match="missing mask"):
        run(tmp_path)
    got, skipped = run(tmp_path, on_error="skip")
    assert list(got) == ["ok"]
    assert [s["file"] for s in skipped] == ["empty/images/00.png", "empty/images/01.png", "empty/"]
    assert "no usable image" in skipped[-1]["reason"]


def test_bad_labels_yaml_is_reported(tmp_path: Path) -> None:
    write_domain(tmp_path, labels={"classes": {3: "cat"}, "ignore": [3]})
    with pytest.raises(InputError, match="value 3 is both a class and listed in 'ignore'"):
        run(tmp_path)


def test_malformed_labels_yaml_names_line_and_column(tmp_path: Path) -> None:
    (write_domain(tmp_path) / "labels.yaml").write_text("classes:\n  3: cat\n   0: sky\n")
    with pytest.raises(InputError) as err:
        run(tmp_path)
    message = str(err.value)
    assert "dom/labels.yaml: not valid YAML: line 3, column 5: mapping values are not allowed here" in message
    assert "\n" not in message


def test_mask_values_above_255_are_mask_values_not_ids(tmp_path: Path) -> None:
    """labels.yaml keys are values of the mask *file* (0..65535: a 16-bit PNG may use any); the prepared mask
    stores ids 1..C and 255 = ignore whatever the values were. A value above 255 absent from 8-bit masks imports
    (it was an IndexError, also under on_error: skip); a 16-bit mask maps it like any other value."""
    write_domain(tmp_path, "eight", labels={"classes": {3: "cat", 300: "dog"}, "ignore": [9, 1000]})
    d16 = write_domain(tmp_path, "sixteen", n=2, labels={"classes": {300: "dog", 3: "cat"}, "ignore": [1000]})
    raw = np.zeros((16, 24), np.uint16)
    raw[4:12, 2:10], raw[4:12, 12:20], raw[0] = 300, 3, 1000
    for i in range(2):
        Image.fromarray(raw).save(d16 / "masks" / f"{i:02d}.png")  # mode I;16
    for on_error in ("fail", "skip"):
        got, skipped = run(tmp_path, on_error=on_error, size=32)
        assert skipped == [] and got["eight"].class_names == ["cat", "dog"]
        assert set(np.unique(got["eight"].masks)) == {0, 1, 255}
        m = got["sixteen"].masks[0]  # stretch 24x16 -> 32x32: dog is id 1, cat id 2, 1000 ignored
        assert m[12, 8] == 1 and m[12, 21] == 2 and (m[0] == 255).all() and m[31, 31] == 0


def test_more_classes_than_uint8_ids_is_one_line_naming_the_key(tmp_path: Path) -> None:
    write_domain(tmp_path, "ok")
    write_domain(tmp_path, "many", labels={"classes": {v: f"c{v}" for v in range(255)}})
    with pytest.raises(InputError, match=r"many/labels.yaml: 'classes' has 255 entries; at most 254 per domain"):
        run(tmp_path)
    got, skipped = run(tmp_path, on_error="skip")
    assert list(got) == ["ok"] and [s["file"] for s in skipped] == ["many/labels.yaml"]


def test_missing_root_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="prepare.root"):
        run(tmp_path / "nope")


REAL = Path(__file__).parents[1].parent / "shared" / "data" / "real"


@pytest.mark.realdata
def test_imports_the_four_real_domains_as_they_are() -> None:
    if not REAL.is_dir():
        pytest.skip(f"real samples not found at {REAL}")
    got, skipped = run(REAL, on_error="fail", size=64, resize="pad", max_images=5)
    assert sorted(got) == ["aerial_dubai_hitl", "camvid_driving", "nuclei_dsb2018", "pets_oxford_iiit"]
    assert skipped == []
    assert got["aerial_dubai_hitl"].class_names[0] == "building"  # value 0 is a class there
    for d in got.values():
        assert d.images.shape == (5, 64, 64, 3) and d.masks.shape == (5, 64, 64)
        labelled = (d.masks > 0) & (d.masks != 255)
        assert labelled.reshape(5, -1).any(1).all() and d.masks.max() <= 255
        assert set(np.unique(d.masks)) <= set(range(len(d.class_names) + 1)) | {255}


def test_skip_mode_with_no_domain_left_is_an_error(tmp_path: Path) -> None:
    from metaseg.config import BaseConfig, PrepareConfig
    from metaseg.data.prepare import run_prepare

    (write_domain(tmp_path / "raw") / "labels.yaml").unlink()
    cfg = PrepareConfig(source="folder", root="raw", on_error="skip")
    with pytest.raises(InputError, match="no usable domain.*1 input.*dom/labels.yaml: missing labels.yaml"):
        run_prepare(BaseConfig(image_size=32), cfg, progress=False, cwd=tmp_path)  # root relative to cwd
