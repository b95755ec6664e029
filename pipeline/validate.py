"""Stage `validate`: check the whole params file before DVC runs any other stage (dvc.yaml: always_changed).

python -m pipeline.validate --params params.yaml --out results/validate/params.ok

Every other stage depends on ``--out``, so `dvc repro` and `dvc exp run` run this first, every time, even when all
stages are up to date: a misspelt key, a bad value or a missing key stops them with one line, exit 2. The file it
writes never changes (it orders the stages, it carries no data), so a valid params change reruns only the stages
that declare the changed keys.
"""
from __future__ import annotations

import argparse
import logging

from metaseg.cli import run_stage, stage_parser
from metaseg.config import SECTIONS, load_config
from metaseg.io import write_text

log = logging.getLogger("validate")


def main(args: argparse.Namespace) -> None:
    load_config(args.params, *SECTIONS)  # raises ConfigError (one line, exit 2) before anything is written
    write_text(args.out, "params validated by pipeline/validate.py\n")
    log.info("%s: every section and key valid", args.params)


if __name__ == "__main__":
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="stamp file the other stages depend on (never changes)")
    run_stage(main, parser)
