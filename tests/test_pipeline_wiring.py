"""params.yaml and dvc.yaml stay in step with the config classes: one name per stage, params flow one way."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from timing_helpers import is_timing

from metaseg.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _stage(name: str) -> dict:
    stage = DVC[name]
    return stage.get("do", stage)


def _declared(name: str) -> set[str]:
    return {p for p in _stage(name).get("params", []) if isinstance(p, str)}


def test_params_yaml_spells_out_every_key() -> None:
    # DVC templating and `dvc params diff` see only what params.yaml writes, not the config defaults (and
    # load_config refuses a file that leaves a key out: a key added to a class must be added here too)
    for section, cls in SECTIONS.items():
        assert set(PARAMS[section]) == set(cls.model_fields), section


def test_one_name_per_stage() -> None:
    for name in DVC:
        assert (ROOT / "pipeline" / f"{name}.py").is_file(), name
        assert name in SECTIONS or name == "validate", name  # validate has no knobs: it checks every section
        assert f"python -m pipeline.{name} " in _stage(name)["cmd"]


def test_validate_runs_first_on_every_repro() -> None:
    """A typo in params.yaml stops `dvc repro` / `dvc exp run` even when every stage is up to date: the validate
    stage always runs, and every other stage depends on its stamp (so DVC runs it first), never on a params key."""
    validate = DVC["validate"]
    assert validate.get("always_changed") is True and "params" not in validate
    (stamp,) = _entries(validate, "outs")
    assert _entries(validate, "outs")[stamp] == {"cache": False}
    assert f"--out {stamp}" in validate["cmd"] and "--params params.yaml" in validate["cmd"]
    for name in DVC:
        if name != "validate":
            assert stamp in _stage(name)["deps"], f"{name}: add {stamp} to its deps"


def test_train_stages_rerun_on_their_keys_only() -> None:
    # every TrainConfig key but the list of algorithms: adding an algorithm does not retrain the others
    keys = {p.removeprefix("train.") for p in _declared("train") if p.startswith("train.")}
    assert keys == set(SECTIONS["train"].model_fields) - {"algorithms"}


def test_splits_change_does_not_rerun_prepare() -> None:
    assert not any(p.startswith("splits") for p in _declared("prepare"))
    assert "splits" in _declared("splits")


# modules every stage imports that compute no result: argument parsing and logging, params validation (every key is
# spelled out in params.yaml, which DVC tracks, so a code default never decides a run), atomic file writes
_INFRASTRUCTURE = {"src/metaseg/cli.py", "src/metaseg/config.py", "src/metaseg/io.py"}


def _module_file(name: str) -> str | None:
    """The repository file of a first-party module (metaseg.*, export.*), or None."""
    parts = name.split(".")
    if parts[0] == "metaseg":
        base = ROOT / "src" / Path(*parts)
    elif parts[0] == "export":
        base = ROOT / Path(*parts)
    else:
        return None
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(ROOT).as_posix()
    return None


def _import_closure(script: str) -> set[str]:
    """Every first-party file ``script`` imports, directly or through others (function-local imports included)."""
    import ast

    seen: set[str] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                found = _module_file(name)
                if found is not None:
                    todo.append(found)
    return {p for p in seen if not p.endswith("__init__.py") or (ROOT / p).stat().st_size > 200}


def test_every_stage_depends_on_the_code_it_runs() -> None:
    """An edit to any module a stage imports reruns that stage: its dvc.yaml deps cover its import closure."""
    missing = {}
    for name in DVC:
        deps = [d for d in _stage(name)["deps"] if "$" not in d]
        closure = _import_closure(f"pipeline/{name}.py") - _INFRASTRUCTURE
        uncovered = sorted(f for f in closure if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
        if uncovered:
            missing[name] = uncovered
    assert not missing, f"stage deps miss imported code: {missing}"


def test_shared_constants_and_helpers_are_defined_once() -> None:
    """One "ignore" mask value, one list of algorithm names, one class-presence matrix, one palette: each defined
    in exactly one module of the code (src/, export/, pipeline/, bench/), imported everywhere else."""
    import ast

    defined: dict[str, list[str]] = {"IGNORE": [], "ALGORITHMS": [], "class_presence": [], "palette": []}
    for folder in ("src", "export", "pipeline", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    names = [node.name] + [n.name for n in node.body if isinstance(n, ast.FunctionDef)]
                for name in set(names) & set(defined):
                    defined[name].append(str(path.relative_to(ROOT)))
    assert defined == {"IGNORE": ["src/metaseg/data/prepared.py"], "ALGORITHMS": ["src/metaseg/config.py"],
                       "class_presence": ["src/metaseg/data/prepared.py"], "palette": ["src/metaseg/overlay.py"]}
    for path in sorted((ROOT / "src").rglob("*.py")):  # no module writes the ignore value as a bare 255 literal
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == 255
                                                     for c in [node.left, *node.comparators]):
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: compares with 255; use IGNORE")


_TIMES = re.compile(r"\b(perf_counter|monotonic|time\.time|write_timings)\(")  # reads a clock, writes timings


def _entries(stage: dict, kind: str) -> dict[str, dict]:
    """A stage's ``outs`` / ``metrics`` as {path: options}."""
    out: dict[str, dict] = {}
    for entry in stage.get(kind, []):
        path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        out[path] = options or {}
    return out


def test_metrics_files_hold_quality_and_timings_are_plain_outputs() -> None:
    """`dvc metrics diff` shows what a change did to quality: every stage's metrics files are metrics.json files
    whose committed copies hold no timing; every stage whose code reads a clock declares timings.json beside each of
    its metrics.json as a plain git-tracked output (cache: false), never under metrics, so `dvc metrics show/diff`
    leave it out unless it is named with --targets."""
    for name in DVC:
        stage = _stage(name)
        metrics, outs = _entries(stage, "metrics"), _entries(stage, "outs")
        if name == "validate":  # measures nothing: its one output is the stamp the other stages wait for
            assert not metrics and not _TIMES.search((ROOT / "pipeline/validate.py").read_text())
            continue
        assert metrics and all(p.endswith("/metrics.json") for p in metrics), (name, sorted(metrics))
        for pattern in metrics:
            for path in ROOT.glob(re.sub(r"\$\{[^}]*\}", "*", pattern)):  # the committed results of the stage
                timings = sorted(k for k in json.loads(path.read_text()) if is_timing(k))
                assert not timings, f"{path.relative_to(ROOT)}: timings among the metrics: {timings}"
        closure = _import_closure(f"pipeline/{name}.py") - {"src/metaseg/io.py"}  # io defines write_timings
        if any(_TIMES.search((ROOT / f).read_text(encoding="utf-8")) for f in closure):
            for pattern in metrics:
                timings_out = pattern.removesuffix("metrics.json") + "timings.json"
                declared = outs.get(timings_out) or {}
                assert declared.get("cache") is False, f"{name}: declare {timings_out} (cache: false)"


def test_layout_imports_point_one_way() -> None:
    """models/ builds networks and never imports meta/ (the inner loop and algorithms build on models, not the
    reverse); the stage scripts import their code plainly (`python -m pipeline.<stage>`), with no sys.path edits."""
    import ast

    for path in sorted((ROOT / "src/metaseg/models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("metaseg.meta"):
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: models/ imports {node.module}")
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        assert "sys.path" not in path.read_text(), f"{path.relative_to(ROOT)} edits sys.path"
