"""Property tests of the lossy passes: on random MLPs, every lossy pipeline keeps the model
valid, and the output error it reports is what a NumPy forward pass of its decoded weights
gives."""

from __future__ import annotations

import numpy as np
from conftest import mlp_feeds, mlp_model
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.ir import qops
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.runtime import make_session
from qcompile.ir.verify import verify
from qcompile.passes.calibration import CalibrationSet
from qcompile.passes.context import PassContext
from qcompile.passes.layers import weight_of
from qcompile.passes.manager import PassManager
from qcompile.passes.registry import parse_pipeline

PIPELINES = [
    "quant(bits={bits})",
    "quant(bits={bits},method=gptq)",
    "quant(bits={bits},group_size=0,sym=true)",
    "split,quant(bits={bits},method=gptq)",
    "fold,quant(bits={bits},act_bits=8)",
    "shiftadd(bits={small})",
    "bits(avg={avg}),shiftadd",
]


def _weights(model: Model) -> dict[str, np.ndarray]:
    """Every layer's weight as the model now computes with it (Gemm's alpha applied), as ``X @ W``."""
    found = {}
    for node in model.graph.nodes:
        if qops.is_quantized(node):
            matrix = qops.read_weight(node).dequantize()  # [rows, cols], reduction last; alpha folded in
            found[node.name] = matrix if node.op == "QGather" else matrix.T  # QMatMul: X @ W.T
        elif weight_of(node) is not None:
            values = np.asarray(weight_of(node).values, np.float64)
            values = values.T if node.op == "Gemm" and node.attrs.get("transB", 0) else values
            found[node.name] = values * float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else values
    return found


def _numpy_mlp(weights: dict[str, np.ndarray], biases: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """conftest.mlp_model: Gather -> MatMul+b1 -> Relu -> Gemm(transB)+b2 -> Gemm(alpha) + 2 * b3."""
    hidden = weights["embed"][ids].reshape(-1, weights["embed"].shape[1]).astype(np.float64)
    hidden = np.maximum(hidden @ weights["fc1"] + biases["b1"], 0.0)
    hidden = hidden @ weights["fc2"] + biases["b2"]
    return hidden @ weights["fc3"] + 2.0 * biases["b3"]


@settings(max_examples=14, deadline=None)
@given(seed=st.integers(0, 10_000), pipeline=st.sampled_from(PIPELINES), bits=st.integers(2, 8),
       small=st.integers(2, 4), avg=st.sampled_from([2.5, 3.0, 3.5]))
def test_lossy_pipelines_report_the_error_numpy_measures(seed, pipeline, bits, small, avg):
    spec = pipeline.format(bits=bits, small=small, avg=avg)
    proto = mlp_model(seed)
    biases = {init.name: np.frombuffer(init.raw_data, np.float32).astype(np.float64)
              for init in proto.graph.initializer if init.name in ("b1", "b2", "b3")}
    model = canonicalize(Model.from_proto(proto))
    feeds = mlp_feeds(6, seed=seed)
    calib = CalibrationSet(feeds, "test")
    compiled, records = PassManager(parse_pipeline(spec), eval_samples=calib).run(
        model, PassContext(calib=calib, seed=seed))
    verify(compiled)

    reference = make_session(model).run(None, feeds)[0].astype(np.float64)
    fp32_numpy = _numpy_mlp(_weights(model), biases, feeds["ids"])
    np.testing.assert_allclose(fp32_numpy, reference, rtol=1e-4, atol=1e-4)
    if "act_bits" in spec:  # activations are fake-quantized too: ORT's output is the reference
        return
    decoded = _numpy_mlp(_weights(compiled), biases, feeds["ids"])
    actual = make_session(compiled).run(None, feeds)[0]
    np.testing.assert_allclose(actual, decoded, rtol=1e-3, atol=1e-3)
    cosine = float((decoded * reference).sum() / np.sqrt((decoded**2).sum() * (reference**2).sum()))
    reported = records[-1].output_error["y"]["cosine"]
    assert abs(reported - cosine) < 1e-4, (spec, reported, cosine)
