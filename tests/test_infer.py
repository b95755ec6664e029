"""export/infer.py: runs with torch blocked, writes palette masks at the input size, one-line errors with exit 2."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from metaseg.config import CheckConfig

from export import infer
from metaseg.overlay import palette
from tests.image_helpers import bomb_png, picture, save_versions
from tests.onnx_helpers import CLASS_NAMES, RESIZE, SIZE, bundle, toy_images

REPO = Path(__file__).resolve().parents[1]
# Any attempt to import torch or metaseg inside the child process raises ImportError.
BLOCK = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'metaseg', 'torchvision'):
            raise ImportError(f'blocked import of {name}')
sys.meta_path.insert(0, Block())
sys.argv = ['export/infer.py'] + sys.argv[1:]
runpy.run_path('export/infer.py', run_name='__main__')
"""


def _reference(image: Image.Image, model_file: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's prediction at the image's size, with the image resized by the prepare stage's own code
    (``importing.fit``, ``prepare.resize: pad``): what training saw, not what infer.py does; and the margin between
    its two largest logits per pixel. The model is the adapted PyTorch one, or ``model_file`` run by ONNX Runtime."""
    import torch

    from metaseg.data.importing import fit
    from metaseg.models.adapted import load_adapted

    model, meta = load_adapted(bundle().adapted)
    width, height = image.size
    rgb = np.asarray(image)
    square, valid = fit(rgb, np.zeros((height, width), np.uint8), int(meta["image_size"]), RESIZE)
    rows, cols = np.nonzero(valid != 255)  # the letterbox is ignore in the prepared mask: the image's own box
    x = (torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255 - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        if model_file is None:
            logits = model(x)["out"]
        else:
            session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
            logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        logits = logits[..., rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        logits = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    top2 = logits[0].topk(2, dim=0).values
    return logits[0].argmax(0).numpy(), (top2[0] - top2[1]).numpy()


def test_model_input_is_the_prepare_transform() -> None:
    """infer.py feeds the model exactly what prepare fed training, for every prepare.resize mode that has a
    square output (pad, stretch), on a non-square image."""
    from metaseg.data.importing import fit

    rgb = np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    for mode in ("pad", "stretch"):
        pixels, box = infer.model_input(rgb, infer.input_size(90, 50, SIZE, mode), SIZE, mode)
        want, _ = fit(rgb, np.zeros((50, 90), np.uint8), SIZE, mode)
        assert np.array_equal(pixels, want), mode
    pixels, (top, left, h, w) = infer.model_input(rgb, infer.input_size(90, 50, SIZE, "crop"), SIZE, "crop")
    assert pixels.shape[:2] == (h, w) and min(h, w) == SIZE and (top, left) == (0, 0)  # whole image, short side


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_infer_runs_without_torch(precision: str, tmp_path: Path) -> None:
    images, _ = toy_images(1, SIZE, seed=7)
    size = (104, 72)  # (W, H): not square, not the training resolution
    Image.fromarray(images[0]).resize(size, Image.Resampling.BILINEAR).save(tmp_path / "scene.png")
    proc = subprocess.run([sys.executable, "-c", BLOCK, str(bundle().onnx_dir / f"model.{precision}.onnx"),
                           str(tmp_path / "scene.png"), "--out", str(tmp_path / "out"), "--overlay"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "out" / "scene.png.png") as im:
        assert im.mode == "P" and im.size == size
        pred = np.asarray(im)
        colours = np.asarray(im.getpalette()[:3 * len(CLASS_NAMES)], dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(colours, palette(len(CLASS_NAMES)))  # the evaluate report's class colours
    assert set(np.unique(pred)) <= {0, 1, 2} and len(np.unique(pred)) > 1  # valid class ids, not a constant
    # the edge script reproduces the prepare-path prediction of the same file (ONNX Runtime) and, for fp32, of the
    # PyTorch model, at the original size: held to the check stage's fp32 agreement floor on the pixels the
    # reference decides (resampling flips only undecided ones; int8's own error is the check stage's business)
    cfg = CheckConfig()
    model_file = bundle().onnx_dir / f"model.{precision}.onnx"
    with Image.open(tmp_path / "scene.png") as im:
        references = [_reference(im.convert("RGB"), model_file)] + \
            ([_reference(im.convert("RGB"))] if precision == "fp32" else [])
    for reference, margin in references:
        decided = margin >= cfg.decided_margin
        assert decided.mean() > 0.1, decided.mean()
        agreement = (pred == reference)[decided].mean()
        assert agreement >= cfg.min_agreement["fp32"], (agreement, (pred == reference).mean(), decided.mean())
    with Image.open(tmp_path / "out" / "scene.png.overlay.png") as im:
        assert im.mode == "RGB" and im.size == size


def test_model_size_keeps_aspect_on_multiples_of_8() -> None:
    assert infer.model_size(480, 640, 64) == (64, 88)
    assert infer.model_size(64, 64, 64) == (64, 64)


@pytest.mark.parametrize("case", ["missing model", "empty folder", "unreadable image"])
def test_errors_are_one_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "nope.onnx" if case == "missing model" else bundle().onnx_dir / "model.fp32.onnx"
    folder = tmp_path / "images"
    folder.mkdir()
    if case == "unreadable image":
        (folder / "broken.png").write_bytes(b"not a png")
    assert infer.main([str(model), str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    expected = {"missing model": "model file not found", "empty folder": "no images", "unreadable image": "broken.png"}
    assert expected[case] in err


def _run_blocked(*args: str) -> subprocess.CompletedProcess:
    """export/infer.py in a child process where importing torch or metaseg fails."""
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_every_version_of_a_picture_gives_the_same_mask(tmp_path: Path) -> None:
    """8-bit RGB, 16-bit and 12-bit-in-16 colour, RGBA, palette, TIFF; and grey 8 / 16 / 12-in-16 bits: one mask."""
    images, _ = toy_images(1, SIZE, seed=7)
    scene = picture(np.asarray(Image.fromarray(images[0]).resize((104, 72), Image.Resampling.BILINEAR)))
    versions = save_versions(tmp_path / "in", scene)
    proc = _run_blocked(str(bundle().onnx_dir / "model.fp32.onnx"), str(tmp_path / "in"), "--out",
                        str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    masks = {name: np.asarray(Image.open(tmp_path / "out" / f"{name}.png")) for name in versions}
    assert len(np.unique(masks["rgb8.png"])) > 1  # not a constant map: the comparison means something
    for name, mask in masks.items():
        reference = masks["grey8.png" if name.startswith("grey") else "rgb8.png"]
        assert mask.shape == (72, 104) and np.array_equal(mask, reference), (name, (mask == reference).mean())


def test_folder_writes_every_good_image_lists_every_bad_one_and_never_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    images, _ = toy_images(2, SIZE, seed=3)
    Image.fromarray(images[0]).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    Image.fromarray(images[1]).resize((400, 300)).save(folder / "photo.jpg", quality=90)  # decoded at 1/2 scale
    Image.fromarray(images[0]).save(folder / "photo.png")  # same stem as photo.jpg
    (folder / "huge.png").write_bytes(bomb_png())
    proc = _run_blocked(str(bundle().onnx_dir / "model.fp32.onnx"), str(folder), "--out", str(tmp_path / "out"),
                        "--overlay")
    assert proc.returncode == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.png.overlay.png", "a.png.png", "photo.jpg.overlay.png", "photo.jpg.png", "photo.png.overlay.png",
        "photo.png.png"]
    with Image.open(tmp_path / "out" / "photo.jpg.png") as mask, \
            Image.open(tmp_path / "out" / "photo.jpg.overlay.png") as overlay:
        assert mask.size == overlay.size == (400, 300)  # written at the original size
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert "b.png: unreadable" in errors[0] and "huge.png: too large" in errors[1] and "2 of 5" in errors[2]
    assert "3 of 5 image(s)" in proc.stdout


def test_model_input_for_a_jpeg_is_what_prepare_stored(tmp_path: Path) -> None:
    """A JPEG decoded at a reduced scale reaches the model exactly as the prepare stage stored it."""
    from metaseg.data.importing import fit, read_image

    rgb = np.random.default_rng(1).integers(0, 256, (480, 800, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=90)
    for mode in ("pad", "stretch"):
        image, stored, _ = read_image(tmp_path / "x.jpg", "x.jpg", size=SIZE, resize=mode, min_side=1)
        want, _ = fit(image, np.zeros(stored[::-1], np.uint8), SIZE, mode)
        seen, _ = infer.read_rgb(tmp_path / "x.jpg", lambda w, h: infer.input_size(w, h, SIZE, mode))
        assert image.shape[0] < 480 and seen.shape == image.shape  # both decoded reduced, alike
        pixels, _ = infer.model_input(seen, infer.input_size(800, 480, SIZE, mode), SIZE, mode)
        assert np.array_equal(pixels, want), mode


@pytest.mark.parametrize("case", ["huge image", "out is a file", "out is the input folder"])
def test_more_errors_are_one_line_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = bundle().onnx_dir / "model.fp32.onnx"
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(toy_images(1, SIZE, seed=1)[0][0]).save(images / "a.png")
    target, out = images / "a.png", tmp_path / "out"
    if case == "huge image":
        (target := images / "huge.png").write_bytes(bomb_png())  # 14000 x 13000 claimed: 182 megapixels
    elif case == "out is a file":
        out.write_text("an existing file")
    else:
        target, out = images, images
    assert infer.main([str(model), str(target), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {"huge image": "huge.png: too large", "out is a file": "not a folder",
            "out is the input folder": "input folder"}[case] in err


def test_runs_from_a_folder_holding_only_its_two_files(tmp_path: Path) -> None:
    """On the device: infer.py beside image_reader.py, no repository on the path; without the reader, one line."""
    device = tmp_path / "device"
    device.mkdir()
    shutil.copy(REPO / "export" / "infer.py", device)
    Image.fromarray(toy_images(1, SIZE, seed=2)[0][0]).save(device / "a.png")
    cmd = [sys.executable, "-E", "infer.py", str(bundle().onnx_dir / "model.int8.onnx"), "a.png", "--out", "masks"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=device, timeout=120)  # -E: PYTHONPATH ignored
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: image_reader.py not found: copy export/image_reader.py beside infer.py"
    shutil.copy(REPO / "export" / "image_reader.py", device)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=device, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (device / "masks" / "a.png.png").is_file()
