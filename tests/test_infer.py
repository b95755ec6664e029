"""export/infer.py: runs with torch blocked, writes palette masks at the input size, one-line errors with exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export import infer
from tests.onnx_helpers import SIZE, bundle, toy_images

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


def _torch_reference(image: Image.Image) -> np.ndarray:
    """The adapted PyTorch model's own prediction at the image's size, through infer's documented preprocessing."""
    import torch

    from metaseg.models.adapted import load_adapted

    model, meta = load_adapted(bundle().adapted)
    width, height = image.size
    h, w = infer.model_size(height, width, int(meta["image_size"]))
    x = infer.preprocess(np.asarray(image.resize((w, h), Image.Resampling.BILINEAR)), meta["mean"], meta["std"])
    with torch.no_grad():
        logits = model(torch.from_numpy(x))["out"]
        logits = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).numpy()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_infer_runs_without_torch(precision: str, tmp_path: Path) -> None:
    images, _ = toy_images(1, SIZE, seed=7)
    size = (104, 72)  # (W, H): not square, not the training resolution
    Image.fromarray(images[0]).resize(size, Image.Resampling.BILINEAR).save(tmp_path / "scene.png")
    proc = subprocess.run([sys.executable, "-c", BLOCK, str(bundle().onnx_dir / f"model.{precision}.onnx"),
                           str(tmp_path / "scene.png"), "--out", str(tmp_path / "out"), "--overlay"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "out" / "scene.png") as im:
        assert im.mode == "P" and im.size == size
        pred = np.asarray(im)
    assert set(np.unique(pred)) <= {0, 1, 2} and len(np.unique(pred)) > 1  # valid class ids, not a constant
    with Image.open(tmp_path / "scene.png") as im:
        reference = _torch_reference(im.convert("RGB"))
    # the edge script reproduces the PyTorch model's prediction at the original size (resampling differs only
    # at boundaries); int8 quality itself is the check stage's business, here it must just be a real mask
    agreement = (pred == reference).mean()
    assert agreement >= (0.99 if precision == "fp32" else 0.5), agreement
    with Image.open(tmp_path / "out" / "scene.overlay.png") as im:
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
