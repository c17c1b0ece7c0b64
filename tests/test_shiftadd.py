"""The shiftadd pass: binary planes with power-of-two alphas, fitted inside GPTQ."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cnn_feeds, cnn_model, mlp_feeds, mlp_model

from qcompile.errors import UsageError
from qcompile.ir import io, qops
from qcompile.ir.bcq_outliers import BCQOutlierWeight
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.runtime import make_session
from qcompile.passes import registry
from qcompile.passes.bcqfit import bcq_gptq, bcq_rowwise
from qcompile.passes.calibration import CalibrationSet, random_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.manager import PassManager


def _canonical(proto) -> Model:
    return canonicalize(Model.from_proto(proto))


def _run(model: Model, spec: str, calib: CalibrationSet | None):
    manager = PassManager(registry.parse_pipeline(spec), eval_samples=calib)
    return manager.run(model, PassContext(calib=calib))


def _correlated_inputs(rng, rows=2048, cols=64, rank=6):
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
            + 0.05 * rng.standard_normal((rows, cols))).astype(np.float32)


def _output_error(inputs, weight, recon):
    return float(np.square(inputs @ weight.T - inputs @ recon.T).sum())


@pytest.mark.parametrize("layout", ["column", "block", "row"])
def test_shiftadd_rewrites_every_layer_and_runs_in_onnx_runtime(layout):
    model = _canonical(mlp_model())
    calib = random_calibration(model, 8)
    result, (record,) = _run(model, f"shiftadd(bits=3,layout={layout},group_size=32,table_group=16,min_size=0,"
                                    "outliers=0)", calib)
    ops = {n.name: n.op for n in result.graph.nodes}
    assert ops["embed"] == "QGather" and ops["fc1"] == "QMatMul" and ops["fc3"] == "QMatMul"
    assert all(n.attrs["format"] == "bcq" for n in result.quantized_nodes())
    assert record.stats["quantized"] == 4 and record.stats["layers"]["fc1"]["layout"] == layout
    assert record.stats["layers"]["embed"]["layout"] == "row"
    if layout == "row":  # alphas per output row and 16 input columns
        fc1 = qops.read_weight(next(n for n in result.quantized_nodes() if n.name == "fc1"))
        assert (fc1.row_group, fc1.col_group) == (1, 16)
    assert record.stats["layers"]["fc1"]["output_cosine"] > 0.97
    assert record.output_error["y"]["cosine"] > 0.95
    assert all(result.provenance[n.name] == "shiftadd" for n in result.quantized_nodes())


def test_shiftadd_model_equals_numpy_dequantized_weights():
    """The saved model's reference functions compute what NumPy's dequantize says (with the
    default outliers: bcq_outliers weights)."""
    model = _canonical(mlp_model())
    calib = random_calibration(model, 4)
    result, _ = _run(model, "shiftadd(bits=2,group_size=32,min_size=0)", calib)
    expected = result.copy()
    for node in list(expected.quantized_nodes()):
        weight = qops.read_weight(node)
        assert isinstance(weight, BCQOutlierWeight)
        dense = weight.dequantize()
        x = node.inputs[1] if node.op == "QGather" else node.inputs[0]
        inputs = [_const(node.name, dense), x] if node.op == "QGather" else [
            x, _const(node.name, np.ascontiguousarray(dense.T))]
        node.op, node.domain, node.attrs = ("Gather" if node.op == "QGather" else "MatMul"), "", {}
        node.inputs.clear()
        node.inputs.extend(inputs)
    expected.graph.cleanup()
    feeds = mlp_feeds()
    np.testing.assert_allclose(make_session(result).run(None, feeds)[0], make_session(expected).run(None, feeds)[0],
                               rtol=1e-5, atol=1e-5)


def _const(name, values):
    import onnx_graphsurgeon as gs
    return gs.Constant(f"{name}.dense", values.astype(np.float32))


def test_shiftadd_survives_save_and_load(tmp_path):
    model = _canonical(mlp_model())
    calib = random_calibration(model, 4)
    result, _ = _run(model, "shiftadd(bits=3,layout=block,group_size=32,min_size=0)", calib)
    path = tmp_path / "m.onnx"
    io.save(result, path)
    loaded = io.load(path)
    for before, after in zip(result.quantized_nodes(), loaded.quantized_nodes(), strict=True):
        w0, w1 = qops.read_weight(before), qops.read_weight(after)
        np.testing.assert_array_equal(w0.planes, w1.planes)
        np.testing.assert_array_equal(w0.alphas, w1.alphas)
        np.testing.assert_array_equal(w0.dequantize(), w1.dequantize())
    feeds = mlp_feeds()
    np.testing.assert_array_equal(make_session(result).run(None, feeds)[0], make_session(loaded).run(None, feeds)[0])


def test_shiftadd_twice_changes_nothing_the_second_time():
    model = _canonical(mlp_model())
    calib = random_calibration(model, 4)
    once, (first,) = _run(model, "shiftadd(min_size=0)", calib)
    _, (second,) = _run(once, "shiftadd(min_size=0)", calib)
    assert first.changed and not second.changed


def test_shiftadd_needs_calibration():
    with pytest.raises(UsageError, match="calibration"):
        _run(_canonical(mlp_model()), "shiftadd", None)


def test_shiftadd_conv_model():
    model = _canonical(cnn_model())
    calib = CalibrationSet(cnn_feeds(3), "test")
    result, (record,) = _run(model, "shiftadd(bits=4,table_group=16,min_size=0)", calib)
    assert any(n.op == "QConv" for n in result.graph.nodes)
    for name, error in record.output_error.items():
        assert error["cosine"] > 0.97, name


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("layout", ["column", "block"])
def test_gptq_fit_beats_plain_greedy_bcq_on_correlated_inputs(bits, layout):
    rng = np.random.default_rng(bits)
    inputs = _correlated_inputs(rng)
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    hessian = inputs.astype(np.float64).T @ inputs
    identity = np.eye(64)
    greedy = bcq_gptq(weight, identity, bits, layout=layout, group_size=32, rounds=0, act_order=False)
    als = bcq_gptq(weight, identity, bits, layout=layout, group_size=32)
    fitted = bcq_gptq(weight, hessian, bits, layout=layout, group_size=32)
    assert np.square(als.dequantize() - weight).sum() < np.square(greedy.dequantize() - weight).sum()
    assert _output_error(inputs, weight, fitted.dequantize()) < 0.5 * _output_error(inputs, weight,
                                                                                     greedy.dequantize())


@pytest.mark.parametrize("outliers", [0.0, 0.05])
def test_row_layout_walk_keeps_row_wise_alphas_and_beats_the_row_wise_fit_on_the_output(outliers):
    """layout=row (a table tied to an LM head): alphas per row and column group, as QGather needs,
    fitted in the GPTQ walk: much lower output error than fitting each row's groups alone."""
    rng = np.random.default_rng(7)
    inputs = _correlated_inputs(rng)
    weight = rng.standard_normal((48, 64)).astype(np.float32)
    hessian = inputs.astype(np.float64).T @ inputs
    walked = bcq_gptq(weight, hessian, 3, layout="row", group_size=32, outliers=outliers)
    plain = bcq_rowwise(weight, 3, col_group=32, outliers=outliers)
    assert (walked.row_group, walked.col_group) == (1, 32)
    assert walked.nbytes == plain.nbytes
    assert _output_error(inputs, weight, walked.dequantize()) < 0.5 * _output_error(inputs, weight, plain.dequantize())


def test_more_planes_fit_better():
    weight = np.random.default_rng(0).standard_normal((40, 96)).astype(np.float32)
    errors = [np.square(bcq_rowwise(weight, bits, col_group=32).dequantize() - weight).sum() for bits in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True)


def test_row_chunks_do_not_change_the_fit():
    rng = np.random.default_rng(3)
    inputs = _correlated_inputs(rng, cols=48)
    weight = rng.standard_normal((70, 48)).astype(np.float32)
    hessian = inputs.astype(np.float64).T @ inputs
    whole = bcq_gptq(weight, hessian, 3, group_size=16, block_size=16)
    chunked = bcq_gptq(weight, hessian, 3, group_size=16, block_size=16, row_chunk=20)
    np.testing.assert_array_equal(whole.planes, chunked.planes)
    np.testing.assert_array_equal(whole.alphas, chunked.alphas)
