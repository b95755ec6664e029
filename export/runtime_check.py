"""Runtime check: every exported ONNX file against its PyTorch adapted model, on the domain's test pool.

One code path for both devices: inputs, ONNX Runtime outputs (IO binding into torch tensors), the PyTorch reference,
max |Δlogit|, argmax agreement and the mIoU confusion matrices all live on one torch device (CUDA when torch sees a
GPU, else CPU); nothing is copied to the host per batch. On CUDA, ORT runs on torch's current stream
(``user_compute_stream``) and TF32 is off on both sides, so fp32 is compared with fp32.

Pass rules: argmax agreement >= min_agreement[precision] on the pixels PyTorch decides (top-two logit margin >=
decided_margin); fp32 max |Δlogit| <= atol (atol_cpu / atol_cuda, chosen by the provider that actually ran); fp16 /
int8 mIoU >= PyTorch fp32 mIoU - miou_drop (points). Latency p50/p95 at batch 1 and throughput at batch 8 are
measured for ORT and PyTorch eager in the same run, warm-up excluded.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from metaseg.cli import InputError
from metaseg.config import PRECISIONS
from metaseg.data.prepared import Domain, PreparedDataset
from metaseg.scoring import iou_of_labels
from metaseg.io import read_json
from metaseg.models.adapted import load_adapted

log = logging.getLogger(__name__)

BATCH = 8  # check batch and throughput batch


class CheckFailed(RuntimeError):
    """At least one model breached a tolerance (one-line message naming them)."""


def choose_providers(tensorrt: bool = False) -> tuple[str, list[Any]]:
    """(torch device, ORT providers): CUDA EP (+ TensorRT EP first if asked) with CPU fallback, or CPU EP alone.

    CUDA needs both a GPU torch can see and an ONNX Runtime build whose provider list has the CUDA EP (the list
    names it on a GPU build even without a GPU, hence both checks); TensorRT is added only when listed too. The
    provider a session really ran on is recorded per row (``OrtRunner.provider``) and picks the fp32 atol."""
    available = set(ort.get_available_providers())
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in available:
        if torch.cuda.is_available():
            log.warning("torch sees a GPU but this ONNX Runtime has no CUDA provider (%s): checking on the CPU",
                        ", ".join(sorted(available)))
        return "cpu", ["CPUExecutionProvider"]
    cuda_opts = {"device_id": torch.cuda.current_device(), "use_tf32": 0,
                 "user_compute_stream": str(torch.cuda.current_stream().cuda_stream)}
    providers: list[Any] = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
    if tensorrt and "TensorrtExecutionProvider" not in available:
        log.warning("check.tensorrt is true but this ONNX Runtime has no TensorRT provider: CUDA only")
    elif tensorrt:
        providers.insert(0, ("TensorrtExecutionProvider", {"device_id": torch.cuda.current_device()}))
    return "cuda", providers


@contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for the PyTorch reference (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class OrtRunner:
    """ORT session called with torch tensors through IO binding; output bound to a torch tensor on the same device."""

    def __init__(self, path: str | Path, providers: list[Any], num_classes: int):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # idle ORT threads must not spin while PyTorch is timed in the same process (same ORT latency when idle)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.num_classes = num_classes

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def device(self) -> str:
        """Where the session reads and writes: a session whose CUDA EP failed to load runs on the CPU."""
        return "cpu" if self.provider == "CPUExecutionProvider" else "cuda"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.device:  # never bind CUDA pointers to a CPU session (or the reverse)
            return self(x.to(self.device)).to(x.device)
        x = x.contiguous()
        out = torch.empty((x.shape[0], self.num_classes, x.shape[2], x.shape[3]), dtype=torch.float32, device=x.device)
        kind, index = x.device.type, (x.device.index or 0)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, kind, index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, kind, index, np.float32, tuple(out.shape), out.data_ptr())
        if x.is_cuda:  # inputs complete before ORT reads them, whichever stream ORT ends up on
            torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)  # returns after ORT's own stream sync: ``out`` is complete
        return out


def pool_miou(preds: list[torch.Tensor], y: torch.Tensor, num_classes: int) -> float:
    """mIoU in points of a test pool's predictions (batches in order), as every stage scores it:
    ``metaseg.scoring.iou_of_labels`` over the foreground classes (``num_classes`` counts background)."""
    return 100 * iou_of_labels(torch.cat(preds), y[: sum(len(p) for p in preds)], num_classes - 1)[0]


def load_test_pool(domain: Domain, indices: list[int], size: int, mean: list[float], std: list[float],
                   device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 images [N,3,S,S] (bilinear, antialiased) and masks [N,S,S] (nearest) on ``device``."""
    if not indices:
        raise InputError(f"domain '{domain.name}': empty test pool in splits.json")
    images = torch.from_numpy(np.ascontiguousarray(domain.images[indices])).to(device).permute(0, 3, 1, 2).float() / 255
    masks = torch.from_numpy(np.ascontiguousarray(domain.masks[indices])).to(device)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        masks = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0].to(torch.uint8)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((images - m) / s).contiguous(), masks


def _timed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, runs: int, warmup: int) -> list[float]:
    """Per-call wall time in ms (device synchronised), warm-up calls excluded."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + runs):
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def speed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, runs: int, warmup: int) -> dict[str, float]:
    """p50 / p95 latency (ms) at batch 1 and throughput (images/s) at batch 8."""
    one = _timed(fn, x[:1], runs, warmup)
    batch = x[:1].expand(BATCH, -1, -1, -1).contiguous() if len(x) < BATCH else x[:BATCH]
    many = _timed(fn, batch, max(3, runs // 3), max(1, warmup // 2))
    return {"latency_p50_ms": float(np.percentile(one, 50)), "latency_p95_ms": float(np.percentile(one, 95)),
            "throughput_ips": BATCH * 1e3 / float(np.median(many))}


@dataclass
class Reference:
    """PyTorch fp32 outputs on the test pool, computed once per adapted model and shared by its precisions."""

    logits: list[torch.Tensor]
    miou: float
    speed: dict[str, float]


def torch_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, runs: int,
                    warmup: int) -> Reference:
    def fwd(t: torch.Tensor) -> torch.Tensor:
        return model(t)["out"]

    with torch.inference_mode(), strict_fp32():
        logits = [fwd(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
        return Reference(logits, pool_miou([lg.argmax(1) for lg in logits], y, num_classes),
                         speed(fwd, x, runs=runs, warmup=warmup))


def check_one(runner: OrtRunner, ref: Reference, x: torch.Tensor, y: torch.Tensor, *, precision: str, atol_cpu: float,
              atol_cuda: float, min_agreement: dict[str, float], decided_margin: float, miou_drop: float, runs: int,
              warmup: int) -> dict[str, Any]:
    """Compare one ONNX file with the reference; returns the result row: ``passed``, and ``why`` naming each
    breached gate. Every precision must reach its argmax agreement floor (``min_agreement[precision]``) on the
    pixels PyTorch decides: its top-two logits at least ``decided_margin`` apart (0 = every pixel). A pixel
    PyTorch leaves undecided flips under any rounding (fp16 included), so it says nothing about the file; the
    share of decided pixels and the agreement over all pixels are reported beside. fp32 must also match the logits
    within the atol of the provider that ran; fp16 / int8 must keep the mIoU within ``miou_drop`` points of
    PyTorch's."""
    c = runner.num_classes
    max_diff = torch.zeros((), device=x.device)
    agree = torch.zeros((), dtype=torch.int64, device=x.device)
    decided = torch.zeros((), dtype=torch.int64, device=x.device)
    agree_decided = torch.zeros((), dtype=torch.int64, device=x.device)
    preds = []
    with torch.inference_mode():
        for i, want in enumerate(ref.logits):
            got = runner(x[i * BATCH:(i + 1) * BATCH])
            max_diff = torch.maximum(max_diff, (got - want).abs().max())
            pred = got.argmax(1)
            same = pred == want.argmax(1)
            top2 = want.topk(2, dim=1).values
            sure = top2[:, 0] - top2[:, 1] >= decided_margin
            agree += same.sum()
            decided += sure.sum()
            agree_decided += (same & sure).sum()
            preds.append(pred)
        timing = speed(runner, x, runs=runs, warmup=warmup)
    pixels = len(x) * x.shape[2] * x.shape[3]
    row: dict[str, Any] = {"provider": runner.provider, "max_diff": float(max_diff),
                           "agreement": float(agree) / pixels, "decided": float(decided) / pixels,
                           "decided_agreement": float(agree_decided) / float(decided) if decided else float("nan"),
                           "miou": pool_miou(preds, y, c), "torch_miou": ref.miou, **timing,
                           "torch_latency_p50_ms": ref.speed["latency_p50_ms"],
                           "torch_throughput_ips": ref.speed["throughput_ips"]}
    row["ort_over_torch"] = row["latency_p50_ms"] / ref.speed["latency_p50_ms"]
    if precision not in min_agreement:
        raise InputError(f"check.min_agreement has no floor for precision '{precision}'")
    row["agreement_floor"] = floor = min_agreement[precision]
    why = []
    if not decided:
        why.append(f"no pixel with a PyTorch logit margin >= {decided_margin:g} (check.decided_margin)")
    elif not row["decided_agreement"] >= floor:
        why.append(f"agreement {row['decided_agreement']:.4f} < {floor} on decided pixels")
    if precision == "fp32":
        atol = atol_cpu if row["provider"] == "CPUExecutionProvider" else atol_cuda
        if not row["max_diff"] <= atol:
            why.append(f"max|dlogit| {row['max_diff']:.2e} > {atol:g}")
    elif not row["miou"] >= row["torch_miou"] - miou_drop:  # NaN (no labelled pixel) fails
        why.append(f"mIoU {row['miou']:.2f} < {row['torch_miou']:.2f} - {miou_drop:g}")
    row["passed"], row["why"] = not why, "; ".join(why) or "-"
    return row


def find_models(onnx_root: str | Path) -> dict[tuple[str, str], dict[str, Path]]:
    """{(domain, algorithm): {precision: path}} for every ``<root>/<domain>/<algorithm>/model.<precision>.onnx``."""
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for path in sorted(Path(onnx_root).glob("*/*/model.*.onnx")):
        precision = path.name.removeprefix("model.").removesuffix(".onnx")
        found.setdefault((path.parent.parent.name, path.parent.name), {})[precision] = path
    if not found:
        raise InputError(f"{onnx_root}: no <domain>/<algorithm>/model.*.onnx files (run the export stage first)")
    return found


def test_indices(splits: dict[str, Any], domain: str, splits_path: str | Path) -> list[int]:
    try:
        return [int(i) for i in splits["pools"][domain]["test"]]
    except KeyError:
        raise InputError(f"{splits_path}: no pools.{domain}.test (is '{domain}' a meta-test domain?)") from None




def _order(precision: str) -> int:
    return PRECISIONS.index(precision) if precision in PRECISIONS else len(PRECISIONS)


def run_checks(onnx_root: str | Path, adapted_root: str | Path, prepared_root: str | Path, splits_path: str | Path, *,
               atol_cpu: float, atol_cuda: float, min_agreement: dict[str, float], decided_margin: float,
               miou_drop: float, tensorrt: bool,
               check_size: int, latency_runs: int, warmup_runs: int) -> list[dict[str, Any]]:
    """Check every exported file found under ``onnx_root``; one result row per file."""
    device, providers = choose_providers(tensorrt)
    models = find_models(onnx_root)
    splits = read_json(splits_path)
    prepared = PreparedDataset(prepared_root)
    rows: list[dict[str, Any]] = []
    for (domain, algorithm), files in tqdm(models.items(), desc="check", disable=None):
        adapted = Path(adapted_root) / domain / f"{algorithm}.pt"
        if not adapted.is_file():
            raise InputError(f"{adapted}: adapted model missing for {files[next(iter(files))]}")
        model, meta = load_adapted(adapted)
        model.to(device)
        num_classes = len(meta["class_names"])
        x, y = load_test_pool(prepared.domain(domain), test_indices(splits, domain, splits_path), check_size,
                              list(meta["mean"]), list(meta["std"]), device)
        ref = torch_reference(model, x, y, num_classes=num_classes, runs=latency_runs, warmup=warmup_runs)
        for precision, path in sorted(files.items(), key=lambda kv: _order(kv[0])):
            runner = OrtRunner(path, providers, num_classes)
            row = check_one(runner, ref, x, y, precision=precision, atol_cpu=atol_cpu, atol_cuda=atol_cuda,
                            min_agreement=min_agreement, decided_margin=decided_margin, miou_drop=miou_drop,
                            runs=latency_runs, warmup=warmup_runs)
            rows.append({"domain": domain, "algorithm": algorithm, "precision": precision, "file": str(path),
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), **row})
            log.info("%s/%s %s: %s", domain, algorithm, precision, "passed" if row["passed"] else "FAILED")
    return rows


_COLUMNS = [("domain", "{}"), ("algorithm", "{}"), ("precision", "{}"), ("provider", "{}"), ("max_diff", "{:.2e}"),
            ("agreement", "{:.5f}"), ("decided", "{:.3f}"), ("decided_agreement", "{:.5f}"),
            ("agreement_floor", "{}"), ("miou", "{:.2f}"), ("torch_miou", "{:.2f}"),
            ("latency_p50_ms", "{:.2f}"), ("latency_p95_ms", "{:.2f}"), ("throughput_ips", "{:.1f}"),
            ("ort_over_torch", "{:.2f}"), ("passed", "{}"), ("why", "{}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for stdout."""
    cells = [[name for name, _ in _COLUMNS]]
    cells += [[fmt.format(r[name].removesuffix("ExecutionProvider") if name == "provider" else r[name])
               for name, fmt in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


_METRICS = ("max_diff", "agreement", "decided", "decided_agreement", "agreement_floor", "miou", "torch_miou")
_TIMINGS = ("latency_p50_ms", "latency_p95_ms", "throughput_ips", "torch_latency_p50_ms", "torch_throughput_ips",
            "ort_over_torch")


def _key(r: dict[str, Any]) -> str:
    return f"{r['domain']}/{r['algorithm']}/{r['precision']}"


def flat_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """results/check/metrics.json: ``<domain>/<algorithm>/<precision>/<metric>`` scalars, passed as 0/1."""
    out: dict[str, Any] = {"models": len(rows), "failed": sum(not r["passed"] for r in rows),
                           "passed": int(all(r["passed"] for r in rows))}
    for r in rows:
        out.update({f"{_key(r)}/{m}": r[m] for m in _METRICS if np.isfinite(r[m])})
        out[f"{_key(r)}/provider"] = r["provider"]
        out[f"{_key(r)}/passed"] = int(r["passed"])
    return out


def flat_timings(rows: list[dict[str, Any]]) -> dict[str, float]:
    """results/check/timings.json: ``<domain>/<algorithm>/<precision>/<timing>`` latency and throughput of ORT
    and PyTorch, kept out of metrics.json (they change on every run; the table on stdout shows them too)."""
    return {f"{_key(r)}/{t}": r[t] for r in rows for t in _TIMINGS if np.isfinite(r[t])}


def verified(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Only the files that passed, with the sha256 the check saw (a later change to a file breaks the match)."""
    return {"verified": [{k: r[k] for k in ("domain", "algorithm", "precision", "file", "sha256", "provider")}
                         for r in rows if r["passed"]]}


def enforce(rows: list[dict[str, Any]]) -> None:
    """Raise CheckFailed (one line) when any row breached its tolerance, naming each breach."""
    failed = [f"{r['domain']}/{r['algorithm']}/{r['precision']} ({r['why']})" for r in rows if not r["passed"]]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(rows)} ONNX model(s) failed the runtime check: {', '.join(failed)} "
                          "(see the table above and results/check/metrics.json)")
