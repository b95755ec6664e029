"""Adapted model -> verified ONNX files (fp32, fp16, int8 static QDQ) with metadata and a model card.

One export folder ``models/onnx/<domain>/<algorithm>/`` holds ``model.<precision>.onnx`` per requested precision and
``card.json``; it is built in a temp folder and swapped in whole, so a failed export leaves the old folder untouched.
Every file passes ``onnx.checker.check_model(full_check=True)`` and strict shape inference; a failure raises
``ExportError`` with the checker's first line. All files take float32 NCHW input (fp16 keeps fp32 IO) and return
float32 logits NCHW (no aux head, no dict).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.infer import preprocess
from metaseg.cli import InputError
from metaseg.config import PRECISIONS, ConfigError
from metaseg.data.prepared import PreparedDataset
from metaseg.models.deeplab import HEAD_NAMES
from metaseg.io import atomic_dir, read_json, write_bytes, write_json
from metaseg.models.adapted import load_adapted
from metaseg.overlay import palette

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "logits"
MAX_SIDE = 4096  # dynamic height / width upper bound


class ExportError(RuntimeError):
    """An exported file failed the ONNX checker or shape inference (one-line message)."""


class LogitsOnly(nn.Module):
    """torchvision DeepLabv3 returns {"out", "aux"}; the deployed graph returns the logits tensor only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def params_hash(sections: Mapping[str, Any]) -> str:
    """sha256 of the validated params sections used (pydantic models or plain mappings), key order independent."""
    plain = {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in sections.items()}
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def build_metadata(meta: Mapping[str, Any], *, precision: str, params_sha256: str, commit: str,
                   resize: str) -> dict[str, str]:
    """metadata_props (string -> string) that make the file self-describing for export/infer.py."""
    return {
        "class_names": json.dumps(list(meta["class_names"])),
        "input_layout": "NCHW", "input_dtype": "float32",
        "input_range": "RGB scaled to [0, 1], then (x - mean) / std per channel; any H, W (multiples of 8 best)",
        "output": "logits float32 NCHW, channel c = class_names[c]; prediction = argmax over C",
        "mean": json.dumps([float(v) for v in meta["mean"]]), "std": json.dumps([float(v) for v in meta["std"]]),
        "image_size": str(int(meta["image_size"])),
        "resize": resize,  # prepare.resize: how training images reached image_size (infer.py does the same)
        # the report's class colours (metaseg.overlay.palette), so the device's masks use the same ones
        "palette": json.dumps(palette(len(meta["class_names"])).tolist()),
        "domain": str(meta.get("domain", "unknown")), "algorithm": str(meta.get("algorithm", "unknown")),
        "shots": str(meta.get("shots", "unknown")), "precision": precision,
        "params_sha256": params_sha256, "git_commit": commit,
    }


def verify(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Full checker + strict shape inference; returns the shape-inferred model or raises ExportError (one line)."""
    try:
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as err:  # onnx raises ValidationError, InferenceError, RuntimeError
        first = next((line for line in str(err).splitlines() if line.strip()), err.__class__.__name__)
        raise ExportError(f"{name}: ONNX check failed: {first.strip()}") from None


def _set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> onnx.ModelProto:
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(props))
    return model


def export_fp32(model: nn.Module, *, opset: int, export_size: int) -> onnx.ModelProto:
    """torch.onnx dynamo export, dynamic batch / height / width, weights inside the one proto."""
    wrapper = LogitsOnly(model).eval()
    x = torch.randn(1, 3, export_size, export_size)
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=32, max=MAX_SIDE),
            3: torch.export.Dim("width", min=32, max=MAX_SIDE)}
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes={"x": dims}, external_data=False,
                                    verbose=False)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 IO (keep_io_types). The converter casts the output of a blocked op (the final
    Resize) back to fp16 and types the graph output fp16; that last Cast is retargeted to fp32 here."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():  # one "truncated to 1e-07" warning per tiny weight
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    producers = {out: node for node in half.graph.node for out in node.output}
    for output in half.graph.output:
        if output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers.get(output.name)
        if node is not None and node.op_type == "Cast":
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("to", onnx.TensorProto.FLOAT))
        else:
            inner = f"{output.name}_fp16"
            if node is not None:
                node.output[list(node.output).index(output.name)] = inner
            half.graph.node.append(onnx.helper.make_node("Cast", [inner], [output.name], to=onnx.TensorProto.FLOAT))
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return half


CLASSIFIER_WEIGHT = HEAD_NAMES[0]  # "classifier.4.weight": the DeepLab head's final 1x1 conv


def classifier_node(model: onnx.ModelProto) -> str:
    """The name of the Conv node that reads the classifier weight (the exporter may prefix the torch name, e.g.
    ``model.classifier.4.weight``); found by initializer name, not by position in the graph."""
    found = [n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and
             (n.input[1] == CLASSIFIER_WEIGHT or n.input[1].endswith("." + CLASSIFIER_WEIGHT))]
    if len(found) != 1:
        raise ValueError(f"expected one Conv reading '{CLASSIFIER_WEIGHT}' in the exported graph, found {len(found)}")
    return found[0]


def cpu_has_vnni(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this x86 CPU has VNNI (``avx512_vnni`` / ``avx_vnni``); None when it cannot tell (no cpuinfo)."""
    try:
        flags = {f for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
    except OSError:
        return None
    return bool(flags & {"avx512_vnni", "avx_vnni"})


def int8_reduce_range(setting: str | bool, *, machine: str | None = None,
                      cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """``export.int8_reduce_range`` resolved: ``auto`` = 7-bit weights only on an x86 CPU without VNNI (where ONNX
    Runtime's u8 x s8 kernels can saturate), 8-bit everywhere else (VNNI x86, ARM)."""
    if setting != "auto":
        return bool(setting)
    import platform

    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return cpu_has_vnni(cpuinfo) is False


def to_int8(model: onnx.ModelProto, images: np.ndarray, mean: list[float], std: list[float], *,
            reduce_range: bool) -> onnx.ModelProto:
    """Static QDQ, per-channel weights, calibrated on ``images`` (uint8 [N,H,W,3]) preprocessed as infer.py does.

    The final 1x1 classifier conv stays fp32 (a 256 x C matrix: no size to speak of). The argmax between classes is
    decided there, and quantising it cost most of the int8 disagreement: measured on the 8 default adapted models,
    argmax agreement with PyTorch rose on every one (e.g. 0.41 -> 0.68, 0.974 -> 0.992) at unchanged latency;
    percentile calibration did not help.

    ``reduce_range`` quantises weights to 7 bits, as ONNX Runtime advises for x86 CPUs without VNNI, where the
    u8 x s8 multiply-add can saturate; with VNNI (and on ARM) it only throws a bit away. On a VNNI machine
    (2026-12-02, the 8 default adapted models) 8-bit weights raised argmax agreement on all 8 (neon/anil
    0.718 -> 0.944, xray/fomaml 0.908 -> 0.966, neon/fomaml 0.947 -> 0.985) at equal latency; entropy,
    percentile and 32-image calibration, 16-bit activations and keeping the depthwise convs in fp32 did not help
    (``export.int8_reduce_range``: auto picks by the exporting CPU).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            img = next(self._it, None)
            return None if img is None else {INPUT_NAME: preprocess(np.asarray(img), mean, std)}

    with tempfile.TemporaryDirectory(prefix="metaseg-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, src)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, nodes_to_exclude=[classifier_node(model)])
        return onnx.load(dst)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _evaluate_rows(path: str | Path | None, algorithm: str) -> dict[str, Any] | None:
    """The evaluate metrics whose key names this algorithm as a component (``a/fomaml/b``, ``fomaml.miou``, ...)."""
    if path is None:
        return None
    metrics = read_json(path)
    pattern = re.compile(rf"(^|[/._-]){re.escape(algorithm)}([/._-]|$)")
    return {"source": str(path), "metrics": {k: v for k, v in metrics.items() if pattern.search(k)}}


def calibration_set(prepared_root: str | Path, domain: str, count: int,
                    indices: list[int] | None = None) -> np.ndarray:
    """``count`` prepared images of ``domain`` (uint8 [N,H,W,3], training resolution): the first of ``indices``
    (the domain's support pool, so the check's test pool stays unseen) or, without indices, the first images."""
    try:
        images = PreparedDataset(prepared_root).domain(domain).images
    except KeyError as err:
        raise InputError(f"int8 calibration: {err.args[0]}") from None
    if indices is None:
        return np.asarray(images[:count])
    return np.asarray(images[np.asarray(sorted(indices)[:count], dtype=np.int64)])


def model_card(meta: Mapping[str, Any], files: dict[str, dict[str, Any]], *, adapted: str | Path,
               out_dir: str | Path, opset: int, export_size: int, params: Mapping[str, Any], digest: str, commit: str,
               calibration: int, evaluate_metrics: str | Path | None, weight_bits: int = 8) -> dict[str, Any]:
    """card.json: what the files are, how they were made, where they came from, how to run them."""
    edge = next(p for p in reversed(PRECISIONS) if p in files)  # smallest file first
    return {
        "what": (f"DeepLabv3 ({meta['arch']['backbone']}) semantic segmentation for domain '{meta.get('domain')}', "
                 f"adapted with '{meta.get('algorithm')}' from {meta.get('shots')} shot(s) per class"),
        "class_names": list(meta["class_names"]),
        "files": files,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "mean": list(meta["mean"]),
                  "std": list(meta["std"]), "range": "RGB / 255, then (x - mean) / std",
                  "training_resolution": int(meta["image_size"])},
        "output": {"name": OUTPUT_NAME, "layout": "NCHW", "dtype": "float32", "meaning": "class logits"},
        "how_made": {"exporter": f"torch.onnx.export dynamo (torch {torch.__version__}, onnx {onnx.__version__})",
                     "opset": opset, "export_size": export_size, "params": _jsonable(
                         {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in params.items()}),
                     "params_sha256": digest, "git_commit": commit,
                     "fp16": "onnxconverter_common float16, keep_io_types=True",
                     "int8": f"onnxruntime quantize_static QDQ per-channel, {weight_bits}-bit weights (final "
                             f"classifier conv kept fp32), {calibration} calibration images from the domain's "
                             "support pool (never its test pool)"},
        "provenance": {"adapted_file": str(adapted), **_jsonable(meta)},
        "evaluate": _evaluate_rows(evaluate_metrics, str(meta.get("algorithm"))),
        "how_to_run": f"python export/infer.py {Path(out_dir) / files[edge]['file']} IMAGE_OR_FOLDER --out masks/ "
                      "[--overlay] [--providers cpu|cuda]",
        "verification": "the check stage: results/check/metrics.json and results/check/verified.json",
    }


def export_adapted(adapted: str | Path, out_dir: str | Path, prepared_root: str | Path, *, precisions: list[str],
                   opset: int, export_size: int, calibration_images: int, params: Mapping[str, Any],
                   evaluate_metrics: str | Path | None = None,
                   calibration_indices: list[int] | None = None, resize: str,
                   int8_reduce_range: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Write every precision + card.json into ``out_dir`` (swapped in whole); returns the flat export metrics (sizes)
    and, apart, the timings (``export_s_<precision>``).
    ``int8_reduce_range``: 7-bit int8 weights (see ``to_int8``; resolve ``export.int8_reduce_range`` with
    ``int8_reduce_range()``)."""
    if not precisions:
        raise ConfigError("'export.precisions': empty; name at least one of fp32, fp16, int8")
    if not Path(adapted).is_file():
        raise FileNotFoundError(f"{adapted}: adapted model not found (run the adapt stage first)")
    model, meta = load_adapted(adapted)
    calibration = calibration_set(prepared_root, str(meta.get("domain")), calibration_images,
                                  calibration_indices) if "int8" in precisions \
        else np.zeros((0, 1, 1, 3), np.uint8)
    digest, commit = params_hash(params), git_commit(Path(__file__).resolve().parent)
    files: dict[str, dict[str, Any]] = {}
    metrics: dict[str, float] = {}
    timings: dict[str, float] = {}
    with atomic_dir(out_dir) as tmp:
        t0 = time.perf_counter()
        fp32 = verify(export_fp32(model, opset=opset, export_size=export_size), "model.fp32.onnx")
        timings["export_s_fp32"] = time.perf_counter() - t0
        for precision in precisions:
            t0 = time.perf_counter()
            if precision == "fp32":
                proto = fp32
            elif precision == "fp16":
                proto = to_fp16(fp32)
            else:
                proto = to_int8(fp32, calibration, list(meta["mean"]), list(meta["std"]),
                                reduce_range=int8_reduce_range)
            name = f"model.{precision}.onnx"
            props = build_metadata(meta, precision=precision, params_sha256=digest, commit=commit, resize=resize)
            data = verify(_set_metadata(proto, props), name).SerializeToString()
            write_bytes(tmp / name, data)
            if precision != "fp32":
                timings[f"export_s_{precision}"] = time.perf_counter() - t0
            metrics[f"size_mb_{precision}"] = len(data) / 1e6
            files[precision] = {"file": name, "size_mb": round(len(data) / 1e6, 3),
                                "sha256": hashlib.sha256(data).hexdigest()}
            log.info("%s/%s: %.1f MB", out_dir, name, len(data) / 1e6)
        for precision in PRECISIONS[1:]:
            if precision in files and "fp32" in files:
                metrics[f"{precision}_over_fp32"] = metrics[f"size_mb_{precision}"] / metrics["size_mb_fp32"]
        card = model_card(meta, files, adapted=adapted, out_dir=out_dir, opset=opset, export_size=export_size,
                          params=params, digest=digest, commit=commit, calibration=len(calibration),
                          evaluate_metrics=evaluate_metrics, weight_bits=7 if int8_reduce_range else 8)
        write_json(tmp / "card.json", card)
    return metrics, timings
