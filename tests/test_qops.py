"""Reference functions of the quantized ops, run in plain ONNX Runtime, against NumPy."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch

from qcompile.ir import cluster, formats, qops
from qcompile.ir.model import Model
from qcompile.ir.qformat import quantize_int
from qcompile.ir.runtime import make_session
from qcompile.ir.verify import verify


def _single_node_model(op, attrs, inputs, output_shape, graph_inputs):
    output = gs.Variable("y", np.float32, output_shape)
    node = gs.Node(op, "layer", attrs, inputs, [output], domain=qops.DOMAIN)
    model = Model(gs.Graph(nodes=[node], inputs=graph_inputs, outputs=[output], opset=17))
    verify(model)
    return model


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [16, 0])
def test_qmatmul_reference(bits, group_size):
    rng = np.random.default_rng(bits)
    weight = quantize_int(rng.standard_normal((24, 40)).astype(np.float32), bits, group_size, sym=bits % 2 == 0)
    x = gs.Variable("x", np.float32, [2, 3, 40])
    model = _single_node_model("QMatMul", qops.format_attributes(weight), [x, *qops.weight_constants("w", weight)],
                               [2, 3, 24], [x])
    feed = rng.standard_normal((2, 3, 40)).astype(np.float32)
    (out,) = make_session(model).run(None, {"x": feed})
    np.testing.assert_allclose(out, feed @ weight.dequantize().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qgather_reference(bits):
    rng = np.random.default_rng(bits)
    table = quantize_int(rng.standard_normal((50, 48)).astype(np.float32), bits, 16)
    ids = gs.Variable("ids", np.int64, [2, 5])
    packed, scales, zero_points = qops.weight_constants("emb", table)
    model = _single_node_model("QGather", qops.format_attributes(table), [packed, ids, scales, zero_points],
                               [2, 5, 48], [ids])
    feed = rng.integers(0, 50, size=(2, 5))
    (out,) = make_session(model).run(None, {"ids": feed})
    np.testing.assert_array_equal(out, table.dequantize()[feed])


@pytest.mark.parametrize("bits", [3, 4])
def test_qconv_reference(bits):
    rng = np.random.default_rng(bits)
    kernel = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    weight = quantize_int(kernel.reshape(8, -1), bits, 0)
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


def test_read_weight_round_trips():
    weight = quantize_int(np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32), 3, 16)
    x = gs.Variable("x", np.float32, [1, 32])
    model = _single_node_model("QMatMul", qops.format_attributes(weight), [x, *qops.weight_constants("w", weight)],
                               [1, 16], [x])
    again = Model.from_proto(model.to_proto())
    read = qops.read_weight(again.quantized_nodes()[0])
    np.testing.assert_array_equal(read.dequantize(), weight.dequantize())
    assert (read.bits, read.group_size, read.cols) == (3, 16, 32)


def test_functions_are_regenerated_not_duplicated():
    weight = quantize_int(np.ones((16, 32), np.float32), 4, 32)
    x = gs.Variable("x", np.float32, [1, 32])
    model = _single_node_model("QMatMul", qops.format_attributes(weight), [x, *qops.weight_constants("w", weight)],
                               [1, 16], [x])
    proto = Model.from_proto(Model.from_proto(model.to_proto()).to_proto()).to_proto()
    assert [f.name for f in proto.functions] == ["QMatMul"]


class _HalfFormat(formats.WeightFormat):
    """A second format (float16 rows) to check that formats mix in one model."""

    name = "test_half"
    inputs = ("half",)
    attributes = ("format",)

    def node_attributes(self, weight):
        return {"format": self.name}

    def constants(self, prefix, weight):
        return [gs.Constant(f"{prefix}.half", weight.values)]

    def from_arrays(self, attrs, arrays):
        return _HalfWeight(arrays[0])

    def check(self, attrs, arrays):
        return None if arrays[0].dtype == np.float16 else "not float16"

    def decode(self, body, inputs):
        return body.op("Cast", inputs[0], to=1)


class _HalfWeight:
    format, bits, group_size = "test_half", 16, 0

    def __init__(self, values):
        self.values = values
        self.cols = values.shape[1]
        self.rows = values.shape[0]
        self.nbytes = values.nbytes

    def dequantize(self):
        return self.values.astype(np.float32)


def test_formats_mix_in_one_model_through_function_overloads():
    half_format = formats.register(_HalfFormat())
    try:
        rng = np.random.default_rng(0)
        table = rng.standard_normal((10, 16)).astype(np.float16)
        half = _HalfWeight(table)
        matrix = quantize_int(rng.standard_normal((6, 16)).astype(np.float32), 4, 16)
        ids, hidden, y = gs.Variable("ids", np.int64, [2, 3]), gs.Variable("h", np.float32), gs.Variable(
            "y", np.float32, [2, 3, 6])
        gather = gs.Node("QGather", "emb", qops.format_attributes(half),
                         qops.layer_inputs("QGather", ids, qops.weight_constants("emb", half)), [hidden],
                         domain=qops.DOMAIN)
        matmul = gs.Node("QMatMul", "fc", qops.format_attributes(matrix),
                         qops.layer_inputs("QMatMul", hidden, qops.weight_constants("fc", matrix)), [y],
                         domain=qops.DOMAIN)
        model = Model(gs.Graph(nodes=[gather, matmul], inputs=[ids], outputs=[y], opset=17))
        verify(model)
        proto = model.to_proto()
        assert sorted((f.name, f.overload) for f in proto.functions) == [("QGather", "test_half"),
                                                                         ("QMatMul", "int")]
        again = Model.from_proto(proto)
        assert isinstance(qops.read_weight(again.graph.nodes[0]), _HalfWeight)
        feed = rng.integers(0, 10, (2, 3))
        (out,) = make_session(again).run(None, {"ids": feed})
        np.testing.assert_allclose(out, table.astype(np.float32)[feed] @ matrix.dequantize().T, rtol=1e-5,
                                   atol=1e-5)
    finally:
        del formats.FORMATS[half_format.name]


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="unknown quantized-weight format 'nope'"):
        formats.format_named("nope")


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("group_size", [0, 16])
def test_cluster_format_reference_matches_numpy(k, bits, group_size):
    rng = np.random.default_rng(k * 10 + bits)
    matrix = rng.standard_normal((12, 37)).astype(np.float32)
    ids = rng.integers(0, k, (12, 37)).astype(np.uint8)
    weight = cluster.quantize_cluster(matrix, ids, k, bits, group_size)
    x = gs.Variable("x", np.float32, [3, 37])
    model = _single_node_model("QMatMul", qops.format_attributes(weight),
                               qops.layer_inputs("QMatMul", x, qops.weight_constants("w", weight)), [3, 12], [x])
    feed = rng.standard_normal((3, 37)).astype(np.float32)
    (out,) = make_session(Model.from_proto(model.to_proto())).run(None, {"x": feed})
    np.testing.assert_allclose(out, feed @ weight.dequantize().T, rtol=1e-5, atol=1e-5)
    assert cluster.unpack_clusters(cluster.pack_clusters(ids, k), k, 37).tolist() == ids.tolist()


def test_cluster_grids_need_no_zero_in_range():
    """A cluster of large positive weights is coded on its own narrow grid, offset from zero."""
    matrix = np.array([[5.0, 5.1, 5.2, 5.3, -0.1, 0.0, 0.1, 0.05]], np.float32)
    ids = np.array([[1, 1, 1, 1, 0, 0, 0, 0]], np.uint8)
    weight = cluster.quantize_cluster(matrix, ids, 2, 2, 0)
    np.testing.assert_allclose(weight.dequantize(), matrix, atol=0.04)  # steps of ~0.07 and 0.1
