"""The docs a user reads stay in step with what the code does."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bad_inputs_table_lists_every_case_and_each_holds() -> None:
    """docs/bad_inputs.md is written by bench/bad_inputs.py: a case added to the script without regenerating the
    table, or a row where the promised exit code and one-line error did not hold, fails here."""
    spec = importlib.util.spec_from_file_location("bad_inputs", ROOT / "bench" / "bad_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [line.split(" | ") for line in (ROOT / "docs" / "bad_inputs.md").read_text().splitlines()
            if re.match(r"^\| \d+ \| ", line)]
    assert [(r[1], r[2]) for r in rows] == [(stage, what) for stage, what, _, _ in mod.cases(None)]
    assert all(r[5] == "yes" for r in rows), [r[:6] for r in rows if r[5] != "yes"]
