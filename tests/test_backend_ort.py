"""The ONNX Runtime backend and artifacts: kernels chosen, parity with the IR, targets."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import cnn_feeds, cnn_model, mlp_feeds, mlp_model

import qcompile
from qcompile.errors import CalibrationError, ModelLoadError
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.runtime import make_session


def _compile(tmp_path, proto, spec, **kwargs):
    return qcompile.compile(proto, passes=spec, output=tmp_path / "out", **kwargs)


@pytest.mark.parametrize("bits, kernel", [(2, "MatMulNBits"), (4, "MatMulNBits"), (8, "MatMulNBits"),
                                          (3, "MatMulNBits (3-bit codes in the 4-bit kernel)")])
@pytest.mark.parametrize("sym", [False, True])
def test_artifact_matches_ir_reference(tmp_path, bits, kernel, sym):
    spec = f"quant(bits={bits},sym={str(sym).lower()},min_size=0)"
    result = _compile(tmp_path, mlp_model(), spec, accuracy_level=0)
    layers = result.manifest["layers"]
    assert layers["fc1"]["kernel"].startswith(kernel)
    assert layers["embed"]["kernel"].startswith("GatherBlockQuantized")
    vs_ir = result.manifest["errors"]["artifact_vs_ir"]["y"]
    assert vs_ir["max_abs"] < 1e-3 and vs_ir["cosine"] > 0.99999
    artifact = qcompile.load(result.path)
    ir_model = canonicalize(Model.from_proto(mlp_model()))
    feeds = mlp_feeds()
    assert artifact.run(feeds)["y"].shape == make_session(ir_model).run(None, feeds)[0].shape


def test_three_bit_codes_and_float16_scales_stay_narrow_on_disk(tmp_path):
    """3-bit weights run in 4-bit kernels but the file holds 3-bit codes and float16 scales,
    widened exactly by ops ONNX Runtime folds when the session starts."""
    sizes = {}
    for bits in (3, 4):
        result = _compile(tmp_path / str(bits), mlp_model(hidden=256, vocab=512), f"quant(bits={bits},min_size=0)",
                          accuracy_level=0)
        storage = result.manifest["backend"]["storage"]
        assert storage["float16_scales"] >= 3
        assert storage["three_bit_codes"] == (4 if bits == 3 else 0)  # embed + 3 linear layers
        assert result.manifest["errors"]["artifact_vs_ir"]["y"]["max_abs"] < 1e-4
        sizes[bits] = result.manifest["sizes"]["artifact_bytes"]
    assert sizes[3] < 0.9 * sizes[4]


def test_accuracy_level_4_error_is_measured_and_small(tmp_path):
    result = _compile(tmp_path, mlp_model(), "quant(bits=4,min_size=0)", accuracy_level=4)
    assert result.manifest["backend"]["accuracy_level"] == 4
    vs_ir = result.manifest["errors"]["artifact_vs_ir"]["y"]
    assert 0.999 < vs_ir["cosine"] < 1.0 or vs_ir["max_abs"] < 1e-3


def test_artifact_is_smaller_and_manifest_complete(tmp_path):
    result = _compile(tmp_path, mlp_model(), "quant(bits=4,min_size=0)")
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["sizes"]["artifact_bytes"] < manifest["sizes"]["input_weight_bytes"] / 4
    assert manifest["passes"][0]["spec"] == "quant(min_size=0)"
    assert set(manifest["layers"]) == {"embed", "fc1", "fc2", "fc3"}
    assert manifest["versions"]["onnxruntime"] and manifest["backend"]["providers"] == ["CPUExecutionProvider"]
    assert sorted(p.name for p in result.path.iterdir()) == ["manifest.json", "model.onnx"]


def test_conv_model_through_the_backend(tmp_path):
    result = _compile(tmp_path, cnn_model(), "quant(bits=4,min_size=0)", calib={"x": cnn_feeds(4)["x"]})
    assert result.manifest["layers"]["conv1"]["kernel"].startswith("QConv reference")
    assert result.manifest["errors"]["artifact_vs_fp32"]["y"]["cosine"] > 0.99
    assert qcompile.load(result.path).run(cnn_feeds())["y"].shape == (2, 10)


def test_edge_target_writes_ort_format(tmp_path):
    result = _compile(tmp_path, mlp_model(), "quant(bits=4,min_size=0)", target="edge")
    assert (result.path / "model.ort").stat().st_size > 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path / "model.ort"), providers=["CPUExecutionProvider"])
    assert session.run(None, mlp_feeds())[0].shape == (12, 48)


def test_cuda_target_records_providers_and_falls_back_here(tmp_path):
    result = _compile(tmp_path, mlp_model(), "quant(bits=4,min_size=0)", target="cuda")
    assert result.manifest["backend"]["providers"][0] == "CUDAExecutionProvider"
    artifact = qcompile.load(result.path)  # no GPU here: CPU fallback with a warning
    assert artifact.run(mlp_feeds())["y"].shape == (12, 48)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not a qcompile artifact"):
        qcompile.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="unreadable manifest"):
        qcompile.load(tmp_path)


def test_run_checks_feeds(tmp_path):
    artifact = qcompile.load(_compile(tmp_path, mlp_model(), "quant(min_size=0)").path)
    with pytest.raises(CalibrationError, match="missing: ids"):
        artifact.run({"x": np.zeros(1)})
    with pytest.raises(CalibrationError, match="running"):
        artifact.run({"ids": np.zeros((2, 4), np.float32)})


def test_emitted_model_is_valid_onnx(tmp_path):
    result = _compile(tmp_path, mlp_model(), "quant(bits=4,min_size=0)")
    proto = onnx.load(result.path / "model.onnx")
    onnx.checker.check_model(proto)
    assert {o.domain for o in proto.opset_import} >= {"", "com.microsoft"}


def test_bias_add_is_folded_into_matmulnbits(tmp_path):
    result = _compile(tmp_path, mlp_model(), "quant(bits=4,min_size=0)")
    proto = onnx.load(result.path / "model.onnx")
    fc1 = next(n for n in proto.graph.node if n.name == "fc1")
    assert fc1.op_type == "MatMulNBits" and fc1.input[5] == "b1"
    assert "fc1_bias" not in {n.name for n in proto.graph.node}
    assert result.manifest["errors"]["artifact_vs_ir"]["y"]["cosine"] > 0.9999


def test_per_channel_embeddings_with_padding_use_the_reference(tmp_path):
    # 64 columns per row -> per-channel group of 64 is whole; 48 would need padding
    result = _compile(tmp_path, mlp_model(hidden=48), "quant(bits=8,group_size=0,min_size=0)")
    assert result.manifest["layers"]["embed"]["kernel"].startswith("QGather reference")
    assert result.manifest["layers"]["fc1"]["kernel"] == "MatMulNBits"
    assert result.manifest["errors"]["artifact_vs_ir"]["y"]["cosine"] > 0.9999


def test_matmuls_sharing_an_input_are_merged_exactly(tmp_path):
    from onnx import helper, numpy_helper

    proto = mlp_model()
    # a second and third MatMul reading fc1's input, like attention Q/K/V
    rng = np.random.default_rng(5)
    for name in ("k", "v"):
        proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), f"w_{name}"))
        proto.graph.node.append(helper.make_node("MatMul", ["e2", f"w_{name}"], [name], name=f"proj_{name}"))
        proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    result = _compile(tmp_path, proto, "quant(bits=4,min_size=0)", accuracy_level=0)
    layers = result.manifest["layers"]
    assert layers["proj_k"]["kernel"] == layers["fc1"]["kernel"] == "MatMulNBits"
    assert layers["fc1"]["merged_with"] == ["proj_k", "proj_v"] and "merged_with" not in layers["fc2"]
    errors = result.manifest["errors"]["artifact_vs_ir"]
    assert all(errors[name]["sqnr_db"] > 60 for name in ("y", "k", "v"))  # float round-off only
    ops = [n.op_type for n in onnx.load(result.path / "model.onnx").graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("Split") == 1


def test_two_bit_blocks_over_256_keep_the_reference(tmp_path):
    """MatMulNBits refuses 2-bit blocks above 256: per-channel 2-bit over K=300 decodes instead."""
    from conftest import make_model
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 300])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                       [numpy_helper.from_array(rng.standard_normal((300, 16)).astype(np.float32), "w")])
    result = qcompile.compile(proto, passes="quant(bits=2,group_size=0)", output=tmp_path / "out")
    assert "reference function" in result.manifest["layers"]["fc"]["kernel"]
    out = qcompile.load(result.path).run({"x": rng.standard_normal((3, 300)).astype(np.float32)})
    assert next(iter(out.values())).shape == (3, 16)


@pytest.mark.parametrize("spec", ["shiftadd(bits=3,min_size=0,table_group=32)",
                                  "shiftadd(bits=2,min_size=0,table_group=32,outliers=0)"])
def test_reference_only_layers_are_decoded_when_the_artifact_opens(tmp_path, spec):
    """``bcq`` layers (no ORT kernel) stay packed in the file; the loader decodes them with NumPy
    instead of letting ONNX Runtime constant-fold their reference functions, with the same outputs."""
    import onnxruntime as ort

    result = qcompile.compile(mlp_model(), passes=spec, backend="ort", calib={"ids": mlp_feeds(8, seed=7)["ids"]},
                              output=tmp_path / "out")
    model_file = result.path / result.manifest["backend"]["model_file"]
    stored = onnx.load(str(model_file), load_external_data=False)
    assert any(node.domain == "qcompile" for node in stored.graph.node)  # the file keeps bcq packed
    artifact = qcompile.load(result.path)
    assert artifact.session._qcompile_decoded_layers == 4  # embed, fc1, fc2, fc3
    plain = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])  # the reference functions
    feeds = mlp_feeds(3, seed=5)
    np.testing.assert_array_equal(artifact.run(feeds)["y"], plain.run(None, feeds)[0])
