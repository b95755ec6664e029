"""VOC importer on a tiny fixture in the VOC 2012 layout: palette indices, grouping, bad input in both modes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metaseg.cli import InputError
from metaseg.data.voc import VOC_CLASSES, import_voc

# id -> class indices painted into its mask (15 = person, 1 = aeroplane, 8 = cat)
FIXTURE = {"2007_000001": (1, 15), "2007_000002": (15,), "2007_000003": (8,)}
PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)]


def write_mask(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(PALETTE)
    im.save(path)


def write_voc(root: Path, image_set: str = "train") -> Path:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, classes in FIXTURE.items():
        mask = np.zeros((24, 32), np.uint8)
        for k, c in enumerate(classes):
            mask[4:20, 2 + 14 * k: 14 + 14 * k] = c
        mask[3, :] = 255  # boundary band
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / f"JPEGImages/{image_id}.jpg")
        write_mask(root / f"SegmentationClass/{image_id}.png", mask)
    (root / f"ImageSets/Segmentation/{image_set}.txt").write_text("\n".join(reversed(FIXTURE)) + "\n")
    return root


def run(root: Path, on_error: str = "fail", grouping: str = "per_class", domains: tuple[str, ...] = ("aeroplane",
        "person", "cat"), max_images: int | None = None) -> tuple[dict, list]:
    out, skipped = import_voc(root, image_size=32, resize="stretch", on_error=on_error, domains=list(domains),
                              max_images=max_images, grouping=grouping, image_set="train", progress=False)
    return {d.name: d for d in out}, skipped


def test_per_class_domains_are_binary(tmp_path: Path) -> None:
    got, skipped = run(write_voc(tmp_path))
    assert skipped == [] and list(got) == ["aeroplane", "cat", "person"]
    assert [it.stem for it in got["person"].items] == ["2007_000001", "2007_000002"]
    assert [it.stem for it in got["aeroplane"].items] == ["2007_000001"]
    for name, d in got.items():
        assert d.class_names == [name] and set(np.unique(d.masks)) == {0, 1, 255}
    plane = got["aeroplane"].masks[0]
    assert (plane[5:20, 2:14] == 1).all() and (plane[5:20, 17:28] == 0).all()  # the person is background here
    assert got["cat"].items[0].source == "JPEGImages/2007_000003.jpg"


def test_single_domain_keeps_palette_indices(tmp_path: Path) -> None:
    got, _ = run(write_voc(tmp_path), grouping="single", domains=())
    d = got["voc"]
    assert d.class_names == list(VOC_CLASSES) and len(d.images) == 3
    assert set(np.unique(d.masks)) == {0, 1, 8, 15, 255}


def test_max_images_caps_each_class(tmp_path: Path) -> None:
    got, _ = run(write_voc(tmp_path), max_images=1)
    assert [len(d.images) for d in got.values()] == [1, 1, 1]


def test_class_without_images_is_a_domain_error(tmp_path: Path) -> None:
    root = write_voc(tmp_path)
    with pytest.raises(InputError, match="bicycle/: domain has no usable image"):
        run(root, domains=())
    got, skipped = run(root, on_error="skip", domains=())
    assert sorted(got) == ["aeroplane", "cat", "person"] and len(skipped) == 17


def _bad_index(root: Path) -> None:
    mask = np.asarray(Image.open(root / "SegmentationClass/2007_000002.png")).copy()
    mask[0, 0] = 30
    write_mask(root / "SegmentationClass/2007_000002.png", mask)


def _truncated(root: Path) -> None:
    data = (root / "JPEGImages/2007_000002.jpg").read_bytes()
    (root / "JPEGImages/2007_000002.jpg").write_bytes(data[: len(data) // 3])


def _no_mask(root: Path) -> None:
    (root / "SegmentationClass/2007_000002.png").unlink()


def _size_mismatch(root: Path) -> None:
    write_mask(root / "SegmentationClass/2007_000002.png", np.full((8, 8), 15))


def _background_only(root: Path) -> None:
    write_mask(root / "SegmentationClass/2007_000002.png", np.zeros((24, 32)))


CASES = {
    "bad_index": (_bad_index, "SegmentationClass/2007_000002.png", "[30] neither a VOC class index"),
    "truncated": (_truncated, "JPEGImages/2007_000002.jpg", "unreadable or truncated image"),
    "missing_mask": (_no_mask, "JPEGImages/2007_000002.jpg", "missing mask"),
    "size_mismatch": (_size_mismatch, "JPEGImages/2007_000002.jpg", "but its mask is 8x8"),
    "no_class_pixel": (_background_only, "JPEGImages/2007_000002.jpg", "no pixel of any class"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_both_modes(tmp_path: Path, case: str) -> None:
    corrupt, file, reason = CASES[case]
    root = write_voc(tmp_path)
    corrupt(root)
    with pytest.raises(InputError) as err:
        run(root)
    assert str(root / file) in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)
    got, skipped = run(root, on_error="skip")
    assert skipped == [{"file": file, "reason": skipped[0]["reason"]}] and reason in skipped[0]["reason"]
    assert [it.stem for it in got["person"].items] == ["2007_000001"]


def test_missing_image_set_names_the_file(tmp_path: Path) -> None:
    root = write_voc(tmp_path, image_set="val")
    with pytest.raises(InputError, match=r"train\.txt: missing image list"):
        run(root)
