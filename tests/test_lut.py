"""The lookup-table (query, look-up, shift, add) reference equals dequantize-and-MatMul."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.ir import lut
from qcompile.passes.bcqfit import bcq_gptq, bcq_rowwise


def _weights(rows, cols, bits, seed):
    rng = np.random.default_rng(seed)
    matrix = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    inputs = rng.standard_normal((256, cols))
    hessian = inputs.T @ inputs
    return {
        "block": bcq_gptq(matrix, hessian, bits, layout="block", group_size=16),
        "column": bcq_gptq(matrix, hessian, bits, layout="column", group_size=16),
        "row": bcq_rowwise(matrix, bits, col_group=16),
    }


def test_tables_hold_every_signed_sum():
    x = np.random.default_rng(0).standard_normal((3, 16))
    tables = lut.build_tables(x)
    patterns = ((np.arange(256)[:, None] >> np.arange(8)) & 1) * 2 - 1
    np.testing.assert_allclose(tables, x.reshape(3, 2, 8) @ patterns.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["block", "column", "row"])
@pytest.mark.parametrize("cols", [64, 44])
def test_lut_is_bit_exact_when_sums_are_exact(bits, layout, cols):
    """Integer activations in float64: no addition rounds, so any order gives the same bits."""
    weight = _weights(40, cols, bits, bits)[layout]
    x = np.random.default_rng(1).integers(-8, 9, size=(5, cols)).astype(np.float64)
    np.testing.assert_array_equal(lut.lut_matmul(x, weight, np.float64), lut.dense_matmul(x, weight, np.float64))


@pytest.mark.parametrize("layout", ["block", "column", "row"])
def test_lut_matches_to_float32_round_off(layout):
    weight = _weights(48, 96, 3, 7)[layout]
    x = np.random.default_rng(2).standard_normal((6, 96)).astype(np.float32)
    got, expected = lut.lut_matmul(x, weight), lut.dense_matmul(x, weight)
    bound = 96 * 4 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(weight.dequantize()).T)
    assert np.all(np.abs(got - expected) <= bound)


def test_shift_add_multiplies_by_apot_alphas():
    codes = np.array([[64 + 1, -(64 - 2), 0]], np.int8)  # 2 - 0.25 = 1.75
    np.testing.assert_array_equal(lut.shift_add(np.array([4.0]), codes), [7.0])
