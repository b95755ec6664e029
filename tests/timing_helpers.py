"""Timings vs quality: a stage writes its clock readings to timings.json, never to metrics.json, so that
`dvc metrics diff` in a review shows what a change did to quality (house style, Outputs)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from metaseg.io import read_json

# every key a stage derives from a clock: seconds, per-step time, latency, throughput and their ratios
TIMING = re.compile(r"seconds|_time_s$|_per_s$|^s_per_step$|latency|throughput|_ms$|_ips$|_over_torch$"
                    r"|(^|/)export_s_|^speed\.")


def is_timing(key: str) -> bool:
    return bool(TIMING.search(key))


def assert_apart(metrics: dict[str, Any], timings: dict[str, Any]) -> None:
    """No timing among the metrics; the timings hold timings only, and at least one."""
    assert not [k for k in metrics if is_timing(k)], f"timings in metrics.json: {sorted(filter(is_timing, metrics))}"
    assert timings and all(is_timing(k) for k in timings), f"not a timing: {sorted(timings)}"


def read_apart(results: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``results/{metrics,timings}.json`` after ``assert_apart``."""
    assert (results / "timings.json").is_file(), f"{results}: no timings.json"
    metrics, timings = read_json(results / "metrics.json"), read_json(results / "timings.json")
    assert_apart(metrics, timings)
    return metrics, timings
