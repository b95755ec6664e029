"""export.onnx_export: round trip at two shapes, metadata and card read back, sizes, checker errors in one line."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import CLASSIFIER_WEIGHT, ExportError, classifier_node, params_hash, verify
from metaseg.models.adapted import load_adapted
from metaseg.models.backbones import normalization
from tests.onnx_helpers import ALGORITHM, BACKBONE, CLASS_NAMES, DOMAIN, LITE, RESIZE, SIZE, bundle, export_config
from tests.timing_helpers import assert_apart


@pytest.mark.parametrize("shape", [(1, 3, SIZE, SIZE), (2, 3, 80, 104)])
def test_fp32_round_trip_matches_torch(shape: tuple[int, ...]) -> None:
    b = bundle()
    model, _ = load_adapted(b.adapted)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)["out"].numpy()
    sess = ort.InferenceSession(str(b.onnx_dir / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    assert got.shape == want.shape == (shape[0], len(CLASS_NAMES), shape[2], shape[3])
    assert np.abs(want).max() > 1.0  # a trained model, not near-zero logits
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_metadata_and_fp32_io(precision: str) -> None:
    b = bundle()
    sess = ort.InferenceSession(str(b.onnx_dir / f"model.{precision}.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == sess.get_outputs()[0].type == "tensor(float)"
    assert [str(d) for d in sess.get_inputs()[0].shape[1:2]] == ["3"]
    props = sess.get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == CLASS_NAMES
    assert json.loads(props["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(props["std"]) == pytest.approx(list(normalization(BACKBONE)[1]))
    provenance = (props["image_size"], props["domain"], props["algorithm"], props["shots"])
    assert provenance == (str(SIZE), DOMAIN, ALGORITHM, "5")
    assert (props["input_layout"], props["input_dtype"], props["precision"]) == ("NCHW", "float32", precision)
    assert props["resize"] == RESIZE  # prepare.resize: infer.py resizes the way training images were
    assert props["params_sha256"] == params_hash({"export": export_config()})
    assert props["git_commit"]


@pytest.mark.parametrize("shape", [(1, 3, SIZE, SIZE), (2, 3, 80, 104)])
def test_lite0_round_trip_and_its_normalisation_travels(shape: tuple[int, ...]) -> None:
    """An adapted EfficientNet-Lite0 model exports like the others, its (x * 255 - 127) / 128 input normalisation
    written into the ONNX metadata and the card (export/infer.py and the check read it from there)."""
    b = bundle(LITE)
    model, meta = load_adapted(b.adapted)
    assert meta["arch"] == {"backbone": LITE, "num_classes": len(CLASS_NAMES), "output_stride": 16, "body_stage": None}
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)["out"].numpy()
    mean, std = normalization(LITE)
    for precision in ("fp32", "fp16", "int8"):
        sess = ort.InferenceSession(str(b.onnx_dir / f"model.{precision}.onnx"), providers=["CPUExecutionProvider"])
        props = sess.get_modelmeta().custom_metadata_map
        assert json.loads(props["mean"]) == pytest.approx(list(mean)) == [127 / 255] * 3, precision
        assert json.loads(props["std"]) == pytest.approx(list(std)) == [128 / 255] * 3, precision
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == want.shape == (shape[0], len(CLASS_NAMES), shape[2], shape[3]), precision
        if precision == "fp32":
            assert np.abs(want).max() > 1.0 and np.abs(got - want).max() <= 1e-4
    card = json.loads((b.onnx_dir / "card.json").read_text())
    assert card["input"]["mean"] == pytest.approx(list(mean)) and card["input"]["std"] == pytest.approx(list(std))
    assert LITE in card["what"]
    assert b.export_metrics["fp16_over_fp32"] <= 0.52 and b.export_metrics["int8_over_fp32"] <= 0.30


def test_card_and_sizes() -> None:
    b = bundle()
    card = json.loads((b.onnx_dir / "card.json").read_text())
    assert card["class_names"] == CLASS_NAMES and card["provenance"]["domain"] == DOMAIN
    for precision, entry in card["files"].items():
        data = (b.onnx_dir / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), precision
    assert "export/infer.py" in card["how_to_run"]
    assert b.export_metrics["fp16_over_fp32"] <= 0.52
    assert b.export_metrics["int8_over_fp32"] <= 0.30


def test_export_times_go_to_timings_not_metrics() -> None:
    b = bundle()
    assert_apart(b.export_metrics, b.export_timings)
    assert set(b.export_timings) == {"export_s_fp32", "export_s_fp16", "export_s_int8"}
    assert {"size_mb_fp32", "fp16_over_fp32", "int8_over_fp32"} <= set(b.export_metrics)


def test_int8_keeps_the_classifier_conv_float_and_quantises_the_rest() -> None:
    """The int8 exclusion is found by the classifier's initializer name, not by graph position: in the int8 file
    that Conv reads the float weight directly, every other Conv a DequantizeLinear output."""
    model = onnx.load(bundle().onnx_dir / "model.int8.onnx")
    name = classifier_node(onnx.load(bundle().onnx_dir / "model.fp32.onnx"))
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert convs[name].input[1].endswith(CLASSIFIER_WEIGHT)
    others = [n for k, n in convs.items() if k != name]
    assert others and all(n.input[1] in dq_outputs for n in others)
    broken = onnx.load(bundle().onnx_dir / "model.fp32.onnx")
    for init in broken.graph.initializer:
        init.name = init.name.replace("classifier.4", "head.9")
    for node in broken.graph.node:
        node.input[:] = [i.replace("classifier.4", "head.9") for i in node.input]
    with pytest.raises(ValueError, match="expected one Conv reading 'classifier.4.weight'"):
        classifier_node(broken)


def test_checker_failure_is_one_line() -> None:
    node = onnx.helper.make_node("Relu", ["missing"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(ExportError) as err:
        verify(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), "broken.onnx")
    assert "\n" not in str(err.value) and str(err.value).startswith("broken.onnx: ONNX check failed")


def test_int8_weight_bits_follow_the_cpu(tmp_path: Path) -> None:
    """export.int8_reduce_range: auto = 7-bit weights only on an x86 CPU without VNNI; 8-bit on VNNI x86 and ARM;
    true / false are taken as given."""
    from export.onnx_export import int8_reduce_range

    plain, vnni = tmp_path / "plain", tmp_path / "vnni"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    vnni.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert int8_reduce_range("auto", machine="x86_64", cpuinfo=plain) is True
    assert int8_reduce_range("auto", machine="x86_64", cpuinfo=vnni) is False
    assert int8_reduce_range("auto", machine="aarch64", cpuinfo=plain) is False
    assert int8_reduce_range("auto", machine="x86_64", cpuinfo=tmp_path / "missing") is False  # cannot tell: 8-bit
    assert int8_reduce_range(True, machine="aarch64") is True and int8_reduce_range(False, cpuinfo=plain) is False
