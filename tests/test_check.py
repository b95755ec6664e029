"""export.runtime_check: all precisions pass on the toy task; a perturbed ONNX weight fails the stage."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import classifier_node
from export.runtime_check import CheckFailed, OrtRunner, enforce, format_table, pool_miou, run_checks
from metaseg.scoring import iou_of_labels
from tests.onnx_helpers import ALGORITHM, BACKBONE, CLASS_NAMES, DOMAIN, LITE, adapted_root, bundle, check_config
from tests.params_helpers import write_params
from tests.timing_helpers import assert_apart, read_apart

REPO = Path(__file__).resolve().parents[1]


def _check(onnx_root: Path, backbone: str = BACKBONE, **changes: object) -> list[dict[str, object]]:
    b = bundle(backbone)
    return run_checks(onnx_root, adapted_root(b), b.prepared, b.splits, **check_config(**changes).model_dump())


def test_check_miou_is_the_evaluation_miou() -> None:
    """The check's mIoU is the number adapt and evaluate report: foreground classes only, 255 ignored, summed over
    the pool's batches (background agreement does not count)."""
    target = torch.tensor([[[0, 0, 0, 0, 1, 255]], [[0, 0, 0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 0, 0, 0, 1, 1]], [[0, 0, 0, 0, 0, 2]]])
    assert pool_miou([pred[:1], pred[1:]], target, 3) == pytest.approx(100 / 6)  # mean of class 1: 1/3, class 2: 0/1
    assert pool_miou([pred], target, 3) == pytest.approx(100 * iou_of_labels(pred, target, 2)[0])
    assert math.isnan(pool_miou([torch.zeros_like(pred)], torch.zeros_like(target), 2))  # nothing to score


@pytest.mark.parametrize("backbone", [BACKBONE, LITE])
def test_every_precision_passes_on_cpu(backbone: str) -> None:
    """fp32 / fp16 / int8 pass for the mobilenet_v3_large and the EfficientNet-Lite0 adapted model (the check
    normalises the test pool with the mean/std the adapted file carries)."""
    rows = _check(bundle(backbone).onnx_root, backbone)
    print("\n" + format_table(rows))
    by = {r["precision"]: r for r in rows}
    assert set(by) == {"fp32", "fp16", "int8"}
    assert by["fp32"]["torch_miou"] > 40  # not degenerate (background everywhere scores ~12), so a drop shows
    for r in rows:
        assert r["provider"] == "CPUExecutionProvider"
        assert r["latency_p50_ms"] > 0 and r["throughput_ips"] > 0 and r["ort_over_torch"] > 0
        assert r["passed"], f"{r['precision']}: {r}"
    floors = check_config().min_agreement
    assert by["fp32"]["max_diff"] <= 1e-4 and by["fp32"]["agreement"] >= floors["fp32"]
    for precision, r in by.items():  # the per-precision floors, on the pixels PyTorch decides
        assert r["decided"] > 0.1 and r["decided_agreement"] >= floors[precision]  # thousands of pixels
    for precision in ("fp16", "int8"):
        assert by[precision]["miou"] >= by[precision]["torch_miou"] - 1.0
    enforce(rows)  # no exception


def _perturb(src: Path, dst: Path, *, whole: bool = False) -> None:
    """Copy the file with one weight of the final classifier conv (kept in float in every precision) negated, or
    with the whole classifier negated (``whole``: the argmax flips almost everywhere)."""
    model = onnx.load(src)
    conv = next(n for n in model.graph.node if n.name == classifier_node(model))
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = onnx.numpy_helper.to_array(init).copy()
    if whole:
        w *= -1.0
    else:
        w.flat[int(np.abs(w).argmax())] *= -1.0
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    dst.parent.mkdir(parents=True)
    onnx.save(model, dst)


def test_perturbed_model_fails_the_stage(tmp_path: Path) -> None:
    b = bundle()
    onnx_root = tmp_path / "onnx"
    _perturb(b.onnx_dir / "model.fp32.onnx", onnx_root / DOMAIN / ALGORITHM / "model.fp32.onnx")
    shutil.copy(b.onnx_dir / "model.fp16.onnx", onnx_root / DOMAIN / ALGORITHM / "model.fp16.onnx")
    write_params(tmp_path / "params.yaml", check=check_config().model_dump())
    shutil.copy(b.splits, tmp_path / "splits.json")
    cmd = [sys.executable, "-m", "pipeline.check", "--params", str(tmp_path / "params.yaml"),
           "--onnx", str(onnx_root), "--adapted", str(adapted_root(b)), "--prepared", str(b.prepared),
           "--splits", str(tmp_path), "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "failed the runtime check: toy/transfer/fp32" in proc.stderr.strip().splitlines()[-1]
    assert "max_diff" in proc.stdout  # the table comes first
    metrics, timings = read_apart(tmp_path / "results")  # written by a failing check too, latency apart
    assert metrics["passed"] == 0 and metrics["toy/transfer/fp32/passed"] == 0
    assert timings["toy/transfer/fp32/latency_p50_ms"] > 0 and timings["toy/transfer/fp16/ort_over_torch"] > 0
    assert metrics["toy/transfer/fp16/passed"] == 1
    verified = json.loads((tmp_path / "results" / "verified.json").read_text())["verified"]
    assert [v["precision"] for v in verified] == ["fp16"]


def test_perturbed_int8_model_fails_on_its_agreement_floor(tmp_path: Path) -> None:
    """int8 is held to its own agreement floor (check.min_agreement.int8), not only to the mIoU drop; the table
    says which gate broke."""
    b = bundle()
    onnx_root = tmp_path / "onnx"
    _perturb(b.onnx_dir / "model.int8.onnx", onnx_root / DOMAIN / ALGORITHM / "model.int8.onnx", whole=True)
    rows = run_checks(onnx_root, adapted_root(b), b.prepared, b.splits, **check_config().model_dump())
    (row,) = rows
    floor = check_config().min_agreement["int8"]
    assert not row["passed"] and row["decided_agreement"] < row["agreement_floor"] == floor
    assert f"agreement {row['decided_agreement']:.4f} < {floor} on decided pixels" in row["why"]
    table = format_table(rows)
    assert "agreement_floor" in table.splitlines()[0] and row["why"] in table
    with pytest.raises(CheckFailed, match=rf"toy/transfer/int8 \(agreement 0\.\d+ < {floor} on decided pixels"):
        enforce(rows)


class _Fixed:
    """A runner that returns given logits (stands in for an ONNX session in check_one)."""

    provider, num_classes = "CPUExecutionProvider", 2

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def test_agreement_floor_counts_the_pixels_pytorch_decides() -> None:
    """A flip where PyTorch's two logits are within check.decided_margin says nothing about the file (any rounding
    flips it); a flip where PyTorch is sure breaks the floor. The all-pixel agreement and the decided share are
    reported beside; decided_margin 0 counts every pixel."""
    from export.runtime_check import Reference, check_one

    ref = torch.zeros(1, 2, 10, 10)
    ref[:, 1] = 2.0  # class 1 by a margin of 2 ...
    ref[:, 1, :5] = 0.1  # ... except the top half, undecided (margin 0.1)
    x, y = torch.zeros(1, 3, 10, 10), torch.ones(1, 10, 10, dtype=torch.long)
    reference = Reference([ref], 100.0, {"latency_p50_ms": 1.0, "throughput_ips": 1.0})
    kw = dict(precision="int8", atol_cpu=1e-4, atol_cuda=1e-3, min_agreement={"int8": 0.99}, miou_drop=100.0,
              runs=1, warmup=0)
    undecided_flip = ref.clone()
    undecided_flip[:, 1, :5] = -0.1  # every undecided pixel flips to class 0
    row = check_one(_Fixed(undecided_flip), reference, x, y, decided_margin=0.5, **kw)
    assert row["agreement"] == 0.5 and row["decided"] == 0.5 and row["decided_agreement"] == 1.0 and row["passed"]
    row = check_one(_Fixed(undecided_flip), reference, x, y, decided_margin=0.0, **kw)
    assert row["decided"] == 1.0 and row["decided_agreement"] == 0.5 and not row["passed"]
    decided_flip = ref.clone()
    decided_flip[0, 1, 9, 9] = -1.0  # one sure pixel of 50 flips: 0.98 < 0.99
    row = check_one(_Fixed(decided_flip), reference, x, y, decided_margin=0.5, **kw)
    assert row["decided_agreement"] == pytest.approx(0.98) and not row["passed"]
    assert "agreement 0.9800 < 0.99 on decided pixels" in row["why"]
    row = check_one(_Fixed(ref), Reference([torch.zeros(1, 2, 10, 10)], 100.0, reference.speed), x, y,
                    decided_margin=0.5, **kw)  # PyTorch decides nothing: the gate cannot pass
    assert row["decided"] == 0.0 and not row["passed"] and "no pixel with a PyTorch logit margin" in row["why"]


def test_latency_and_throughput_go_to_timings_not_metrics() -> None:
    """metrics.json holds what the check decided on (`dvc metrics diff` in a review); timings.json the clock."""
    from export.runtime_check import Reference, check_one, flat_metrics, flat_timings

    ref = torch.zeros(1, 2, 10, 10)
    ref[:, 1] = 2.0
    x, y = torch.zeros(1, 3, 10, 10), torch.ones(1, 10, 10, dtype=torch.long)
    row = check_one(_Fixed(ref), Reference([ref], 100.0, {"latency_p50_ms": 2.0, "throughput_ips": 1.0}), x, y,
                    precision="fp16", atol_cpu=1e-4, atol_cuda=1e-3, min_agreement={"fp16": 0.999},
                    decided_margin=0.5, miou_drop=1.0, runs=2, warmup=0)
    rows = [{"domain": "d", "algorithm": "a", "precision": "fp16", **row}]
    metrics, timings = flat_metrics(rows), flat_timings(rows)
    assert_apart(metrics, timings)
    assert set(timings) == {f"d/a/fp16/{k}" for k in ("latency_p50_ms", "latency_p95_ms", "throughput_ips",
                                                      "torch_latency_p50_ms", "torch_throughput_ips",
                                                      "ort_over_torch")}
    assert metrics["d/a/fp16/passed"] == 1 and metrics["d/a/fp16/miou"] == 100.0


def test_provider_choice_consults_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU torch can see is not enough: without the CUDA EP in ONNX Runtime's list the check runs on the CPU."""
    import export.runtime_check as rc

    monkeypatch.setattr(rc.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rc.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert rc.choose_providers() == ("cpu", ["CPUExecutionProvider"])


def test_runner_device_follows_the_provider_that_runs() -> None:
    """The runner binds inputs on the device of the provider that really runs (a session whose CUDA EP failed to
    load runs on the CPU EP and must get CPU tensors); the CUDA side is in the gpu-marked test."""
    b = bundle()
    runner = OrtRunner(b.onnx_dir / "model.fp32.onnx", ["CPUExecutionProvider"], len(CLASS_NAMES))
    assert runner.device == "cpu" and runner.provider == "CPUExecutionProvider"
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(runner(x), runner(x.clone()))


def test_enforce_raises_one_line() -> None:
    rows = [{"domain": "d", "algorithm": "a", "precision": "int8", "passed": False, "why": "agreement 0.5 < 0.93"}]
    with pytest.raises(CheckFailed, match=r"^1 of 1 ONNX model\(s\) failed the runtime check: d/a/int8 "):
        enforce(rows)


@pytest.mark.gpu
def test_cuda_io_binding_path() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is false)")
    rows = _check(bundle().onnx_root)
    print("\n" + format_table(rows))
    for r in rows:
        assert r["provider"] == "CUDAExecutionProvider"
        assert r["passed"], f"{r['precision']}: {r}"
