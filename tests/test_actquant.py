"""Static activation quantization (quant act_bits): QDQ in the IR, integer GEMM in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import mlp_feeds, mlp_model
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.errors import UsageError
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.passes.actquant import activation_range
from qcompile.passes.calibration import CalibrationSet
from qcompile.passes.context import PassContext
from qcompile.passes.manager import PassManager
from qcompile.passes.registry import parse_pipeline


def _calib(n=16):
    return CalibrationSet(mlp_feeds(n, seed=7), "test")


def _run(proto, spec, calib):
    model = canonicalize(Model.from_proto(proto))
    return PassManager(parse_pipeline(spec), eval_samples=calib).run(model, PassContext(calib=calib))


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_activation_range_beats_minmax(bits):
    rows = np.random.default_rng(bits).standard_t(2, size=(512, 32)).astype(np.float32)
    scale, zero_point = activation_range(rows, bits)
    qmax = 2**bits - 1
    assert 0 <= zero_point <= qmax and scale > 0

    def error(s, z):
        return np.square((np.clip(np.round(rows / s) + z, 0, qmax) - z) * s - rows).sum()

    low, high = rows.min(), rows.max()
    minmax_scale = (high - low) / qmax
    assert error(scale, zero_point) <= error(minmax_scale, round(-low / minmax_scale)) + 1e-6


def test_act_bits_inserts_shared_qdq_and_picks_w8a8_defaults():
    result, (record,) = _run(mlp_model(), "quant(bits=8,act_bits=8,min_size=0)", _calib())
    ops = [n.op for n in result.graph.nodes]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 3  # fc1, fc2, fc3 inputs
    assert "Clip" not in ops
    fc1 = next(n for n in result.quantized_nodes() if n.name == "fc1")
    assert fc1.inputs[0].inputs[0].op == "DequantizeLinear"
    assert fc1.attrs["sym"] == 1 and qcompile.ir.qops.read_weight(fc1).n_groups == 1  # per channel, symmetric
    quantizers = record.stats["activation_quantizers"]
    assert sorted(q["layers"][0] for q in quantizers.values()) == ["fc1", "fc2", "fc3"]
    assert record.output_error["y"]["cosine"] > 0.999


def test_low_activation_bits_clip_the_codes():
    result, (record,) = _run(mlp_model(), "quant(bits=4,act_bits=4,min_size=0)", _calib())
    clips = [n for n in result.graph.nodes if n.op == "Clip"]
    assert len(clips) == 3 and int(np.asarray(clips[0].inputs[2].values)) == 15
    fc1 = next(n for n in result.quantized_nodes() if n.name == "fc1")
    assert qcompile.ir.qops.read_weight(fc1).group_size == 32 and not fc1.attrs["sym"]


def test_act_bits_needs_calibration():
    model = canonicalize(Model.from_proto(mlp_model()))
    with pytest.raises(UsageError, match=r"quant\(act_bits\) needs calibration data"):
        PassManager(parse_pipeline("quant(act_bits=8)")).run(model, PassContext())


def test_other_readers_of_a_quantized_input_keep_the_float_tensor():
    proto = mlp_model()
    proto.graph.node.append(helper.make_node("Relu", ["e2"], ["side"], name="side_reader"))
    proto.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    result, _ = _run(proto, "quant(bits=8,act_bits=8,min_size=0)", _calib())
    side = next(n for n in result.graph.nodes if n.name == "side_reader")
    assert side.inputs[0].name == "e2"


def test_w8a8_runs_as_integer_gemm_in_onnx_runtime(tmp_path):
    calib = mlp_feeds(16, seed=7)
    result = qcompile.compile(mlp_model(), passes="quant(bits=8,act_bits=8,min_size=0)", calib=calib,
                              output=tmp_path / "out")
    layers = result.manifest["layers"]
    assert {layers[n]["kernel"] for n in ("fc1", "fc2", "fc3")} == {"MatMulIntegerToFloat"}
    assert result.manifest["errors"]["artifact_vs_ir"]["y"]["sqnr_db"] > 60  # exact up to float round-off
    proto = onnx.load(result.path / "model.onnx")
    fc1 = next(n for n in proto.graph.node if n.name == "fc1")
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert weights[fc1.input[1]].dtype == np.int8 and fc1.input[6] == "b1"
    assert qcompile.load(result.path).run(mlp_feeds())["y"].shape == (12, 48)


def test_reference_sessions_keep_qdq_semantics():
    """ORT's MatMulAddFusion re-quantizes float weights per tensor in QDQ models; the
    reference session must match an unoptimized run exactly."""
    import onnxruntime as ort

    from qcompile.ir.runtime import make_session

    result, _ = _run(mlp_model(), "quant(bits=8,act_bits=8,min_size=0,embeddings=false)", _calib())
    feeds = mlp_feeds()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(result.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(make_session(result).run(None, feeds)[0], plain.run(None, feeds)[0], atol=1e-5)
