"""Sparse storage (ir/sparse.py): bitmask and N:M layouts round-trip, and their reference
functions, run in plain ONNX Runtime, decode exactly what NumPy does."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch

from qcompile.errors import VerificationError
from qcompile.ir import qops, sparse
from qcompile.ir.model import Model
from qcompile.ir.qformat import quantize_int, unpack_codes
from qcompile.ir.runtime import make_session
from qcompile.ir.verify import verify


def nm_mask(weight: np.ndarray, n: int, m: int) -> np.ndarray:
    rows, cols = weight.shape
    groups = np.abs(weight).reshape(rows, cols // m, m)
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, np.argsort(-groups, axis=-1)[..., :n], True, axis=-1)
    return keep.reshape(rows, cols)


def sparse_int(weight: np.ndarray, mask: np.ndarray, bits: int = 4, group_size: int = 16) -> sparse.SparseWeight:
    placement = sparse.choose_placement(mask, bits)
    return sparse.sparse_weight(quantize_int(placement.compact(weight * mask), bits, group_size), placement)


def _model(op, weight, inputs, output_shape, graph_inputs, **extra):
    output = gs.Variable("y", np.float32, output_shape)
    node = gs.Node(op, "layer", {**qops.format_attributes(weight), **extra}, inputs, [output], domain=qops.DOMAIN)
    model = Model(gs.Graph(nodes=[node], inputs=graph_inputs, outputs=[output], opset=17))
    verify(model)
    return Model.from_proto(model.to_proto())  # through the file format


MASKS = {
    "random50": lambda w, rng: rng.random(w.shape) > 0.5,
    "uneven_rows": lambda w, rng: rng.random(w.shape) > np.linspace(0.1, 0.9, w.shape[0])[:, None],
    "empty_row": lambda w, rng: np.vstack([np.zeros((1, w.shape[1]), bool), rng.random((w.shape[0] - 1, w.shape[1])) > 0.5]),
    "2:4": lambda w, rng: nm_mask(w, 2, 4),
    "1:4": lambda w, rng: nm_mask(w, 1, 4),
    "2:8": lambda w, rng: nm_mask(w, 2, 8),
}


@pytest.mark.parametrize("pattern", list(MASKS))
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_qmatmul_sparse_reference_matches_numpy(pattern, bits):
    rng = np.random.default_rng(bits)
    dense = rng.standard_normal((24, 64)).astype(np.float32)
    mask = MASKS[pattern](dense, rng)
    weight = sparse_int(dense, mask, bits)
    expected_layout = "nm" if ":" in pattern else "bitmask"
    assert weight.layout == expected_layout
    recon = weight.dequantize()
    assert (recon[~mask] == 0).all() and np.array_equal(weight.mask() | ~mask, np.ones_like(mask))
    x = gs.Variable("x", np.float32, [2, 3, 64])
    model = _model("QMatMul", weight, [x, *qops.weight_constants("w", weight)], [2, 3, 24], [x])
    again = qops.read_weight(model.graph.nodes[0])
    np.testing.assert_array_equal(again.dequantize(), recon)
    feed = rng.standard_normal((2, 3, 64)).astype(np.float32)
    (out,) = make_session(model).run(None, {"x": feed})
    np.testing.assert_allclose(out, feed @ recon.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["random50", "2:4"])
def test_qgather_and_qconv_sparse_reference(pattern):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 48)).astype(np.float32)
    weight = sparse_int(table, MASKS[pattern](table, rng), 4)
    ids = gs.Variable("ids", np.int64, [2, 5])
    constants = qops.weight_constants("emb", weight)
    model = _model("QGather", weight, qops.layer_inputs("QGather", ids, constants), [2, 5, 48], [ids])
    feed = rng.integers(0, 50, size=(2, 5))
    (out,) = make_session(model).run(None, {"ids": feed})
    np.testing.assert_array_equal(out, weight.dequantize()[feed])

    kernel = rng.standard_normal((8, 4, 2, 2)).astype(np.float32)
    weight = sparse_int(kernel.reshape(8, -1), MASKS[pattern](kernel.reshape(8, -1), rng), 4)
    x = gs.Variable("x", np.float32, [1, 4, 6, 6])
    bias = gs.Constant("b", rng.standard_normal(8).astype(np.float32))
    model = _model("QConv", weight, [x, *qops.weight_constants("k", weight), bias], [1, 8, 5, 5], [x],
                   weight_shape=[8, 4, 2, 2])
    feed = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    (out,) = make_session(model).run(None, {"x": feed})
    expected = torch.nn.functional.conv2d(torch.tensor(feed), torch.tensor(weight.dequantize().reshape(8, 4, 2, 2)),
                                          torch.tensor(bias.values)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_sparse_storage_is_half_the_values_plus_the_mask():
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((384, 1536)).astype(np.float32)
    scores = np.abs(dense)
    mask = scores >= np.median(scores, axis=1, keepdims=True)  # 50% per row
    full = quantize_int(dense, 4, 32)
    weight = sparse_int(dense, mask, 4, 32)
    mask_bytes = 384 * 1536 // 8
    assert weight.nbytes == pytest.approx(full.nbytes / 2 + mask_bytes, rel=0.01)
    assert weight.nbytes < 0.8 * full.nbytes


def test_bitmask_packing_is_low_bit_first():
    mask = np.zeros((1, 16), bool)
    mask[0, [0, 3, 9]] = True
    placement = sparse.place(mask, "bitmask")
    assert placement.metadata.tolist() == [[0b00001001, 0b00000010]]
    assert unpack_codes(placement.metadata, 1)[0].astype(bool).tolist() == mask[0].tolist()


def test_bad_metadata_is_named():
    rng = np.random.default_rng(2)
    dense = rng.standard_normal((8, 32)).astype(np.float32)
    weight = sparse_int(dense, rng.random(dense.shape) > 0.5)
    x = gs.Variable("x", np.float32, [1, 32])
    constants = qops.weight_constants("w", weight)
    constants[-1] = gs.Constant("w.mask", constants[-1].values[:, :2])
    output = gs.Variable("y", np.float32, [1, 8])
    node = gs.Node("QMatMul", "layer", qops.format_attributes(weight), [x, *constants], [output], domain=qops.DOMAIN)
    with pytest.raises(VerificationError, match="mask is uint8"):
        verify(Model(gs.Graph(nodes=[node], inputs=[x], outputs=[output], opset=17)))
    node.attrs["sparse"] = "diagonal"
    with pytest.raises(VerificationError, match="unknown sparse layout 'diagonal'"):
        verify(Model(gs.Graph(nodes=[node], inputs=[x], outputs=[output], opset=17)))
