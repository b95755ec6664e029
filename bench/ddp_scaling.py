"""Outer-step time of one meta-batch on 1 process vs 2 processes (train.nproc), side by side in one run.

python bench/ddp_scaling.py [--algorithm fomaml] [--meta-batch 4] [--size 128] [--steps 1] [--reps 5] [--device auto]

Each configuration runs in its own subprocess on the same seeded tasks: one process with all the threads, one
process with half of them, and two processes (gloo on CPU, nccl on CUDA with one GPU each; needs 2 GPUs) with
half each, every process taking its share of the meta-batch as the train stage does and averaging the
meta-gradient (``Algorithm._outer_update``). Also times that all-reduce alone. Prints a markdown table; the
speed-up is 1 process (all threads) / 2 processes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _tasks(a: argparse.Namespace, device):
    import torch

    g = torch.Generator().manual_seed(1)
    n = a.shots + a.queries
    out = []
    for _ in range(a.meta_batch):
        x = torch.randn(n, 3, a.size, a.size, generator=g)
        y = (torch.rand(n, a.size, a.size, generator=g) > 0.7).long()
        out.append(SimpleNamespace(support_x=x[:a.shots].to(device), support_y=y[:a.shots].to(device),
                                   query_x=x[a.shots:].to(device), query_y=y[a.shots:].to(device), class_ids=(1,)))
    return out


def _measure(rank: int, world: int, a: argparse.Namespace, init_file: str | None, out: str) -> None:
    import torch
    import torch.distributed as dist

    from metaseg import distributed
    from metaseg.cli import choose_device
    from metaseg.meta.algorithms import make_algorithm
    from metaseg.models.deeplab import build_model

    torch.set_num_threads(a.threads)
    device = torch.device(choose_device(a.device))
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(a.backbone, backbone_weights=None).to(device)
    algo = make_algorithm(a.algorithm, model, inner_steps=a.steps, inner_lr=1e-3, outer_lr=1e-6, aux_weight=0.0)
    share = distributed.share(_tasks(a, device), rank, world)

    def timed(fn) -> list[float]:
        fn()  # warm-up
        times = []
        for _ in range(a.reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            distributed.barrier()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return times

    step = timed(lambda: algo.step(share))
    reduce = timed(lambda: distributed.average_grads(algo.meta_parameters(), len(share))) if world > 1 else None
    if rank == 0:
        Path(out).write_text(json.dumps({"step": statistics.median(step), "reduce": reduce and statistics.median(reduce),
                                         "device": str(device.type)}))
    if world > 1:
        dist.destroy_process_group()


def phase(a: argparse.Namespace) -> None:
    import torch

    from metaseg.cli import choose_device

    if choose_device(a.device) == "cuda" and torch.cuda.device_count() < a.procs:
        print(json.dumps({"step": None, "reduce": None, "device": f"cuda (needs {a.procs} GPUs)"}))
        return
    out = tempfile.mktemp(suffix=".json")
    if a.procs == 1:
        _measure(0, 1, a, None, out)
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_measure, args=(a.procs, a, str(Path(tmp) / "rendezvous"), out), nprocs=a.procs, join=True)
    print(Path(out).read_text())
    os.unlink(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithm", default="fomaml")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="inner steps k")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backbone", default="mobilenet_v3_large")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of the whole machine (0 = os.cpu_count())")
    p.add_argument("--procs", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.procs:
        phase(a)
        return
    load_before = os.getloadavg()[0]
    total = a.threads or os.cpu_count() or 1
    half = max(1, total // 2)
    rows = []
    for procs, threads in ((1, total), (1, half), (2, half)):
        cmd = [sys.executable, __file__, f"--procs={procs}", f"--threads={threads}"] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("procs", "threads")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append((procs, threads, json.loads(out)))
    base = rows[0][2]["step"]
    print(f"device {rows[0][2]['device']}, {a.algorithm}, {a.backbone}, {a.size} px, meta-batch {a.meta_batch} "
          f"(support {a.shots}, query {a.queries}), k = {a.steps}, median of {a.reps}; 1-min load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)\n")
    print("| processes x threads | outer step (s) | speed-up vs 1 x all threads | meta-gradient all-reduce (s) |")
    print("|---|---|---|---|")
    for procs, threads, r in rows:
        red = "" if r["reduce"] is None else f"{r['reduce']:.3f}"
        if r["step"] is None:
            print(f"| {procs} x {threads} | n/a ({r['device']}) | | |")
        else:
            print(f"| {procs} x {threads} | {r['step']:.3f} | {base / r['step']:.2f} | {red} |")


if __name__ == "__main__":
    main()
