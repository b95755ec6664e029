"""Export benchmark: ONNX Runtime vs PyTorch eager, DeepLabv3 (mobilenet_v3_large by default) at 1x3x256x256.

    python bench/export_latency.py [--size 256] [--runs 30] [--rounds 5] [--backbone mobilenet_v3_large]

Prints a markdown table (device named in the header): ORT CPU latency / torch eager latency (goal <= 0.40) for several
ORT session settings, file sizes fp16/fp32 (<= 0.52) and int8/fp32 (<= 0.30); with a CUDA GPU also ORT CUDA IO-binding
/ torch eager (<= 0.7) and the runtime check's per-batch cost / pure ORT inference (<= 1.2). Torch and ORT are timed in
alternating rounds so that load from other processes hits both alike; each figure is the median over rounds of the
per-round median, warm-up excluded.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx_export import export_fp32, int8_reduce_range, to_fp16, to_int8  # noqa: E402
from export.runtime_check import BATCH, OrtRunner, choose_providers, pool_miou, strict_fp32  # noqa: E402
from metaseg.models.adapted import plain_deeplab  # noqa: E402
from metaseg.models.backbones import BACKBONES, normalization  # noqa: E402

NUM_CLASSES = 2


def physical_cores() -> int:
    try:
        pairs = set()
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                block[k] = v
            elif block:
                pairs.add((block.get("physical id"), block.get("core id", block.get("processor"))))
                block = {}
        return max(1, len(pairs))
    except OSError:
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def timed(fn: Callable[[], object], runs: int, sync: Callable[[], None]) -> float:
    """Median ms per call over ``runs`` calls (one warm-up call first)."""
    fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def side_by_side(fns: dict[str, Callable[[], object]], *, runs: int, rounds: int, warmup: int,
                 sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median over rounds of each function's median latency, the functions alternating within every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    per: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(timed(fn, runs, sync))
    return {name: float(np.median(v)) for name, v in per.items()}


def cpu_session(data: bytes, variant: str, threads: int, size: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if variant != "default":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.enable_cpu_mem_arena = True
    if variant in ("tuned, no spinning", "tuned, fixed input shape"):
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if variant == "tuned, fixed input shape":  # an edge app with one input size: shapes become static
        for name, value in (("batch", 1), ("height", size), ("width", size)):
            opts.add_free_dimension_override_by_name(name, value)
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=20, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=physical_cores(),
                        help="torch threads and ORT intra-op threads of the tuned sessions (default: physical cores)")
    parser.add_argument("--backbone", choices=BACKBONES, default="mobilenet_v3_large")
    parser.add_argument("--output-stride", type=int, choices=(8, 16), default=16, help="EfficientNet-Lite only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = plain_deeplab(args.backbone, NUM_CLASSES, output_stride=args.output_stride).eval()
    mean, std = normalization(args.backbone)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (4, args.size, args.size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    fp32 = export_fp32(model, opset=18, export_size=args.size)
    files = {"fp32": fp32.SerializeToString(), "fp16": to_fp16(fp32).SerializeToString(),
             "int8": to_int8(fp32, calib, list(mean), list(std),
                             reduce_range=int8_reduce_range("auto")).SerializeToString()}
    export_s = time.perf_counter() - t0
    rows: list[tuple[str, str, str, str]] = []
    size = {k: len(v) / 1e6 for k, v in files.items()}
    sizes = " / ".join(f"{size[p]:.1f}" for p in ("fp32", "fp16", "int8"))
    rows.append(("size fp32 / fp16 / int8 (MB)", sizes, "", ""))
    for p, goal in (("fp16", 0.52), ("int8", 0.30)):
        r = size[p] / size["fp32"]
        rows.append((f"size {p} / fp32", f"{r:.3f}", f"<= {goal}", "yes" if r <= goal else "NO"))

    x = torch.randn(1, 3, args.size, args.size)
    xn = x.numpy()
    fns: dict[str, Callable[[], object]] = {}
    with torch.inference_mode():
        fns["torch eager"] = lambda: model(x)["out"]
        sessions = {v: cpu_session(files["fp32"], v, args.threads, args.size)
                    for v in ("default", "tuned", "tuned, no spinning", "tuned, fixed input shape")}
        for v, s in sessions.items():
            fns[f"ort cpu fp32 ({v})"] = (lambda s=s: s.run(None, {"input": xn}))
        s8 = cpu_session(files["int8"], "tuned, no spinning", args.threads, args.size)
        fns["ort cpu int8 (tuned, no spinning)"] = lambda: s8.run(None, {"input": xn})
        ms = side_by_side(fns, runs=args.runs, rounds=args.rounds, warmup=args.warmup)
    rows.append(("torch eager CPU latency (ms)", f"{ms['torch eager']:.2f}", "", f"{torch.get_num_threads()} threads"))
    for name, value in ms.items():
        if name != "torch eager":
            r = value / ms["torch eager"]
            rows.append((f"{name} / torch eager", f"{r:.3f} ({value:.2f} ms)", "<= 0.40", "yes" if r <= 0.40 else "NO"))

    device = f"CPU: {cpu_name()} ({os.cpu_count()} logical, {physical_cores()} physical cores)"
    if torch.cuda.is_available():
        device += f"; GPU: {torch.cuda.get_device_name()}"
        torch.set_num_threads(physical_cores())
        rows += cuda_rows(model, files["fp32"], args)
    stride = f", output stride {args.output_stride}" if args.backbone.startswith("efficientnet_lite") else ""
    print(f"\n### export latency: DeepLabv3 {args.backbone}{stride}, 1x3x{args.size}x{args.size}\n")
    print(f"Device: {device}; torch {torch.__version__}, onnxruntime {ort.__version__}; export took {export_s:.1f} s\n")
    print("| metric | value | goal | met |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def cuda_rows(model: torch.nn.Module, fp32: bytes, args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """ORT CUDA (IO binding) vs torch eager at batch 1; check cost per batch vs pure ORT inference at batch 8."""
    _, providers = choose_providers(False)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"metaseg-bench-{os.getpid()}.onnx"
    path.write_bytes(fp32)
    try:
        runner = OrtRunner(path, providers, NUM_CLASSES)
    finally:
        path.unlink()
    model = model.cuda()
    x1 = torch.randn(1, 3, args.size, args.size, device="cuda")
    x8 = torch.randn(BATCH, 3, args.size, args.size, device="cuda")
    target = torch.randint(0, NUM_CLASSES, (BATCH, args.size, args.size), device="cuda")
    with torch.inference_mode(), strict_fp32():
        ref = model(x8)["out"]

        def check_batch() -> None:  # what runtime_check.check_one does per batch
            got = runner(x8)
            (got - ref).abs().max()
            pred = got.argmax(1)
            (pred == ref.argmax(1)).sum()
            pool_miou([pred], target, NUM_CLASSES)

        ms = side_by_side({"torch": lambda: model(x1)["out"], "ort": lambda: runner(x1), "ort8": lambda: runner(x8),
                           "check8": check_batch}, runs=args.runs, rounds=args.rounds, warmup=args.warmup,
                          sync=torch.cuda.synchronize)
    r1, r2 = ms["ort"] / ms["torch"], ms["check8"] / ms["ort8"]
    return [(f"ort CUDA IO-binding / torch eager CUDA ({runner.provider})", f"{r1:.3f} ({ms['ort']:.2f} ms vs "
             f"{ms['torch']:.2f} ms)", "<= 0.7", "yes" if r1 <= 0.7 else "NO"),
            ("check per batch / pure ORT inference (batch 8)",
             f"{r2:.3f} ({ms['check8']:.2f} ms vs {ms['ort8']:.2f} ms)",
             "<= 1.2", "yes" if r2 <= 1.2 else "NO")]


if __name__ == "__main__":
    main()
