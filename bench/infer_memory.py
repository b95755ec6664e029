"""Peak memory of the edge script (export/infer.py) on a large photo: the target device has 1 GB.

python bench/infer_memory.py [--script export/infer.py [--script OTHER/infer.py]] [--model MODEL.onnx]
                             [--width 6000 --height 4000]

Each row is a fresh process; its peak resident memory is ru_maxrss from os.wait4, the whole process (Python, numpy,
Pillow, onnxruntime and the model included), taken by a small launcher process: Linux counts a forked child's memory
before exec in its peak, so forking from this (large) process directly would report this process's size. The floor
row is a process that only imports what infer.py imports and loads the model. The photo is synthetic (smooth
gradients + noise), saved as JPEG (quality 90) and PNG. Without --model the tests' toy bundle is built
(mobilenet_v3_large DeepLabv3, 3 classes, 64 px; about 30 s). Pass an older infer.py as a second --script to compare
(it must run with the same Python). Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FLOOR = ("import sys, numpy, onnxruntime as ort, PIL.Image; "
         "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])")
LAUNCH = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
          "_, status, usage = os.wait4(p.pid, 0); print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")


def photo(width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.empty((height, width, 3), np.uint8)
    for c, (fx, fy) in enumerate([(1.0, 0.5), (0.3, 1.2), (0.7, 0.7)]):
        wave = 127 + 90 * np.sin(x * fx / width * 9 + y * fy / height * 7)
        rgb[..., c] = np.clip(wave + rng.normal(0, 12, (height, width)), 0, 255).astype(np.uint8)
    return rgb


def peak_mb(cmd: list[str]) -> tuple[float, float]:
    """Peak RSS (MB) and wall seconds of ``cmd`` run by the launcher; exits on failure."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCH, *cmd], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    code, kib = proc.stdout.split()[-2:] if proc.returncode == 0 else ("1", "0")
    if code != "0":
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr[-400:]}")
    return int(kib) / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", action="append", type=Path, help="infer.py to measure (repeatable)")
    parser.add_argument("--model", type=Path, help="an exported model.*.onnx (default: the tests' toy bundle)")
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args()
    scripts = args.script or [ROOT / "export" / "infer.py"]
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from tests.onnx_helpers import bundle

        args.model = bundle().onnx_dir / "model.fp32.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        rgb = photo(args.width, args.height)
        Image.fromarray(rgb).save(Path(tmp) / "photo.jpg", quality=90)
        Image.fromarray(rgb).save(Path(tmp) / "photo.png", compress_level=1)
        del rgb
        rows = [("imports + model load only", "", "", *peak_mb([sys.executable, "-c", FLOOR, str(args.model)]))]
        for script in scripts:
            for name in ("photo.jpg", "photo.png"):
                for overlay in ([], ["--overlay"]):
                    out = Path(tmp) / f"out{len(rows)}"
                    cmd = [sys.executable, str(script), str(args.model), str(Path(tmp) / name), "--out", str(out)]
                    rows.append((str(script), name, "yes" if overlay else "no", *peak_mb(cmd + overlay)))
    print(f"{args.width}x{args.height} photo, model {args.model.name}\n")
    print("| script | input | --overlay | peak RSS (MB) | wall (s) |\n|---|---|---|---:|---:|")
    for script, name, overlay, mb, seconds in rows:
        print(f"| {script} | {name} | {overlay} | {mb:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
