"""Stage entry scripts, run from the repo root as `python -m pipeline.<stage>` (dvc.yaml)."""
