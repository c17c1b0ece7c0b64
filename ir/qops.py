"""Quantized ops of the ``qcompile`` domain and their reference ONNX functions.

Every quantized layer is one node whose inputs are its activation (if any) and the
weight inputs of its format (see :mod:`qcompile.ir.formats`; the ``int`` format's are
``packed, scales, zero_points``), and whose attributes name the format. Each (op type,
format) pair comes with a model-local ONNX function written in standard ops (decode,
then the float op), told apart by the function ``overload`` field, so a saved model
runs in plain ONNX Runtime: that function is the numerical ground truth every backend
must match.

    QMatMul(X, *w) -> X @ W.T                        W: [N, K]
    QGather(w[0], indices, *w[1:]) -> W[indices]     W: [V, D]  (GatherBlockQuantized's order)
    QConv(X, *w, B) -> Conv(X, reshape(W, weight_shape), B)

Common attributes: ``format`` (plus ``sparse`` for weights stored sparse) and the format's own (for ``int``: ``bits``,
``group_size``, ``cols`` = the reduction length before padding, ``sym``); QConv adds
``weight_shape`` and forwards the Conv attributes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from . import bcq, bcq_outliers, cluster, qformat  # noqa: F401  (register their formats)
from .formats import FunctionBody, Weight, WeightFormat, format_named, format_of
from .sparse import registry_name, sparse_format

DOMAIN = "qcompile"
DOMAIN_VERSION = 1
QUANTIZED_OPS = ("QMatMul", "QGather", "QConv")
CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def is_quantized(node: gs.Node) -> bool:
    return node.domain == DOMAIN and node.op in QUANTIZED_OPS


def node_format(node: gs.Node) -> WeightFormat:
    """The node's weight format: ``format``, wrapped by the ``sparse`` layout when the node has one
    (see :mod:`qcompile.ir.sparse`)."""
    name, layout = str(node.attrs.get("format", "int")), node.attrs.get("sparse")
    return sparse_format(name, str(layout)) if layout else format_named(name)


def format_name(node: gs.Node) -> str:
    """The registry key of the node's weight format (``int``, ``int.bitmask``, ``int.nm``, ...)."""
    name, layout = str(node.attrs.get("format", "int")), node.attrs.get("sparse")
    return registry_name(name, str(layout)) if layout else name


def format_attributes(weight: Weight) -> dict:
    return format_of(weight).node_attributes(weight)


def weight_constants(prefix: str, weight: Weight) -> list[gs.Constant]:
    """The initializers of a quantized weight, named after the float one."""
    return format_of(weight).constants(prefix, weight)


def weight_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The node's weight inputs, in its format's order."""
    count = len(node_format(node).inputs)
    if node.op == "QGather":
        return [node.inputs[0], *node.inputs[2 : count + 1]]
    return list(node.inputs[1 : count + 1])


def layer_inputs(op: str, activation: gs.Tensor, weight: list[gs.Tensor], bias: gs.Tensor | None = None
                 ) -> list[gs.Tensor]:
    """The inputs of a quantized ``op`` node: ``activation`` is X, or the indices of a QGather."""
    if op == "QGather":
        return [weight[0], activation, *weight[1:]]
    if op == "QConv":
        assert bias is not None, "QConv takes a bias"
        return [activation, *weight, bias]
    return [activation, *weight]


def describe(node: gs.Node) -> dict:
    """The format and its descriptive attributes (``bits``, ``group_size``, ``sym``, ``k``...)."""
    fmt = node_format(node)
    described = {"format": str(node.attrs.get("format", "int"))}  # the stored format; a sparse layout apart
    described.update({name: node.attrs[name] for name in fmt.attributes if name not in ("format", "cols")
                      and name in node.attrs})
    return described


def same_weight(a: gs.Node, b: gs.Node) -> bool:
    """Whether two quantized nodes store the same weight (format, attributes and bytes)."""
    if describe(a) != describe(b):
        return False
    return all(np.array_equal(np.asarray(x.values), np.asarray(y.values))
               for x, y in zip(weight_inputs(a), weight_inputs(b), strict=True))


def read_weight(node: gs.Node) -> Weight:
    """The quantized weight a node holds."""
    arrays = [np.asarray(tensor.values) for tensor in weight_inputs(node)]
    return node_format(node).from_arrays(node.attrs, arrays)


def float_operand(node: gs.Node, matrix):
    """A quantized node's weight ``[rows, cols]`` (NumPy or torch) laid out as the float op it
    stands for reads it: transposed for MatMul, as is for Gather, in ``weight_shape`` for Conv."""
    if node.op == "QMatMul":
        return matrix.T
    if node.op == "QGather":
        return matrix
    return matrix.reshape([int(d) for d in node.attrs["weight_shape"]])


def decode_to_float(graph: gs.Graph) -> int:
    """Replace every quantized node whose weights are constants by the float op it stands for,
    its weight decoded once with NumPy (``dequantize()``, which the tests hold equal to the
    reference function's decode); returns how many nodes were replaced.

    For runtimes without a kernel for a format: ONNX Runtime, given the reference function,
    constant-folds each layer's decode with every intermediate (planes unpacked to float,
    alphas broadcast) alive at once: opening MiniLM's ``shiftadd`` artifact peaked at 1.65 GB
    (0.39 GB for the float model), and SmolLM2's ran the machine out of memory. Decoded here,
    the session holds the float weights only. A weight shared by several nodes (a tied
    embedding and LM head) is decoded once.
    """
    decoded: dict[tuple[str, ...], np.ndarray] = {}
    count = 0
    for node in [n for n in graph.nodes if is_quantized(n)]:
        weights = weight_inputs(node)
        if not all(isinstance(t, gs.Constant) for t in weights):
            continue  # computed at run time (e.g. widened from narrower storage): the function stays
        key = tuple(t.name for t in weights)
        if key not in decoded:
            decoded[key] = np.asarray(read_weight(node).dequantize(), np.float32)
        constant = gs.Constant(f"{node.name}.decoded", np.ascontiguousarray(float_operand(node, decoded[key])))
        if node.op == "QMatMul":
            node.inputs = [node.inputs[0], constant]
            node.op, node.attrs = "MatMul", {}
        elif node.op == "QGather":
            node.inputs = [constant, node.inputs[1]]
            node.op, node.attrs = "Gather", {"axis": 0}
        else:
            bias = node.inputs[1 + len(weights):]
            node.inputs = [node.inputs[0], constant, *bias]
            node.op, node.attrs = "Conv", {k: v for k, v in node.attrs.items() if k in CONV_ATTRIBUTES}
        node.domain = ""
        count += 1
    if count:
        graph.cleanup(remove_unused_graph_inputs=False)
    return count


# ----------------------------------------------------------------------------------
# Reference functions
# ----------------------------------------------------------------------------------


def _function(name: str, fmt: WeightFormat, inputs: list[str], body: FunctionBody, result: str,
              extra_attributes: Iterable[str], opset: int) -> onnx.FunctionProto:
    body.nodes.append(helper.make_node("Identity", [result], ["Y"]))
    function = helper.make_function(
        DOMAIN,
        name,
        inputs,
        ["Y"],
        body.nodes,
        [helper.make_opsetid("", opset)],
        attributes=[*fmt.attributes, *extra_attributes],
    )
    function.overload = fmt.name
    return function


def _qmatmul(fmt: WeightFormat, opset: int) -> onnx.FunctionProto:
    body = FunctionBody()
    weight = fmt.decode(body, fmt.inputs)
    result = body.op("MatMul", "X", body.op("Transpose", weight, perm=[1, 0]))
    return _function("QMatMul", fmt, ["X", *fmt.inputs], body, result, (), opset)


def _qgather(fmt: WeightFormat, opset: int) -> onnx.FunctionProto:
    body = FunctionBody()
    minus_one, one = body.const([-1]), body.const([1])
    flat_indices = body.op("Reshape", "indices", minus_one)
    # every weight input is [rows, ...]: take the rows asked for from each
    rows = [body.op("Gather", name, flat_indices, axis=0) for name in fmt.inputs]
    values = fmt.decode(body, rows)
    width = body.op("Slice", body.op("Shape", values), one, body.const([2]))
    out_shape = body.op("Concat", body.op("Shape", "indices"), width, axis=0)
    result = body.op("Reshape", values, out_shape)
    inputs = [fmt.inputs[0], "indices", *fmt.inputs[1:]]
    return _function("QGather", fmt, inputs, body, result, (), opset)


def _qconv(fmt: WeightFormat, opset: int) -> onnx.FunctionProto:
    body = FunctionBody()
    weight = fmt.decode(body, fmt.inputs)
    shape = body.attr_const("weight_shape", onnx.AttributeProto.INTS)
    kernel = body.op("Reshape", weight, shape)
    conv = helper.make_node("Conv", ["X", kernel, "B"], ["_conv"])
    kinds = {
        "auto_pad": onnx.AttributeProto.STRING,
        "group": onnx.AttributeProto.INT,
    }
    conv.attribute.extend(
        body.ref_attrs((name, kinds.get(name, onnx.AttributeProto.INTS)) for name in CONV_ATTRIBUTES)
    )
    body.nodes.append(conv)
    return _function("QConv", fmt, ["X", *fmt.inputs, "B"], body, "_conv", ["weight_shape", *CONV_ATTRIBUTES],
                     opset)


_BUILDERS = {"QMatMul": _qmatmul, "QGather": _qgather, "QConv": _qconv}


def function_key(node: gs.Node) -> tuple[str, str]:
    """(op type, format): which reference function a quantized node calls."""
    return node.op, node_format(node).name


def reference_functions(keys: Iterable[tuple[str, str]], opset: int) -> list[onnx.FunctionProto]:
    """The reference functions for the given (op type, format) pairs, in a fixed order."""
    return [_BUILDERS[op](format_named(name), opset) for op, name in sorted(set(keys))]
