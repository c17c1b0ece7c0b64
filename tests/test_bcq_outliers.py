"""The bcq_outliers format (bcq + sparse APoT corrections) and the outlier fit behind shiftadd."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import mlp_feeds, mlp_model
from test_bcq import _is_apot, _single_node_model

from qcompile.errors import VerificationError
from qcompile.ir import bcq, io, lut, qops
from qcompile.ir.bcq_outliers import BCQOutlierWeight
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.runtime import make_session
from qcompile.passes import registry
from qcompile.passes.bcqfit import bcq_gptq, bcq_rowwise, outliers_per_row
from qcompile.passes.calibration import random_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.layers import output_error
from qcompile.passes.manager import PassManager


def _heavy_tailed(rng, rows, cols):
    """Gaussian weights with a few large ones, as in trained transformers."""
    matrix = rng.standard_normal((rows, cols)) * 0.05
    spikes = rng.random((rows, cols)) < 0.01
    return np.where(spikes, matrix * 12.0, matrix).astype(np.float32)


def _fitted(kind="column", rows=48, cols=40, bits=3, seed=0, outliers=0.05):
    rng = np.random.default_rng(seed)
    matrix = _heavy_tailed(rng, rows, cols)
    if kind == "row":
        return bcq_rowwise(matrix, bits, col_group=8, outliers=outliers)
    inputs = rng.standard_normal((300, cols))
    return bcq_gptq(matrix, inputs.T @ inputs, bits, group_size=16, layout=kind, outliers=outliers,
                    outlier_terms=2)


def _matmul_model(weight, batch=(2, 3)):
    x = gs.Variable("x", np.float32, [*batch, weight.cols])
    return _single_node_model("QMatMul", qops.format_attributes(weight), [x, *qops.weight_constants("w", weight)],
                              [*batch, weight.rows], [x])


@pytest.mark.parametrize("kind", ["column", "block", "row"])
def test_reference_function_equals_numpy_dequantize(kind):
    weight = _fitted(kind)
    assert isinstance(weight, BCQOutlierWeight) and weight.per_row == outliers_per_row(0.05, 40) == 2
    model = _matmul_model(weight)
    feed = np.random.default_rng(1).standard_normal((2, 3, 40)).astype(np.float32)
    (out,) = make_session(model).run(None, {"x": feed})
    np.testing.assert_allclose(out, feed @ weight.dequantize().T, rtol=1e-5, atol=1e-5)
    # the decoded matrix bit for bit: identity rows pick its columns
    (dense,) = make_session(_matmul_model(weight, (40,))).run(None, {"x": np.eye(40, dtype=np.float32)})
    np.testing.assert_array_equal(dense.T, weight.dequantize())
    # the corrections really are there: the dense part alone differs exactly at them
    differs = weight.dense.dequantize() != weight.dequantize()
    assert differs.sum() > 0 and np.all(weight.sparse()[differs] != 0)


def test_qgather_reference_equals_numpy_dequantize():
    table = _fitted("row", rows=50, cols=48, outliers=0.03)
    ids = gs.Variable("ids", np.int64, [2, 5])
    first, *rest = qops.weight_constants("emb", table)
    model = _single_node_model("QGather", qops.format_attributes(table), [first, ids, *rest], [2, 5, 48], [ids])
    feed = np.random.default_rng(3).integers(0, 50, size=(2, 5))
    (out,) = make_session(model).run(None, {"ids": feed})
    np.testing.assert_array_equal(out, table.dequantize()[feed])


def test_corrections_are_exact_apot_values_and_round_trip_through_a_file(tmp_path):
    weight = _fitted("column")
    assert weight.outlier_values.shape == (48, 2, 2) and weight.outlier_cols.dtype == np.uint16
    assert all(_is_apot(float(v), 2) for v in weight.corrections().reshape(-1))
    np.testing.assert_array_equal(weight.corrections(), bcq.decode_alphas(weight.outlier_values))
    assert np.all(np.diff(weight.outlier_cols.astype(np.int64), axis=1) > 0)
    path = tmp_path / "m.onnx"
    io.save(_matmul_model(weight), path)
    read = qops.read_weight(io.load(path).quantized_nodes()[0])
    assert isinstance(read, BCQOutlierWeight)
    for name in ("planes", "alphas", "outlier_cols", "outlier_values"):
        np.testing.assert_array_equal(getattr(read, name), getattr(weight, name))
    assert read.nbytes == weight.dense.nbytes + 48 * 2 * 2 + 48 * 2 * 2
    np.testing.assert_array_equal(read.dequantize(), weight.dequantize())


@pytest.mark.parametrize("kind", ["column", "block"])
@pytest.mark.parametrize("bits", [2, 3])
def test_outliers_never_raise_the_weighted_error(kind, bits):
    """On a seeded heavy-tailed layer: the layer-output error (from X^T X) with outliers is
    no larger than without, and larger outlier fractions help further."""
    rng = np.random.default_rng(bits)
    matrix = _heavy_tailed(rng, 64, 64)
    inputs = rng.standard_normal((500, 64)) @ (np.eye(64) + 0.3 * rng.standard_normal((64, 64)))
    hessian = inputs.T @ inputs
    sqnr = [output_error(matrix.astype(np.float64),
                         bcq_gptq(matrix, hessian, bits, group_size=16, layout=kind, outliers=fraction)
                         .dequantize().astype(np.float64), hessian)["output_sqnr_db"]
            for fraction in (0.0, 0.02, 0.05)]
    assert sqnr[0] < sqnr[1] < sqnr[2]


def test_rowwise_outliers_lower_the_error():
    rng = np.random.default_rng(4)
    matrix = _heavy_tailed(rng, 64, 96)
    errors = [np.square(matrix - bcq_rowwise(matrix, 2, col_group=32, outliers=f).dequantize()).sum()
              for f in (0.0, 0.03)]
    assert errors[1] < errors[0]


def test_lut_reference_adds_the_corrections_exactly():
    for kind in ("column", "block", "row"):
        weight = _fitted(kind, cols=64)
        x = np.random.default_rng(1).integers(-8, 9, size=(5, 64)).astype(np.float64)
        np.testing.assert_array_equal(lut.lut_matmul(x, weight, np.float64), lut.dense_matmul(x, weight, np.float64))


def test_check_names_what_is_wrong():
    weight = _fitted("column")
    x = gs.Variable("x", np.float32, [1, 40])
    planes, alphas, cols, values = qops.weight_constants("w", weight)
    unsorted = cols.values[:, ::-1].copy()
    with pytest.raises(VerificationError, match="strictly increasing"):
        _single_node_model("QMatMul", qops.format_attributes(weight),
                           [x, planes, alphas, gs.Constant("w.oc", unsorted), values], [1, 48], [x])
    with pytest.raises(VerificationError, match="outlier_values are int8"):
        _single_node_model("QMatMul", qops.format_attributes(weight),
                           [x, planes, alphas, cols, gs.Constant("w.ov", values.values[:, :1].copy())], [1, 48], [x])


def test_shiftadd_outliers_option_runs_in_onnx_runtime():
    model = canonicalize(Model.from_proto(mlp_model()))
    calib = random_calibration(model, 4)
    runs = {}
    for fraction in (0.0, 0.05):
        manager = PassManager(registry.parse_pipeline(f"shiftadd(bits=2,group_size=32,min_size=0,outliers={fraction})"),
                              eval_samples=calib)
        result, (record,) = manager.run(model.copy(), PassContext(calib=calib))
        runs[fraction] = (result, record)
    plain, with_outliers = runs[0.0][0], runs[0.05][0]
    assert {n.attrs["format"] for n in plain.quantized_nodes()} == {"bcq"}
    assert {n.attrs["format"] for n in with_outliers.quantized_nodes()} == {"bcq_outliers"}
    stats = runs[0.05][1].stats
    assert stats["outliers"] > 0 and stats["weight_bytes"] > runs[0.0][1].stats["weight_bytes"]
    assert all(layer["outlier_bytes"] > 0 for layer in stats["layers"].values())
    out = make_session(with_outliers).run(None, mlp_feeds())[0]
    assert np.isfinite(out).all()


def test_bits_max_mb_counts_the_outlier_corrections():
    """The same byte budget leaves fewer plane bits when outliers' corrections are counted."""
    model = canonicalize(Model.from_proto(mlp_model()))
    calib = random_calibration(model, 4)
    averages = {}
    for fraction in (0.0, 0.1):
        manager = PassManager(registry.parse_pipeline(f"bits(max_mb=0.03,outliers={fraction},min_size=0)"),
                              eval_samples=calib)
        _, (record,) = manager.run(model.copy(), PassContext(calib=calib))
        plan = record.stats["plan"]
        assert plan["model_mb"] <= 0.03
        averages[fraction] = plan["average_bits"]
    assert averages[0.1] < averages[0.0]
