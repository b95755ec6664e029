"""Feed every stage the bad inputs users give it and write what they see: docs/bad_inputs.md.

python bench/bad_inputs.py [--onnx models/onnx/xray/fomaml/model.fp32.onnx] [--out docs/bad_inputs.md]

Each case runs the stage the way dvc.yaml runs it (``python -m pipeline.<stage>``, or ``export/infer.py``) in a
scratch folder, and the table records the exit code, how many lines the user got on stderr and the error line. The
contract (README, house style): bad input gives one line naming the file or key and what is expected, exit 2, and
no partial output; a few cases are not errors (a 16-bit image, values above 255 in labels.yaml) and must exit 0.
The cases that need a training run or DVC itself (a NaN loss, a kill and resume, a failed stage under `dvc repro`)
are listed at the end with the test that checks them. Needs an exported ONNX file for the infer.py rows (after
`make repro`); without one they are marked skipped. About a minute on two cores.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from metaseg.config import SECTIONS  # noqa: E402

Case = tuple[str, str, str, Callable[[Path], list[str]]]  # stage, bad input, expected (EXPECT key), argv builder
EXPECT = {"error": (2, 1), "ok": (0, None), "each": (2, 2)}  # exit code, stderr lines (each: one per bad file + total)


def params(ws: Path, name: str = "params.yaml", **sections: dict) -> Path:
    """The code defaults for every section, tiny synthetic data, updated by ``sections``."""
    p = {n: cls().model_dump() for n, cls in SECTIONS.items()}
    p["base"].update(image_size=64, device="cpu")
    p["prepare"].update(images_per_domain=24)
    p["splits"].update(episodes=2)
    p["model"].update(backbone="mobilenet_v3_large", backbone_weights=None, bn_stats="support")
    for section, values in sections.items():
        p[section].update(values)
    path = ws / name
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def edited(ws: Path, edit: Callable[[dict], None]) -> Path:
    p = yaml.safe_load(params(ws).read_text())
    edit(p)
    (ws / "edited.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return ws / "edited.yaml"


def stage(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"pipeline.{name}", *args]


def validate(path: Path) -> list[str]:
    return stage("validate", "--params", str(path), "--out", str(path.parent / "out" / "params.ok"))


def folder(ws: Path, *, image: Callable[[Path], None] | None = None, mask: Callable[[Path], None] | None = None,
           labels: str | None = "classes: {1: thing}\nignore: [255]\n", n: int = 3) -> Path:
    """A folder-format root with one domain of ``n`` good image/mask pairs; ``image``/``mask`` spoil pair 0."""
    dom = ws / "root" / "dom"
    (dom / "images").mkdir(parents=True, exist_ok=True)
    (dom / "masks").mkdir(exist_ok=True)
    if labels is not None:
        (dom / "labels.yaml").write_text(labels)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(dom / "images" / f"p{i}.png")
        m = np.zeros((48, 64), np.uint8)
        m[10:30, 10:40] = 1
        Image.fromarray(m).save(dom / "masks" / f"p{i}.png")
    if image:
        image(dom / "images" / "p0.png")
    if mask:
        mask(dom / "masks" / "p0.png")
    return ws / "root"


def prepare(ws: Path, root: Path | str, **prep: object) -> list[str]:
    p = params(ws, prepare={"source": "folder", "root": str(root), **prep})
    return stage("prepare", "--params", str(p), "--out", str(ws / "prepared"), "--results", str(ws / "results"))


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def save(arr: np.ndarray) -> Callable[[Path], None]:
    return lambda p: Image.fromarray(arr).save(p)  # uint16 arrays become 16-bit PNGs


def truncated(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def set_key(section: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda p: p[section].__setitem__(key, value)


def drop(section: str, key: str | None = None) -> Callable[[dict], None]:
    return lambda p: p.pop(section) if key is None else p[section].pop(key)


def synthetic_workspace(ws: Path, **sections: dict) -> Path:
    """Tiny synthetic data prepared and split in ``ws``: what train/adapt need before their own input is bad."""
    p = params(ws, **sections)
    for cmd in (stage("prepare", "--params", str(p), "--out", str(ws / "prepared"), "--results", str(ws / "rp")),
                stage("splits", "--params", str(p), "--prepared", str(ws / "prepared"), "--out", str(ws / "splits"),
                      "--results", str(ws / "rs"))):
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=ENV)
    return p


def train(ws: Path, **train_cfg: object) -> list[str]:
    synthetic_workspace(ws)
    bad = params(ws, "bad.yaml", train=train_cfg)
    return stage("train", "--params", str(bad), "--algorithm", "fomaml", "--prepared", str(ws / "prepared"),
                 "--splits", str(ws / "splits"), "--out", str(ws / "init.pt"), "--checkpoints", str(ws / "ck"),
                 "--results", str(ws / "rt"))


def adapt(ws: Path, init: Callable[[Path], None]) -> list[str]:
    p = synthetic_workspace(ws)
    init(ws / "init.pt")
    return stage("adapt", "--params", str(p), "--init", str(ws / "init.pt"), "--domain", "xray", "--prepared",
                 str(ws / "prepared"), "--splits", str(ws / "splits"), "--out", str(ws / "adapted.pt"), "--results",
                 str(ws / "ra"))


def splits(ws: Path, **split_cfg: object) -> list[str]:
    synthetic_workspace(ws)
    bad = params(ws, "bad.yaml", splits=split_cfg)
    return stage("splits", "--params", str(bad), "--prepared", str(ws / "prepared"), "--out", str(ws / "s2"),
                 "--results", str(ws / "rs2"))


def infer(onnx: Path | None, make_input: Callable[[Path], Path], *extra: str,
          out: Callable[[Path], Path] | None = None) -> Callable[[Path], list[str]]:
    def argv(ws: Path) -> list[str]:
        if onnx is None:
            raise FileNotFoundError("no exported ONNX file (run make repro, or pass --onnx)")
        target = out(ws) if out else ws / "masks"
        return [sys.executable, str(ROOT / "export" / "infer.py"), str(onnx), str(make_input(ws)), "--out",
                str(target), *extra]
    return argv


def picture_file(name: str, make: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(ws: Path) -> Path:
        path = ws / name
        make(path)
        return path
    return build


def mixed_folder(ws: Path) -> Path:
    d = ws / "photos"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "a.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / name)
    (d / "b.jpg").write_bytes(b"not a jpeg")
    return d


STRAY = np.pad(np.full((8, 8), 7, np.uint8), ((0, 40), (0, 56)), constant_values=1)  # class 1 and a stray 7
RGB = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)


def cases(onnx: Path | None) -> list[Case]:
    bomb = picture_file("bomb.png", lambda p: Image.new("1", (14000, 13000)).save(p))
    return [
        ("validate", "a typo under train: (`iteratons`)", "error",
         lambda ws: validate(edited(ws, lambda p: p["train"].__setitem__("iteratons", p["train"].pop("iterations"))))),
        ("validate", "a wrong type (`train.iterations: many`)", "error",
         lambda ws: validate(edited(ws, set_key("train", "iterations", "many")))),
        ("validate", "out of range (`train.inner_lr: -0.1`)", "error",
         lambda ws: validate(edited(ws, set_key("train", "inner_lr", -0.1)))),
        ("validate", "an unknown algorithm in `train.algorithms`", "error",
         lambda ws: validate(edited(ws, set_key("train", "algorithms", ["maml", "dreamer"])))),
        ("validate", "a missing section (`adapt:` deleted)", "error", lambda ws: validate(edited(ws, drop("adapt")))),
        ("validate", "a missing key (`train.shots` deleted)", "error",
         lambda ws: validate(edited(ws, drop("train", "shots")))),
        ("validate", "an empty params.yaml", "error",
         lambda ws: validate(write(ws / "e.yaml", b"") or ws / "e.yaml")),
        ("validate", "a YAML syntax error", "error",
         lambda ws: validate(write(ws / "s.yaml", b"base:\n  seed: [0\n") or ws / "s.yaml")),
        ("validate", "a domain both meta-val and meta-test", "error",
         lambda ws: validate(edited(ws, lambda p: p["splits"].update(meta_val=["xray"], meta_test=["xray"])))),
        ("validate", "an unknown prepare.source (`coco`)", "error",
         lambda ws: validate(edited(ws, set_key("prepare", "source", "coco")))),
        ("validate", "`prepare.min_image_side: 0`", "error",
         lambda ws: validate(edited(ws, set_key("prepare", "min_image_side", 0)))),
        ("validate", "`base.image_size` not a multiple of 8", "error",
         lambda ws: validate(edited(ws, set_key("base", "image_size", 100)))),
        ("prepare", "`prepare.root` does not exist", "error", lambda ws: prepare(ws, ws / "nowhere")),
        ("prepare", "folder source with `prepare.root: null`", "error",
         lambda ws: stage("prepare", "--params", str(params(ws, prepare={"source": "folder"})), "--out",
                          str(ws / "prepared"), "--results", str(ws / "results"))),
        ("prepare", "a domain without labels.yaml", "error", lambda ws: prepare(ws, folder(ws, labels=None))),
        ("prepare", "labels.yaml with a YAML syntax error", "error",
         lambda ws: prepare(ws, folder(ws, labels="classes: {1: thing\n"))),
        ("prepare", "labels.yaml without `classes`", "error",
         lambda ws: prepare(ws, folder(ws, labels="ignore: []\n"))),
        ("prepare", "labels.yaml class value 300 (16-bit masks)", "ok",
         lambda ws: prepare(ws, _relabel(folder(ws, labels="classes: {300: thing}\nignore: [65535]\n"), 300))),
        ("prepare", "an image that is not an image", "error",
         lambda ws: prepare(ws, folder(ws, image=lambda p: p.write_bytes(b"not a png")))),
        ("prepare", "a truncated image", "error", lambda ws: prepare(ws, folder(ws, image=truncated))),
        ("prepare", "a truncated image, `on_error: skip`", "ok",
         lambda ws: prepare(ws, folder(ws, image=truncated), on_error="skip")),
        ("prepare", "an image without a mask", "error",
         lambda ws: prepare(ws, folder(ws, mask=lambda p: p.unlink()))),
        ("prepare", "a mask of another size than its image", "error",
         lambda ws: prepare(ws, folder(ws, mask=save(np.ones((20, 20), np.uint8))))),
        ("prepare", "a mask value (7) labels.yaml does not declare, `background: [0]` given", "error",
         lambda ws: prepare(ws, folder(ws, labels="classes: {1: thing}\nignore: [255]\nbackground: [0]\n",
                                       mask=save(STRAY)))),
        ("prepare", "the same without `background:` (README: every other value is background)", "ok",
         lambda ws: prepare(ws, folder(ws, mask=save(STRAY)))),
        ("prepare", "a mask with no pixel of any class", "error",
         lambda ws: prepare(ws, folder(ws, mask=save(np.zeros((48, 64), np.uint8))))),
        ("prepare", "a 1x1 image (below `min_image_side`)", "error",
         lambda ws: prepare(ws, folder(ws, image=save(RGB[:1, :1]), mask=save(np.ones((1, 1), np.uint8))))),
        ("prepare", "a 16-bit grayscale image", "ok",
         lambda ws: prepare(ws, folder(ws, image=save(RGB[:48, :, 0].astype(np.uint16) * 257)))),
        ("prepare", "a domain whose every image is bad, `on_error: skip`", "error",
         lambda ws: prepare(ws, folder(ws, image=truncated, n=1), on_error="skip")),
        ("prepare", "`prepare.domains` names a domain the root lacks", "error",
         lambda ws: prepare(ws, folder(ws), domains=["nope"])),
        ("prepare", "VOC source, root without VOC layout", "error",
         lambda ws: stage("prepare", "--params", str(params(ws, prepare={"source": "voc", "root": str(ws)})),
                          "--out", str(ws / "prepared"), "--results", str(ws / "results"))),
        ("prepare", "FSS-1000 source, empty root", "error",
         lambda ws: stage("prepare", "--params", str(params(ws, prepare={"source": "fss1000", "root": str(ws)})),
                          "--out", str(ws / "prepared"), "--results", str(ws / "results"))),
        ("splits", "`splits.meta_test` names an unknown domain", "error",
         lambda ws: splits(ws, meta_test=["mars"])),
        ("splits", "more supports than a held-out domain holds (`splits.shots: [1, 500]`)", "error",
         lambda ws: splits(ws, shots=[1, 500])),
        ("train", "`train.shots` larger than any meta-train domain allows", "error",
         lambda ws: train(ws, shots=500)),
        ("train", "`train.ways: 9` (meta-train domains are 1-class)", "error", lambda ws: train(ws, ways=9)),
        ("validate", "`train.nproc: 4` with `train.meta_batch: 2` (a process without a task)", "error",
         lambda ws: validate(edited(ws, lambda p: p["train"].update(nproc=4, meta_batch=2)))),
        ("train", "`train.nnodes: 2` run without torchrun", "error", lambda ws: train(ws, nnodes=2)),
        ("adapt", "the init file is missing", "error", lambda ws: adapt(ws, lambda p: None)),
        ("adapt", "the init file is not a checkpoint", "error", lambda ws: adapt(ws, lambda p: p.write_bytes(b"x"))),
        ("train", "a corrupt `last.pt` in the checkpoint folder", "error",
         lambda ws: _corrupt_checkpoint(ws) or train(ws)),
        ("infer.py", "the model file is missing", "error",
         lambda ws: [sys.executable, str(ROOT / "export" / "infer.py"), str(ws / "none.onnx"), str(ws), "--out",
                     str(ws / "m")]),
        ("infer.py", "the input does not exist", "error", infer(onnx, lambda ws: ws / "nothing.png")),
        ("infer.py", "an input that is not an image", "error",
         infer(onnx, picture_file("x.png", lambda p: p.write_bytes(b"not a png")))),
        ("infer.py", "a 182-megapixel PNG (decompression bomb)", "error", infer(onnx, bomb)),
        ("infer.py", "`--out` names an existing file", "error",
         infer(onnx, picture_file("ok.png", save(RGB)), out=lambda ws: write(ws / "f", b"") or ws / "f")),
        ("infer.py", "a folder with one bad image among good ones, and a.jpg beside a.png", "each",
         infer(onnx, mixed_folder)),
        ("infer.py", "a 16-bit PNG", "ok",
         infer(onnx, picture_file("d.png", save(RGB[:, :, 0].astype(np.uint16) * 257)))),
        ("infer.py", "a palette PNG", "ok",
         infer(onnx, picture_file("p.png", lambda p: Image.fromarray(RGB).convert("P").save(p)))),
    ]


def _relabel(root: Path, value: int) -> Path:
    """Rewrite the masks of a ``folder`` root as 16-bit with class ``value`` (labels.yaml allows 0..65535)."""
    for m in (root / "dom" / "masks").glob("*.png"):
        a = np.asarray(Image.open(m)).astype(np.uint16) * value
        Image.fromarray(a).save(m)
    return root


def _corrupt_checkpoint(ws: Path) -> None:
    """A `last.pt` that is not a checkpoint where the train stage looks for one (``train`` uses ``ws / "ck"``)."""
    (ws / "ck").mkdir()
    (ws / "ck" / "last.pt").write_bytes(b"x")


ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "NO_ALBUMENTATIONS_UPDATE": "1"}

LATER = [  # need a training run or DVC; the tests named here run them and assert the message
    ("train", "the loss becomes NaN", "error: fomaml: non-finite meta-loss (nan) at iteration 3; stopped without "
     "writing; last good checkpoint: <ck>/last.pt (iteration 2)", "tests/test_train.py::test_nan_loss_stops_with_one"
     "_line_and_writes_nothing"),
    ("train", "killed twice, resumed under `dvc repro` (plots deleted)", "resumes; weights and curves equal the "
     "uninterrupted run's", "tests/test_train.py::test_curves_survive_two_kills_and_dvc_deleting_the_plots"),
    ("train", "a checkpoint written with other params", "warning: ... was written with another config; starting a "
     "fresh run", "tests/test_train.py::test_a_checkpoint_of_other_params_is_not_resumed"),
    ("prepare / splits", "fails under `dvc repro` / `dvc exp run`", "the stage's one-line error; previous "
     "data/prepared, data/splits and results kept", "tests/test_dvc_failures.py"),
    ("check", "a perturbed int8 ONNX file", "the check fails and names the file", "tests/test_check.py"),
    ("model", "Lite weights file corrupted (sha256 mismatch)", "one line naming the file and the expected sha256",
     "tests/test_backbones.py"),
]


LOG = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")


def run_case(case: Case, ws: Path) -> tuple[str, int | None, int, str]:
    stage_name, _, _, build = case
    try:
        argv = build(ws)
    except FileNotFoundError as err:
        return "skipped", None, 0, str(err)
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not LOG.match(ln)]  # log lines are not errors
    errors = [ln for ln in lines if ln.startswith("error")]
    shown = errors[-1] if errors else (lines[-1] if lines else "")
    if r.returncode == 0:  # what the user reads last: the script's summary or the stage's last log line
        said = [ln for ln in r.stdout.splitlines() + r.stderr.splitlines()[::-1][:1] if ln.strip()]
        shown = LOG.sub("", said[-1] if r.stdout.strip() else said[0]) if said else ""
    return "ran", r.returncode, len(lines), shown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, default=ROOT / "models/onnx/xray/fomaml/model.fp32.onnx")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/bad_inputs.md")
    args = ap.parse_args()
    onnx = args.onnx if args.onnx.is_file() else None
    rows, broken = [], 0
    for i, case in enumerate(cases(onnx), start=1):
        ws = Path(tempfile.mkdtemp(prefix="badin"))
        try:
            state, rc, n_lines, shown = run_case(case, ws)
        finally:
            shutil.rmtree(ws, ignore_errors=True)
        want_rc, want_lines = EXPECT[case[2]]
        holds = state == "ran" and rc == want_rc and want_lines in (None, n_lines)
        broken += state == "ran" and not holds
        verdict = "skipped" if state != "ran" else ("yes" if holds else "**NO**")
        shown = shown.replace(str(ws), "<tmp>").replace("|", "\\|")
        rows.append(f"| {i} | {case[0]} | {case[1]} | {rc if rc is not None else '-'} | {n_lines} | {verdict} | "
                    f"`{shown}` |")
        print(rows[-1], flush=True)
    later = [f"| {stage_name} | {what} | {seen} | `{test}` |" for stage_name, what, seen, test in LATER]
    text = "\n".join([
        "# Bad input: what a user sees",
        "",
        "Written by `python bench/bad_inputs.py` (each case run as dvc.yaml runs the stage, in a scratch folder).",
        "The contract: exit 2, one line on stderr naming the file or key and what is expected, no partial output;",
        "\"ok\" cases are inputs that must work (exit 0); infer.py on a folder writes every good image and lists each",
        "bad one on its own line before the total. `<tmp>` is the case's scratch folder. Holds = exit code and line",
        "count as promised. The infer.py rows need an exported model (`make repro`, or `--onnx FILE`).",
        "",
        "| # | stage | bad input | exit | stderr lines | holds | what the user sees (last error line) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Checked by tests (need a training run or DVC)",
        "",
        "| stage | bad input or fault | what the user sees | test |",
        "|---|---|---|---|",
        *later,
        "",
    ])
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"wrote {args.out}: {len(rows)} cases, {broken} not as promised")


if __name__ == "__main__":
    main()
