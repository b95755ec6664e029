"""Atomic writes: a killed stage never leaves a half file that looks whole (temp file in the same folder + rename).
And reading: JSON, and a YAML syntax error as one line with its position."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path, *, directory: bool) -> None:
    """mkstemp/mkdtemp create owner-only entries; give the output the mode a plain open()/mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _default_mode(tmp_path, directory=False)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent) written atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


TIMINGS = "timings.json"  # beside a stage's metrics.json; a plain output, so `dvc metrics diff` leaves it out


def write_timings(results: str | Path, timings: Mapping[str, Any]) -> None:
    """``<results>/timings.json``: a stage's clock readings (seconds, latency, throughput), atomically. They change on
    every run, so they live apart from the quality metrics in ``metrics.json``: `dvc metrics diff` shows what a change
    did to quality, and ``dvc metrics diff --targets <results>/timings.json`` shows the timings (README)."""
    write_json(Path(results) / TIMINGS, dict(timings))


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_torch(path: str | Path, *, what: str, hint: str = "", weights_only: bool = True,
               map_location: Any = "cpu") -> Any:
    """``torch.load`` with the one-line contract: a missing file raises FileNotFoundError, an unreadable one
    (not a PyTorch file, truncated, another format) InputError; both name the file, ``what`` it should be and
    ``hint`` (what to do)."""
    import torch

    from metaseg.cli import InputError

    path, hint = Path(path), f" ({hint})" if hint else ""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found{hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the one-line error
        reason = (str(err).strip().splitlines() or [""])[0][:120]
        raise InputError(f"{path}: not a readable {what} ({type(err).__name__}: {reason}){hint}") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML syntax error on one line, with the line and column DVC's own message gives (1-based):
    ``line 4, column 6: expected ',' or ']', but got ':' (while parsing a flow sequence from line 3, column 15)``."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:  # e.g. a ReaderError (a control character): "..., position 12"
        return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if context and context_mark is not None:
        text += f" ({context} from line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        text += f" ({context})"
    return text


def save_with(path: str | Path, save: Callable[[Path], None]) -> None:
    """Atomically write a file produced by ``save(tmp_path)`` (e.g. ``lambda p: torch.save(obj, p)``)."""
    with atomic_path(path) as tmp:
        save(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a whole output folder in a temp folder beside it, then swap it in; on error nothing changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _default_mode(tmp, directory=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
