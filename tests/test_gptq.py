"""GPTQ: error feedback beats round-to-nearest when inputs are correlated."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mlp_model

from qcompile.errors import UsageError
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.qformat import quantize_int
from qcompile.passes.calibration import random_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.gptq import gptq_quantize, inverse_hessian_factor
from qcompile.passes.manager import PassManager
from qcompile.passes.registry import parse_pipeline


def _output_error(inputs, weight, recon):
    return float(np.square(inputs @ weight.T - inputs @ recon.T).sum())


def _correlated_inputs(rng, rows=2048, cols=64, rank=6):
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
            + 0.05 * rng.standard_normal((rows, cols))).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    rng = np.random.default_rng(bits)
    inputs = _correlated_inputs(rng)
    weight = rng.standard_normal((48, 64)).astype(np.float32)
    hessian = inputs.astype(np.float64).T @ inputs
    rtn = quantize_int(weight, bits, 32, importance=np.diag(hessian)).dequantize()
    gptq = gptq_quantize(weight, hessian, bits=bits, group_size=32, act_order=act_order)
    assert gptq.bits == bits and gptq.dequantize().shape == weight.shape
    assert _output_error(inputs, weight, gptq.dequantize()) < 0.6 * _output_error(inputs, weight, rtn)


def test_gptq_row_chunks_do_not_change_the_result():
    rng = np.random.default_rng(0)
    inputs = _correlated_inputs(rng, cols=96)
    weight = rng.standard_normal((40, 96)).astype(np.float32)
    hessian = inputs.astype(np.float64).T @ inputs
    whole = gptq_quantize(weight, hessian, bits=3, group_size=32, block_size=32)
    chunked = gptq_quantize(weight, hessian, bits=3, group_size=32, block_size=32, row_chunk=7)
    np.testing.assert_array_equal(whole.packed, chunked.packed)


def test_inverse_hessian_factor_is_upper_cholesky_of_the_damped_inverse():
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((200, 16))
    hessian = inputs.T @ inputs
    factor = inverse_hessian_factor(hessian, 0.01)
    damped = hessian + np.eye(16) * 0.01 * np.mean(np.diag(hessian))
    assert np.allclose(np.triu(factor), factor)
    np.testing.assert_allclose(factor.T @ factor, np.linalg.inv(damped), rtol=1e-8, atol=1e-10)


def test_dead_input_columns_are_handled():
    rng = np.random.default_rng(2)
    inputs = _correlated_inputs(rng, cols=32)
    inputs[:, 5] = 0.0
    hessian = inputs.astype(np.float64).T @ inputs
    result = gptq_quantize(rng.standard_normal((8, 32)).astype(np.float32), hessian, bits=4, group_size=32)
    assert np.isfinite(result.dequantize()).all()


def test_quant_gptq_needs_calibration_and_reports_layer_errors():
    model = canonicalize(Model.from_proto(mlp_model()))
    with pytest.raises(UsageError, match="needs calibration data"):
        PassManager(parse_pipeline("quant(method=gptq)")).run(model, PassContext())
    calib = random_calibration(model, 8)
    result, (record,) = PassManager(parse_pipeline("quant(method=gptq,bits=3,min_size=0)"),
                                    eval_samples=calib).run(model, PassContext(calib=calib))
    fc1 = record.stats["layers"]["fc1"]
    assert fc1["output_cosine"] > 0.95 and fc1["output_sqnr_db"] > 10
    assert record.stats["activation_statistics"] == "calibration"
    rtn, (rtn_record,) = PassManager(parse_pipeline("quant(bits=3,min_size=0)"),
                                     eval_samples=calib).run(model, PassContext(calib=calib))
    assert fc1["output_sqnr_db"] > rtn_record.stats["layers"]["fc1"]["output_sqnr_db"]


def test_output_stats_of_a_huge_layer_come_from_evenly_spaced_channels(monkeypatch):
    """Past the flop limit the layer-output SQNR is taken over a subset of output channels, says
    so, and stays close to the exact value."""
    from qcompile.passes import layers

    rng = np.random.default_rng(3)
    inputs = _correlated_inputs(rng, cols=64)
    gram = inputs.astype(np.float64).T @ inputs
    weight = rng.standard_normal((512, 64))
    recon = weight + 0.05 * rng.standard_normal(weight.shape)
    exact = layers.output_error(weight, recon, gram)
    assert "output_channels_sampled" not in exact
    monkeypatch.setattr(layers, "MAX_OUTPUT_STATS_FLOPS", 2 * 512 * 64 * 64 / 8)
    sampled = layers.output_error(weight, recon, gram)
    assert sampled["output_channels_sampled"] == 64
    assert sampled["output_sqnr_db"] == pytest.approx(exact["output_sqnr_db"], abs=0.5)
