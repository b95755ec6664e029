"""FSS-1000 importer on a tiny fixture in its layout: one-class domains, thresholded masks, bad input in both modes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metaseg.cli import InputError
from metaseg.data.fss1000 import import_fss1000


def write_fss(root: Path, classes: tuple[str, ...] = ("abacus", "zebra"), n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            mask = np.zeros((20, 20), np.uint8)
            mask[5:15, 5:15] = 200  # foreground (> 127)
            mask[0, :] = 100  # grey but <= 127: background
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
            Image.fromarray(mask).convert("RGB").save(root / name / f"{i}.png")  # FSS masks are often RGB
    return root


def run(root: Path, on_error: str = "fail", domains: tuple[str, ...] = (), max_images: int | None = None
        ) -> tuple[dict, list]:
    out, skipped = import_fss1000(root, image_size=32, resize="crop", on_error=on_error, domains=list(domains),
                                  max_images=max_images, progress=False)
    return {d.name: d for d in out}, skipped


def test_each_class_folder_is_a_one_class_domain(tmp_path: Path) -> None:
    got, skipped = run(write_fss(tmp_path))
    assert skipped == [] and list(got) == ["abacus", "zebra"]
    d = got["zebra"]
    assert d.class_names == ["zebra"] and d.images.shape == (3, 32, 32, 3)
    assert set(np.unique(d.masks)) == {0, 1} and d.masks[0, 16, 16] == 1 and d.masks[0, 0, 16] == 0
    assert [it.source for it in d.items] == ["zebra/1.jpg", "zebra/2.jpg", "zebra/3.jpg"]


def test_domains_filter_and_cap(tmp_path: Path) -> None:
    got, _ = run(write_fss(tmp_path), domains=("zebra",), max_images=2)
    assert list(got) == ["zebra"] and [it.stem for it in got["zebra"].items] == ["1", "2"]
    with pytest.raises(InputError, match="prepare.domains: 'okapi'"):
        run(tmp_path, domains=("okapi",))


def _truncated(root: Path) -> None:
    data = (root / "zebra/2.jpg").read_bytes()
    (root / "zebra/2.jpg").write_bytes(data[: len(data) // 3])


def _no_mask(root: Path) -> None:
    (root / "zebra/2.png").unlink()


def _size_mismatch(root: Path) -> None:
    Image.fromarray(np.full((7, 9), 255, np.uint8)).save(root / "zebra/2.png")


def _empty_mask(root: Path) -> None:
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(root / "zebra/2.png")


CASES = {
    "truncated": (_truncated, "zebra/2.jpg", "unreadable or truncated image"),
    "missing_mask": (_no_mask, "zebra/2.jpg", "missing mask zebra/2.png"),
    "size_mismatch": (_size_mismatch, "zebra/2.jpg", "but its mask is 9x7"),
    "no_class_pixel": (_empty_mask, "zebra/2.jpg", "no pixel of any class"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_both_modes(tmp_path: Path, case: str) -> None:
    corrupt, file, reason = CASES[case]
    root = write_fss(tmp_path)
    corrupt(root)
    with pytest.raises(InputError) as err:
        run(root)
    assert str(root / file) in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)
    got, skipped = run(root, on_error="skip")
    assert skipped == [{"file": file, "reason": skipped[0]["reason"]}] and reason in skipped[0]["reason"]
    assert [it.stem for it in got["zebra"].items] == ["1", "3"] and len(got["abacus"].images) == 3


def test_class_folder_without_usable_image(tmp_path: Path) -> None:
    root = write_fss(tmp_path)
    (root / "empty").mkdir()
    with pytest.raises(InputError, match="empty/: domain has no usable image"):
        run(root)
    got, skipped = run(root, on_error="skip")
    assert sorted(got) == ["abacus", "zebra"] and skipped[0]["file"] == "empty/"
