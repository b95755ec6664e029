"""Stage `export`: one adapted model -> models/onnx/<domain>/<algorithm>/model.{fp32,fp16,int8}.onnx + card.json.

    python -m pipeline.export --params params.yaml --adapted models/adapted/<d>/<a>.pt --prepared data/prepared \
        --out models/onnx/<d>/<a> --results results/export/<d>/<a> [--evaluate-metrics results/evaluate/metrics.json]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.onnx_export import ExportError, export_adapted, int8_reduce_range
from metaseg.cli import InputError, run_stage, stage_parser
from metaseg.config import load_config
from metaseg.data.splits import load_splits
from metaseg.io import write_json, write_timings

SECTIONS = ("export",)  # the params this stage reads (hashed into the ONNX metadata)


def support_pool(splits_dir: str | None, adapted: str) -> list[int] | None:
    """The domain's support-pool indices from splits.json (int8 calibration never sees the check's test pool)."""
    if splits_dir is None:
        return None
    domain = Path(adapted).parent.name
    pools = load_splits(Path(splits_dir) / "splits.json")["pools"]
    if domain not in pools:
        raise InputError(f"{splits_dir}/splits.json: no pools for domain '{domain}' (is it a meta-test domain?)")
    return list(pools[domain]["support"])


def main(args: argparse.Namespace) -> None:
    params = load_config(args.params, *SECTIONS)
    cfg = params["export"]
    resize = load_config(args.params, "prepare")["prepare"].resize  # travels in the metadata to infer.py
    try:
        metrics, timings = export_adapted(args.adapted, args.out, args.prepared, precisions=list(cfg.precisions),
                                          opset=cfg.opset, export_size=cfg.export_size,
                                          calibration_images=cfg.calibration_images, params=params,
                                          evaluate_metrics=args.evaluate_metrics,
                                          calibration_indices=support_pool(args.splits, args.adapted), resize=resize,
                                          int8_reduce_range=int8_reduce_range(cfg.int8_reduce_range))
    except ExportError as err:
        sys.exit(f"error: {err}")
    write_json(Path(args.results) / "metrics.json", metrics)
    write_timings(args.results, timings)


if __name__ == "__main__":
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--adapted", required=True, help="models/adapted/<domain>/<algorithm>.pt")
    parser.add_argument("--prepared", required=True, help="data/prepared (int8 calibration images)")
    parser.add_argument("--splits", default=None, help="data/splits (int8 calibration from the support pool)")
    parser.add_argument("--out", required=True, help="models/onnx/<domain>/<algorithm>")
    parser.add_argument("--results", required=True, help="results/export/<domain>/<algorithm>")
    parser.add_argument("--evaluate-metrics", default=None, help="results/evaluate/metrics.json for the model card")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per rewritten initializer otherwise
    run_stage(main, parser)
