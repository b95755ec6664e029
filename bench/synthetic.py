"""Synthetic generator throughput: images/s per domain at 128x128 on one CPU core.

    taskset -c 0 python bench/synthetic.py [--size 128] [--images 200] [--domains 12]

Pins itself to one core (os.sched_setaffinity, where available) and to one BLAS/OpenMP thread, so the figure is
per core whether or not taskset is used. Prints a markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from metaseg.data.synthetic import DOMAIN_NAMES, generate_domain  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--images", type=int, default=200, help="images per domain")
    p.add_argument("--domains", type=int, default=len(DOMAIN_NAMES))
    p.add_argument("--repeats", type=int, default=3, help="best of N runs per domain")
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    generate_domain(DOMAIN_NAMES[0], 4, args.size, seed=0)  # warm-up (caches, imports)
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"cores used: 1, size {args.size}x{args.size}, {args.images} images per domain, best of {args.repeats}\n")
    print("| domain | images/s |\n|---|---:|")
    total_images, total_s = 0, 0.0
    for name in DOMAIN_NAMES[: args.domains]:
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            generate_domain(name, args.images, args.size, seed=0)
            best = min(best, time.perf_counter() - start)
        total_images, total_s = total_images + args.images, total_s + best
        print(f"| {name} | {args.images / best:.0f} |")
    print(f"| **all** | **{total_images / total_s:.0f}** |")


if __name__ == "__main__":
    main()
