"""Activation sparsity (Sparsing Law's CETT) of feed-forward layers, and `qcompile inspect --calib`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
from conftest import make_model, mlp_model
from onnx import TensorProto, helper, numpy_helper

from qcompile.activations import activation_sparsity, cett_sparsity, ffn_layers
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.passes.calibration import CalibrationSet, random_calibration


def _ffn(activation: str) -> onnx.ModelProto:
    """x -> MatMul(up) -> activation (as exporters write it) -> MatMul(down)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((32, 128)) / 5).astype(np.float32), "up"),
             numpy_helper.from_array((rng.standard_normal((128, 32)) / 11).astype(np.float32), "down"),
             numpy_helper.from_array(np.array(1.4142135, np.float32), "sqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("MatMul", ["x", "up"], ["h"], name="up")]
    if activation == "gelu":  # the erf form torch.onnx writes
        nodes += [helper.make_node("Div", ["h", "sqrt2"], ["d"], name="div"),
                  helper.make_node("Erf", ["d"], ["e"], name="erf"),
                  helper.make_node("Add", ["e", "one"], ["e1"], name="add"),
                  helper.make_node("Mul", ["h", "e1"], ["m"], name="mul"),
                  helper.make_node("Mul", ["m", "half"], ["a"], name="gelu")]
    else:  # silu
        nodes += [helper.make_node("Sigmoid", ["h"], ["s"], name="sigmoid"),
                  helper.make_node("Mul", ["h", "s"], ["a"], name="silu")]
    nodes.append(helper.make_node("MatMul", ["a", "down"], ["y"], name="down"))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])], inits)


def _samples(n: int = 64) -> CalibrationSet:
    return CalibrationSet({"x": np.random.default_rng(1).standard_normal((n, 32)).astype(np.float32)}, "test")


def test_ffn_layers_are_found_behind_each_activation_form():
    relu = canonicalize(Model.from_proto(mlp_model()))
    assert {name: kind for name, (_, kind) in ffn_layers(relu).items()} == {"fc2": "relu"}
    for kind in ("gelu", "silu"):
        model = Model.from_proto(_ffn(kind))
        assert {name: k for name, (_, k) in ffn_layers(model).items()} == {"down": kind}


def test_relu_is_sparser_than_gelu_and_cett_bounds_the_truncation():
    relu = canonicalize(Model.from_proto(mlp_model()))
    report = activation_sparsity(relu, random_calibration(relu, 16))["fc2"]
    assert report["zero_fraction"] > 0.2 and report["cett_sparsity"] >= report["zero_fraction"]
    gelu = activation_sparsity(Model.from_proto(_ffn("gelu")), _samples())["down"]
    assert gelu["zero_fraction"] < 0.01 and 0.05 < gelu["cett_sparsity"] < 0.95


def test_cett_sparsity_grows_with_the_allowed_error():
    rng = np.random.default_rng(2)
    activations = rng.standard_normal((100, 64)) * rng.exponential(1.0, 64)
    down = rng.standard_normal((64, 16))
    levels = [cett_sparsity(activations, down, cett) for cett in (0.05, 0.2, 0.5)]
    assert levels[0] < levels[1] < levels[2]


def test_cli_inspect_with_calibration_reports_activation_sparsity(tmp_path):
    path = tmp_path / "ffn.onnx"
    onnx.save(_ffn("silu"), path)
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "qcompile", "inspect", str(path), "--calib", "random:8", "--json"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["activation_sparsity"]["down"]
    assert report["activation"] == "silu" and report["width"] == 128
    done = subprocess.run([sys.executable, "-m", "qcompile", "inspect", str(path), "--calib", "random:8"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert "activation sparsity of feed-forward layers" in done.stdout and "silu" in done.stdout
