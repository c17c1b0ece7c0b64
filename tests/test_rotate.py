"""``rotate``: exact residual-stream rotation (QuaRot R1) on hand-built pre-norm models.

The tiny-Llama checks (tied table, decode graph with a KV cache) are in ``test_llm.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.runtime import make_session
from qcompile.passes.calibration import CalibrationSet
from qcompile.passes.context import PassContext
from qcompile.passes.layers import ROTATION_PREFIX
from qcompile.passes.registry import parse_pipeline
from qcompile.passes.rotate import hadamard, orthogonal

VOCAB, HIDDEN, FFN = 64, 32, 48


def _rmsnorm(prefix: str, x: str, gamma: np.ndarray, nodes: list, inits: list) -> str:
    inits += [numpy_helper.from_array(gamma.astype(np.float32), f"{prefix}.gamma"),
              numpy_helper.from_array(np.array(2.0, np.float32), f"{prefix}.two"),
              numpy_helper.from_array(np.array(1e-6, np.float32), f"{prefix}.eps")]
    nodes += [helper.make_node("Pow", [x, f"{prefix}.two"], [f"{prefix}.sq"]),
              helper.make_node("ReduceMean", [f"{prefix}.sq"], [f"{prefix}.ms"], axes=[-1], keepdims=1),
              helper.make_node("Add", [f"{prefix}.ms", f"{prefix}.eps"], [f"{prefix}.mse"]),
              helper.make_node("Sqrt", [f"{prefix}.mse"], [f"{prefix}.rms"]),
              helper.make_node("Reciprocal", [f"{prefix}.rms"], [f"{prefix}.inv"]),
              helper.make_node("Mul", [x, f"{prefix}.inv"], [f"{prefix}.normed"]),
              helper.make_node("Mul", [f"{prefix}.normed", f"{prefix}.gamma"], [f"{prefix}.out"])]
    return f"{prefix}.out"


def pre_norm_lm(seed: int = 0, outliers: float = 0.0, blocks: int = 2, hidden_output: bool = False) -> Model:
    """Embedding -> blocks of RMSNorm -> MLP (biased down projection) -> residual add -> RMSNorm -> head.

    ``outliers``: that fraction of the readers' weights (``up``, the head) is 25x larger.
    """
    rng = np.random.default_rng(seed)

    def reader(rows: int, cols: int) -> np.ndarray:
        weight = rng.standard_normal((rows, cols)) / 6
        weight[rng.random((rows, cols)) < outliers] *= 25
        return weight.astype(np.float32)

    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    nodes: list = [helper.make_node("Gather", ["table", "ids"], ["h0"], axis=0)]
    inits: list = [numpy_helper.from_array(table, "table")]
    stream = "h0"
    for b in range(blocks):
        normed = _rmsnorm(f"b{b}.norm", stream, 1 + 0.3 * rng.standard_normal(HIDDEN), nodes, inits)
        inits += [numpy_helper.from_array(reader(HIDDEN, FFN), f"b{b}.up"),
                  numpy_helper.from_array((rng.standard_normal((FFN, HIDDEN)) / 7).astype(np.float32), f"b{b}.down"),
                  numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), f"b{b}.bias")]
        nodes += [helper.make_node("MatMul", [normed, f"b{b}.up"], [f"b{b}.u"], name=f"b{b}/up"),
                  helper.make_node("Relu", [f"b{b}.u"], [f"b{b}.r"]),
                  helper.make_node("MatMul", [f"b{b}.r", f"b{b}.down"], [f"b{b}.d"], name=f"b{b}/down"),
                  helper.make_node("Add", [f"b{b}.d", f"b{b}.bias"], [f"b{b}.db"]),
                  helper.make_node("Add", [stream, f"b{b}.db"], [f"h{b + 1}"])]
        stream = f"h{b + 1}"
    normed = _rmsnorm("final", stream, 1 + 0.3 * rng.standard_normal(HIDDEN), nodes, inits)
    inits.append(numpy_helper.from_array(reader(HIDDEN, VOCAB), "head"))
    nodes.append(helper.make_node("MatMul", [normed, "head"], ["logits"], name="head"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, None, VOCAB])]
    if hidden_output:
        outputs.append(helper.make_tensor_value_info(stream, TensorProto.FLOAT, [None, None, HIDDEN]))
    graph = helper.make_graph(nodes, "pre_norm_lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                              outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return canonicalize(Model.from_proto(proto))


def _ids(n: int = 3, length: int = 10, seed: int = 1) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, VOCAB, (n, length)).astype(np.int64)}


def _run(model: Model, spec: str, calib: dict | None = None):
    ctx = PassContext(calib=CalibrationSet(calib, "<test>") if calib else None)
    return [p.run(model, ctx) for p in parse_pipeline(spec)]


@pytest.mark.parametrize("order", [1, 2, 12, 20, 24, 64, 72, 576, 1536, 3072, 4096])
def test_hadamard_orders(order):
    found = hadamard(order)
    assert found is not None
    matrix, _ = found
    assert set(np.unique(matrix)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(matrix @ matrix.T, order * np.eye(order))


@pytest.mark.parametrize("order", [3, 6, 10])
def test_no_hadamard_order_falls_back_to_a_random_orthogonal_matrix(order):
    assert hadamard(order) is None
    matrix, construction = orthogonal(order, "hadamard", 0)
    assert "random orthogonal" in construction
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(order), atol=1e-12)


def test_rotation_is_exact_and_offline_when_nothing_is_tied():
    model = pre_norm_lm()
    feeds = _ids()
    before = make_session(model).run(None, feeds)[0]
    (result,) = _run(model, "rotate")
    assert result.changed
    stats = result.stats
    assert stats["matched"] == {"RMSNorm": 3} and stats["online"] == []
    # readers: each block's up + the head; writers: the table + each down; biases of each down
    assert (stats["readers_rotated"], stats["writers_rotated"], stats["biases_rotated"]) == (3, 3, 2)
    assert not any(t.name.startswith(ROTATION_PREFIX) for t in model.tensors().values())
    gammas = [np.asarray(n.inputs[1].values) for n in model.graph.nodes
              if n.op == "Mul" and n.outputs[0].name.endswith(".out")]
    assert len(gammas) == 3 and all(np.array_equal(g, np.ones_like(g)) for g in gammas)
    np.testing.assert_allclose(make_session(model).run(None, feeds)[0], before, atol=2e-5, rtol=1e-4)
    again = _run(model, "rotate")[0]
    assert not again.changed and "already rotated" in again.stats["skipped"]


def test_rotation_spreads_outlier_weights_and_helps_low_bit_quantization():
    """A few large weights stretch their groups' grids; rotated (``Qᵀ W``), each is spread over
    its whole column (the peak-to-RMS ratio of the weight drops), and 3-bit RTN of the model is
    closer to FP32."""
    calib = _ids(n=8, length=16, seed=4)
    feeds = _ids(n=4, length=12, seed=5)
    reference = make_session(pre_norm_lm(outliers=0.01)).run(None, feeds)[0]

    def relative_error(spec: str) -> float:
        model = pre_norm_lm(outliers=0.01)
        _run(model, spec, calib)
        out = make_session(model).run(None, feeds)[0]
        return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))

    plain, rotated = relative_error("quant(bits=3,min_size=0)"), relative_error("rotate,quant(bits=3,min_size=0)")
    assert rotated < 0.9 * plain, (plain, rotated)

    def peak_to_rms(model: Model) -> float:
        weight = np.asarray(next(n for n in model.graph.nodes if n.name == "b0/up").inputs[1].values)
        return float(np.abs(weight).max() / np.sqrt(np.mean(weight ** 2)))

    model = pre_norm_lm(outliers=0.01)
    before = peak_to_rms(model)
    _run(model, "rotate")
    assert peak_to_rms(model) < before / 2


def test_a_stream_that_is_also_a_graph_output_is_left_alone():
    model = pre_norm_lm(hidden_output=True)
    (result,) = _run(model, "rotate")
    assert not result.changed and "graph output" in result.stats["skipped"]


def test_a_model_without_rmsnorm_is_left_alone_with_a_reason():
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")])
    model = canonicalize(Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    (result,) = _run(model, "rotate")
    assert not result.changed and "no RMSNorm" in result.stats["skipped"]


def test_random_kind_is_exact_too():
    model = pre_norm_lm(seed=3)
    feeds = _ids()
    before = make_session(model).run(None, feeds)[0]
    (result,) = _run(model, "rotate(kind=random,seed=7)")
    assert result.stats["rotation"] == "random orthogonal (QR)"
    np.testing.assert_allclose(make_session(model).run(None, feeds)[0], before, atol=2e-5, rtol=1e-4)
