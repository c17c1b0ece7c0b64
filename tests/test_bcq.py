"""The bcq format: packing, APoT alphas, reference functions in ONNX Runtime vs NumPy."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import VerificationError
from qcompile.ir import bcq, qops
from qcompile.ir.model import Model
from qcompile.ir.runtime import make_session
from qcompile.ir.verify import verify
from qcompile.passes.bcqfit import apot_codes, apot_round, bcq_gptq, bcq_rowwise, fit_bcq


def _single_node_model(op, attrs, inputs, output_shape, graph_inputs):
    output = gs.Variable("y", np.float32, output_shape)
    node = gs.Node(op, "layer", attrs, inputs, [output], domain=qops.DOMAIN)
    model = Model(gs.Graph(nodes=[node], inputs=graph_inputs, outputs=[output], opset=17))
    verify(model)
    return model


def _is_apot(value: float, terms: int) -> bool:
    """Exact check by integer arithmetic: ``value * 2^k`` is an integer with at most ``terms``
    nonzero digits in canonical signed-digit form (the fewest signed powers of two)."""
    mantissa, exponent = np.frexp(value)
    scaled = int(mantissa * 2**53)
    digits = 0
    while scaled:
        if scaled & 1:
            digit = 2 - (scaled & 3)  # +1 or -1 (non-adjacent form)
            scaled -= digit
            digits += 1
        scaled >>= 1
    return digits <= terms


@pytest.mark.parametrize("terms", [1, 2, 3, 4])
def test_every_rounded_alpha_is_an_exact_sum_of_terms_powers_of_two(terms):
    rng = np.random.default_rng(terms)
    alphas = np.abs(rng.standard_normal(2000)) * 10.0 ** rng.uniform(-6, 1, 2000)
    rounded = apot_round(alphas, terms)
    codes = apot_codes(alphas, terms)
    assert codes.dtype == np.int8 and codes.shape == (2000, terms)
    np.testing.assert_array_equal(bcq.decode_alphas(codes), rounded.astype(np.float32))
    assert all(_is_apot(float(v), terms) for v in rounded)
    # more terms never round worse
    if terms > 1:
        assert np.all(np.abs(apot_round(alphas, terms) - alphas) <= np.abs(apot_round(alphas, terms - 1) - alphas))


@pytest.mark.parametrize("layout", ["column", "block"])
def test_stored_alphas_of_fitted_layers_are_apot(layout):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((40, 72)) * 0.02).astype(np.float32)
    inputs = rng.standard_normal((300, 72))
    fitted = bcq_gptq(weight, inputs.T @ inputs, 3, terms=2, layout=layout, group_size=16)
    values = bcq.decode_alphas(fitted.alphas).reshape(-1)
    assert fitted.alphas.shape == (3, 72 if layout == "column" else 9, 3, 2)
    assert all(_is_apot(float(v), 2) for v in values)
    assert np.all(values >= 0)


@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_planes_round_trip_through_packing(bits, cols, rows, seed):
    signs = np.random.default_rng(seed).random((rows, bits, cols)) > 0.5
    planes = bcq.pack_planes(signs)
    assert planes.dtype == np.uint8 and planes.shape == (rows, bits, -(-cols // 8))
    np.testing.assert_array_equal(bcq.unpack_planes(planes, cols).astype(bool), signs)


def test_packing_is_lowest_bit_first():
    signs = np.zeros((1, 1, 8), bool)
    signs[0, 0, [0, 3]] = True
    assert bcq.pack_planes(signs)[0, 0, 0] == 0b1001


def _weight(rows=24, cols=40, bits=3, row_group=1, col_group=16, seed=0) -> bcq.BCQWeight:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((rows, cols)).astype(np.float32)
    if row_group == 1:
        return bcq_rowwise(matrix, bits, col_group=col_group)
    inputs = rng.standard_normal((200, cols))
    return bcq_gptq(matrix, inputs.T @ inputs, bits, group_size=row_group, layout="block" if col_group == 8 else "column")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("groups", [(1, 16), (8, 1), (8, 8), (24, 8)])
def test_qmatmul_reference_equals_numpy_dequantize(bits, groups):
    weight = _weight(bits=bits, row_group=groups[0], col_group=groups[1], seed=bits)
    x = gs.Variable("x", np.float32, [2, 3, 40])
    model = _single_node_model("QMatMul", qops.format_attributes(weight), [x, *qops.weight_constants("w", weight)],
                               [2, 3, 24], [x])
    feed = np.random.default_rng(1).standard_normal((2, 3, 40)).astype(np.float32)
    (out,) = make_session(model).run(None, {"x": feed})
    np.testing.assert_allclose(out, feed @ weight.dequantize().T, rtol=1e-5, atol=1e-5)
    # the decoded weight itself, bit for bit: x = identity rows
    (dense,) = make_session(model).run(None, {"x": np.eye(40, dtype=np.float32)[None].repeat(2, 0)[:, :3] * 0
                                               + np.eye(40, dtype=np.float32)[:3][None]})
    np.testing.assert_array_equal(dense[0], weight.dequantize()[:, :3].T)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_qgather_reference_equals_numpy_dequantize(bits):
    table = _weight(rows=50, cols=48, bits=bits, col_group=16, seed=bits)
    ids = gs.Variable("ids", np.int64, [2, 5])
    planes, alphas = qops.weight_constants("emb", table)
    model = _single_node_model("QGather", qops.format_attributes(table), [planes, ids, alphas], [2, 5, 48], [ids])
    feed = np.random.default_rng(bits).integers(0, 50, size=(2, 5))
    (out,) = make_session(model).run(None, {"ids": feed})
    np.testing.assert_array_equal(out, table.dequantize()[feed])


def test_qconv_reference_equals_numpy_dequantize():
    rng = np.random.default_rng(2)
    kernel = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    weight = bcq_rowwise(kernel.reshape(8, -1), 3, col_group=8)
    bias = rng.standard_normal(8).astype(np.float32)
    x = gs.Variable("x", np.float32, [1, 4, 9, 9])
    attrs = {**qops.format_attributes(weight), "weight_shape": [8, 2, 3, 3], "group": 2, "strides": [2, 2],
             "pads": [1, 1, 1, 1]}
    model = _single_node_model("QConv", attrs, [x, *qops.weight_constants("k", weight), gs.Constant("b", bias)],
                               [1, 8, 5, 5], [x])
    feed = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
    (out,) = make_session(model).run(None, {"x": feed})
    expected = torch.nn.functional.conv2d(torch.tensor(feed), torch.tensor(weight.dequantize().reshape(8, 2, 3, 3)),
                                          torch.tensor(bias), stride=2, padding=1, groups=2).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_weight_round_trips_through_a_saved_model():
    weight = _weight(row_group=8, col_group=8)
    x = gs.Variable("x", np.float32, [1, 40])
    model = _single_node_model("QMatMul", qops.format_attributes(weight), [x, *qops.weight_constants("w", weight)],
                               [1, 24], [x])
    read = qops.read_weight(Model.from_proto(model.to_proto()).quantized_nodes()[0])
    assert isinstance(read, bcq.BCQWeight)
    np.testing.assert_array_equal(read.planes, weight.planes)
    np.testing.assert_array_equal(read.alphas, weight.alphas)
    assert (read.bits, read.row_group, read.col_group, read.cols) == (3, 8, 8, 40)
    assert read.nbytes == 24 * 3 * 5 + 3 * 5 * 3 * 3


def test_check_names_what_is_wrong():
    weight = _weight()
    x = gs.Variable("x", np.float32, [1, 40])
    planes, alphas = qops.weight_constants("w", weight)
    bad = gs.Constant("w.alphas", alphas.values[:, :1].copy())
    with pytest.raises(VerificationError, match="alphas are int8"):
        _single_node_model("QMatMul", qops.format_attributes(weight), [x, planes, bad], [1, 24], [x])
    attrs = {**qops.format_attributes(weight), "cols": 99}
    with pytest.raises(VerificationError, match="planes are uint8"):
        _single_node_model("QMatMul", attrs, [x, planes, alphas], [1, 24], [x])


def test_fit_weights_steer_the_error():
    """Weighted fitting puts the error where the weights are small."""
    rng = np.random.default_rng(5)
    values = rng.standard_normal((200, 32))
    weights = np.ones(32)
    weights[:8] = 100.0
    plain = fit_bcq(values, 2)
    steered = fit_bcq(values, 2, weights=weights)
    def err(fit):
        return np.square(values - fit.reconstruct())[:, :8].sum()
    assert err(steered) < 0.7 * err(plain)
