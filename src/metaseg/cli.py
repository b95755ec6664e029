"""What every stage script shares: logging set-up, one-line errors with exit code 2, device choice."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from metaseg.config import ConfigError

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Bad user input (a data file, a path, a missing upstream output): one line naming the file and the reason."""


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_stage(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse argv, run ``main``; a ConfigError / InputError / FileNotFoundError prints one line and exits 2."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    setup_logging()
    args = parser.parse_args()
    try:
        main(args)
    except (ConfigError, InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser


def choose_device(setting: str) -> str:
    """``auto`` -> "cuda" when torch sees a GPU, else "cpu". ``cuda`` without a GPU is an error."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("'base.device': cuda requested but torch.cuda.is_available() is false; use auto or cpu")
    return setting
