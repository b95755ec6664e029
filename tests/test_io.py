"""Files a user hands a stage that are not what they should be: one line naming the file, never a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metaseg.cli import InputError
from metaseg.io import load_torch
from metaseg.meta.finetune import load_init
from metaseg.models.adapted import load_adapted


def _garbage(tmp_path: Path) -> dict[str, Path]:
    files = {"text": tmp_path / "text.pt", "truncated": tmp_path / "truncated.pt", "other": tmp_path / "other.pt"}
    files["text"].write_bytes(b"not a checkpoint")
    torch.save({"params": torch.zeros(1000)}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:300])
    torch.save({"something": torch.zeros(2)}, files["other"])  # readable, but not what the stage needs
    return files


@pytest.mark.parametrize("loader,what", [(load_init, "trained init"), (load_adapted, "adapted model")])
def test_a_bad_model_file_is_one_line_naming_it(tmp_path: Path, loader, what: str) -> None:
    for kind, path in _garbage(tmp_path).items():
        with pytest.raises(InputError) as err:
            loader(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: not a ") and what in msg and "\n" not in msg, (kind, msg)
    with pytest.raises(FileNotFoundError, match=f"{what} not found"):
        loader(tmp_path / "missing.pt")


def test_load_torch_reads_a_good_file(tmp_path: Path) -> None:
    torch.save({"x": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(load_torch(tmp_path / "ok.pt", what="thing")["x"], torch.arange(3))
