"""Stage `check`: every exported ONNX model vs its PyTorch adapted model on the domain's test pool.

    python -m pipeline.check --params params.yaml --onnx models/onnx --adapted models/adapted --prepared data/prepared \
        --splits data/splits --results results/check

Prints a table, writes results/check/metrics.json (passed = 0/1 per model and overall), results/check/timings.json
(latency and throughput) and results/check/verified.json (only the files that passed, with their sha256); any breach
exits 1 with one line after the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.runtime_check import (CheckFailed, enforce, flat_metrics, flat_timings, format_table,
                                  run_checks, verified)
from metaseg.cli import run_stage, stage_parser
from metaseg.config import load_config
from metaseg.io import write_json, write_timings


def main(args: argparse.Namespace) -> None:
    cfg = load_config(args.params, "check")["check"]
    rows = run_checks(args.onnx, args.adapted, args.prepared, Path(args.splits) / "splits.json",
                      atol_cpu=cfg.atol_cpu, atol_cuda=cfg.atol_cuda, min_agreement=dict(cfg.min_agreement),
                      decided_margin=cfg.decided_margin, miou_drop=cfg.miou_drop, tensorrt=cfg.tensorrt,
                      check_size=cfg.check_size,
                      latency_runs=cfg.latency_runs, warmup_runs=cfg.warmup_runs)
    print(format_table(rows), flush=True)
    write_json(Path(args.results) / "metrics.json", flat_metrics(rows))
    write_timings(args.results, flat_timings(rows))
    write_json(Path(args.results) / "verified.json", verified(rows))
    try:
        enforce(rows)
    except CheckFailed as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, help="models/onnx (every <domain>/<algorithm>/model.*.onnx)")
    parser.add_argument("--adapted", required=True, help="models/adapted")
    parser.add_argument("--prepared", required=True, help="data/prepared")
    parser.add_argument("--splits", required=True, help="data/splits (reads splits.json)")
    parser.add_argument("--results", required=True, help="results/check (metrics.json, timings.json, verified.json)")
    run_stage(main, parser)
