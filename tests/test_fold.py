"""fold: BatchNorm folding and SmoothQuant/OutlierTune migration are exact."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.runtime import make_session
from qcompile.passes.calibration import CalibrationSet
from qcompile.passes.context import PassContext
from qcompile.passes.manager import PassManager
from qcompile.passes.registry import parse_pipeline


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def conv_bn_model(seed=0, with_bias=True, linear="Conv"):
    rng = np.random.default_rng(seed)
    inits = [
        _init("bn_scale", rng.uniform(0.5, 2, 8)), _init("bn_bias", rng.standard_normal(8)),
        _init("bn_mean", rng.standard_normal(8)), _init("bn_var", rng.uniform(0.5, 3, 8)),
    ]
    if linear == "Conv":
        inits.append(_init("w", rng.standard_normal((8, 3, 3, 3))))
        inputs = ["x", "w"] + (["b"] if with_bias else [])
        if with_bias:
            inits.append(_init("b", rng.standard_normal(8)))
        layer = helper.make_node("Conv", inputs, ["c"], name="conv", pads=[1, 1, 1, 1])
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])
        y_shape = ["n", 8, 6, 6]
    else:
        inits.append(_init("w", rng.standard_normal((5, 8))))
        layer = helper.make_node("MatMul", ["x", "w"], ["c"], name="fc")
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])
        y_shape = ["n", 8]
    nodes = [layer, helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                                     ["y"], name="bn", epsilon=1e-3)]
    return make_model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)


def pre_ln_block(seed=0, residual=False, hidden=16, outlier=30.0):
    """LayerNorm -> (Q, K, V MatMul + bias) -> sum; optionally a residual Add from the LN output."""
    rng = np.random.default_rng(seed)
    beta = rng.standard_normal(hidden)
    beta[3] = outlier  # an outlier channel, as in real transformers
    inits = [_init("gamma", rng.uniform(0.5, 2, hidden)), _init("beta", beta)]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1)]
    outs = []
    for name in ("q", "k", "v"):
        inits += [_init(f"w_{name}", rng.standard_normal((hidden, hidden)) / 4), _init(f"b_{name}", rng.standard_normal(hidden))]
        nodes += [helper.make_node("MatMul", ["ln", f"w_{name}"], [f"{name}_mm"], name=f"{name}_proj"),
                  helper.make_node("Add", [f"{name}_mm", f"b_{name}"], [name], name=f"{name}_bias")]
        outs.append(name)
    nodes += [helper.make_node("Add", ["q", "k"], ["qk"], name="sum1"), helper.make_node("Add", ["qk", "v"], ["y"], name="sum2")]
    if residual:
        nodes.append(helper.make_node("Add", ["y", "ln"], ["y2"], name="residual"))
    out = "y2" if residual else "y"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, hidden])
    return make_model(nodes, [x], [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 4, hidden])], inits)


def _run_fold(proto, spec="fold", feeds=None):
    model = canonicalize(Model.from_proto(proto))
    calib = CalibrationSet(feeds, "test") if feeds else None
    manager = PassManager(parse_pipeline(spec), verify_exact=True, eval_samples=calib)
    result, (record,) = manager.run(model, PassContext(calib=calib))
    return model, result, record


def _assert_same_outputs(before, after, feeds):
    expected = make_session(before).run(None, feeds)
    actual = make_session(after).run(None, feeds)
    for e, a in zip(expected, actual, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("linear, with_bias", [("Conv", True), ("Conv", False), ("MatMul", False)])
def test_batchnorm_folds_exactly(linear, with_bias):
    proto = conv_bn_model(with_bias=with_bias, linear=linear)
    shape = (2, 3, 6, 6) if linear == "Conv" else (4, 5)
    feeds = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    before, after, record = _run_fold(proto, feeds=feeds)
    assert "BatchNormalization" not in [n.op for n in after.graph.nodes]
    assert record.changed and record.stats["batchnorm"]
    _assert_same_outputs(before, after, feeds)


def _block_feeds(n=6, hidden=16, seed=2):
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, hidden)).astype(np.float32) * 3}


@pytest.mark.parametrize("spec", ["fold", "fold(alpha=0.8)", "fold(shift=true)", "fold(pow2=true)",
                                  "fold(shift=true,pow2=true,alpha=0.3)"])
def test_smoothquant_is_exact_and_tames_outliers(spec):
    feeds = _block_feeds()
    before, after, record = _run_fold(pre_ln_block(), spec, feeds)
    _assert_same_outputs(before, after, feeds)
    smoothed = record.stats["smoothed"]["ln"]
    assert smoothed["consumers"] == ["q_proj", "k_proj", "v_proj"]
    assert smoothed["activation_absmax_after"] < smoothed["activation_absmax_before"]
    assert record.output_error["y"]["cosine"] > 0.999999
    if "pow2=true" in spec:
        gamma = next(t for name, t in after.tensors().items() if name.endswith(".smoothed") and "gamma" in name)
        ratio = np.asarray(before.tensors()["gamma"].values) / np.asarray(gamma.values)
        np.testing.assert_allclose(np.log2(ratio), np.round(np.log2(ratio)), atol=1e-5)


def test_shift_adds_biases_through_consumers():
    feeds = _block_feeds()
    before, after, record = _run_fold(pre_ln_block(), "fold(shift=true)", feeds)
    rows = make_session(after, extra_outputs=["ln"]).run(["ln"], feeds)[0].reshape(-1, 16)
    centres = (rows.max(0) + rows.min(0)) / 2
    assert np.abs(centres).max() < 1e-3  # every channel is centred on the calibration data
    assert record.stats["smoothed"]["ln"]["consumers"] == ["q_proj", "k_proj", "v_proj"]
    biases = {name: np.asarray(t.values) for name, t in after.tensors().items() if name.endswith(".bias_folded")}
    assert len(biases) == 3


def test_residual_consumers_block_smoothing_with_a_reason():
    _, after, record = _run_fold(pre_ln_block(residual=True), "fold(compensate=false)", _block_feeds())
    assert not record.changed
    assert "residual" in record.stats["skipped"]["ln"] and "compensate=true" in record.stats["skipped"]["ln"]


@pytest.mark.parametrize("spec", ["fold", "fold(shift=true)", "fold(shift=true,pow2=true)"])
def test_residual_readers_get_the_original_values_back(spec):
    feeds = _block_feeds()
    before, after, record = _run_fold(pre_ln_block(residual=True), spec, feeds)
    assert record.stats["smoothed"]["ln"]["compensated"] == ["residual"]
    _assert_same_outputs(before, after, feeds)


def test_fold_twice_changes_nothing_the_second_time():
    feeds = _block_feeds()
    _, once, first = _run_fold(pre_ln_block(), "fold", feeds)
    calib = CalibrationSet(feeds, "t")
    _, (second,) = PassManager(parse_pipeline("fold"), eval_samples=calib).run(once, PassContext(calib=calib))
    assert first.changed and not second.changed
    assert second.stats["skipped"]["ln"] == "already smoothed by an earlier fold"


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), hidden=st.sampled_from([8, 16, 24]), alpha=st.floats(0.0, 1.0),
       shift=st.booleans(), pow2=st.booleans(), outlier=st.floats(0.0, 100.0))
def test_property_smoothing_random_blocks_stays_exact(seed, hidden, alpha, shift, pow2, outlier):
    feeds = _block_feeds(n=3, hidden=hidden, seed=seed)
    spec = f"fold(alpha={alpha},shift={str(shift).lower()},pow2={str(pow2).lower()})"
    before, after, _ = _run_fold(pre_ln_block(seed, residual=seed % 2 == 0, hidden=hidden, outlier=outlier),
                                 spec, feeds)
    _assert_same_outputs(before, after, feeds)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), with_bias=st.booleans(), linear=st.sampled_from(["Conv", "MatMul"]))
def test_property_batchnorm_random_stays_exact(seed, with_bias, linear):
    proto = conv_bn_model(seed, with_bias=with_bias, linear=linear)
    shape = (2, 3, 6, 6) if linear == "Conv" else (3, 5)
    feeds = {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
    before, after, _ = _run_fold(proto, feeds=feeds)
    _assert_same_outputs(before, after, feeds)


def test_torch_conv_batchnorm_exported_unfolded_is_folded_exactly(tmp_path):
    import onnx
    import torch

    from qcompile.frontends.torch import export_module

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    module[1].running_mean.uniform_(-1, 1)
    module[1].running_var.uniform_(0.5, 2)
    path = export_module(module.eval(), torch.randn(1, 3, 6, 6), tmp_path / "m.onnx", input_names=["x"],
                         output_names=["y"], dynamic_axes={"x": {0: "n"}}, fold=False)
    assert "BatchNormalization" in [n.op_type for n in onnx.load(path).graph.node]
    proto = onnx.load(path)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    before, after, record = _run_fold(proto, feeds=feeds)
    assert record.stats["batchnorm"] and "BatchNormalization" not in [n.op for n in after.graph.nodes]
    _assert_same_outputs(before, after, feeds)
