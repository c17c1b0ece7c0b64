"""Quantized ops of the ``qcompile`` domain and their reference ONNX functions.

Every quantized layer is one node whose inputs are the packed weight, its group
scales and zero points (see :mod:`qcompile.ir.qformat`), and whose attributes name
the format. Each op type comes with a model-local ONNX function written in standard
ops (unpack, dequantize, then the float op), so a saved model runs in plain ONNX
Runtime: that function is the numerical ground truth every backend must match.

    QMatMul(X, packed, scales, zero_points) -> X @ W.T        W: [N, K]
    QGather(packed, indices, scales, zero_points) -> W[indices]  W: [V, D]
    QConv(X, packed, scales, zero_points, B) -> Conv(X, reshape(W, weight_shape), B)

Common attributes: ``format`` ("int"), ``bits``, ``group_size``, ``cols`` (the
reduction length before padding), ``sym``; QConv adds ``weight_shape`` and forwards
the Conv attributes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from .qformat import QuantizedWeight

DOMAIN = "qcompile"
DOMAIN_VERSION = 1
QUANTIZED_OPS = ("QMatMul", "QGather", "QConv")
CONV_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
_FORMAT_ATTRIBUTES = ["format", "bits", "group_size", "cols", "sym"]


def is_quantized(node: gs.Node) -> bool:
    return node.domain == DOMAIN and node.op in QUANTIZED_OPS


def format_attributes(weight: QuantizedWeight) -> dict:
    return {
        "format": "int",
        "bits": weight.bits,
        "group_size": weight.group_size,
        "cols": weight.cols,
        "sym": int(weight.sym),
    }


def weight_constants(prefix: str, weight: QuantizedWeight) -> list[gs.Constant]:
    """The three initializers of a quantized weight, named after the float one."""
    return [
        gs.Constant(f"{prefix}.qweight", weight.packed),
        gs.Constant(f"{prefix}.scales", weight.scales),
        gs.Constant(f"{prefix}.zero_points", weight.zero_points),
    ]


def read_weight(node: gs.Node) -> QuantizedWeight:
    """The :class:`QuantizedWeight` a quantized node holds."""
    first = 0 if node.op == "QGather" else 1
    packed = node.inputs[first]
    scales, zero_points = node.inputs[2], node.inputs[3]
    return QuantizedWeight(
        packed=np.asarray(packed.values),
        scales=np.asarray(scales.values),
        zero_points=np.asarray(zero_points.values),
        bits=int(node.attrs["bits"]),
        group_size=int(node.attrs["group_size"]),
        cols=int(node.attrs["cols"]),
        sym=bool(node.attrs.get("sym", 0)),
    )


# ----------------------------------------------------------------------------------
# Reference functions
# ----------------------------------------------------------------------------------


class _Body:
    """Accumulates the nodes of a function body with short unique value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"_{op_type.lower()}{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value) -> str:
        if isinstance(value, list):
            return self.op("Constant", value_ints=value)
        return self.op("Constant", value_int=value)

    def attr_const(self, attribute: str, kind: int = onnx.AttributeProto.INT) -> str:
        """A Constant whose value is the function attribute ``attribute``."""
        self._count += 1
        out = f"_{attribute}{self._count}"
        node = helper.make_node("Constant", [], [out])
        ref = onnx.AttributeProto()
        ref.name = "value_int" if kind == onnx.AttributeProto.INT else "value_ints"
        ref.type = kind  # type: ignore[assignment]
        ref.ref_attr_name = attribute
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def ref_attrs(self, node_attrs: Iterable[tuple[str, int]]) -> list[onnx.AttributeProto]:
        refs = []
        for name, kind in node_attrs:
            ref = onnx.AttributeProto()
            ref.name, ref.ref_attr_name = name, name
            ref.type = kind  # type: ignore[assignment]
            refs.append(ref)
        return refs


def _decode(body: _Body, packed: str, scales: str, zero_points: str) -> str:
    """Nodes that turn packed codes ``[R, P]`` into the float matrix ``[R, cols]``.

    Code ``i`` of a run of 8 starts at bit ``i*bits``: byte ``j = i*bits // 8``,
    offset ``o = i*bits % 8``; ``code = ((b[j] + 256*b[j+1]) // 2**o) % 2**bits``.
    """
    bits = body.attr_const("bits")
    group_size = body.attr_const("group_size")
    cols = body.attr_const("cols")
    zero, one, minus_one = body.const([0]), body.const([1]), body.const([-1])
    two, eight = body.const(2), body.const(8)
    rows = body.op("Slice", body.op("Shape", packed), zero, one)
    bits_1d = body.op("Unsqueeze", bits, zero)
    runs = body.op("Reshape", packed, body.op("Concat", rows, minus_one, bits_1d, axis=0))
    runs = body.op("Cast", runs, to=TensorProto.INT64)
    runs = body.op("Pad", runs, body.const([0, 0, 0, 0, 0, 1]))  # a zero byte after each run
    bit_offsets = body.op("Mul", body.op("Range", body.const(0), eight, body.const(1)), bits)
    first_byte = body.op("Div", bit_offsets, eight)
    low = body.op("Gather", runs, first_byte, axis=2)
    high = body.op("Gather", runs, body.op("Add", first_byte, body.const(1)), axis=2)
    window = body.op("Add", low, body.op("Mul", high, body.const(256)))
    shifted = body.op("Div", window, body.op("Pow", two, body.op("Mod", bit_offsets, eight)))
    codes = body.op("Mod", shifted, body.op("Pow", two, bits))
    group_1d = body.op("Unsqueeze", group_size, zero)
    codes = body.op("Reshape", codes, body.op("Concat", rows, minus_one, group_1d, axis=0))
    centred = body.op(
        "Sub",
        body.op("Cast", codes, to=TensorProto.FLOAT),
        body.op("Unsqueeze", body.op("Cast", zero_points, to=TensorProto.FLOAT), minus_one),
    )
    values = body.op(
        "Mul", centred, body.op("Unsqueeze", body.op("Cast", scales, to=TensorProto.FLOAT), minus_one)
    )
    flat = body.op("Reshape", values, body.op("Concat", rows, minus_one, axis=0))
    return body.op("Slice", flat, zero, body.op("Unsqueeze", cols, zero), one)


def _function(name: str, inputs: list[str], body: _Body, result: str, attributes: list[str], opset: int):
    body.nodes.append(helper.make_node("Identity", [result], ["Y"]))
    return helper.make_function(
        DOMAIN,
        name,
        inputs,
        ["Y"],
        body.nodes,
        [helper.make_opsetid("", opset)],
        attributes=attributes,
    )


def _qmatmul(opset: int) -> onnx.FunctionProto:
    body = _Body()
    weight = _decode(body, "packed", "scales", "zero_points")
    result = body.op("MatMul", "X", body.op("Transpose", weight, perm=[1, 0]))
    return _function("QMatMul", ["X", "packed", "scales", "zero_points"], body, result, _FORMAT_ATTRIBUTES, opset)


def _qgather(opset: int) -> onnx.FunctionProto:
    body = _Body()
    minus_one, one = body.const([-1]), body.const([1])
    packed_cols = body.op("Slice", body.op("Shape", "packed"), one, body.const([2]))
    row_shape = body.op("Concat", minus_one, packed_cols, axis=0)
    rows = body.op("Reshape", body.op("Gather", "packed", "indices", axis=0), row_shape)
    n_groups = body.op("Slice", body.op("Shape", "scales"), one, body.const([2]))
    group_shape = body.op("Concat", minus_one, n_groups, axis=0)
    scales = body.op("Reshape", body.op("Gather", "scales", "indices", axis=0), group_shape)
    zero_points = body.op("Reshape", body.op("Gather", "zero_points", "indices", axis=0), group_shape)
    values = _decode(body, rows, scales, zero_points)
    cols = body.op("Unsqueeze", body.attr_const("cols"), body.const([0]))
    out_shape = body.op("Concat", body.op("Shape", "indices"), cols, axis=0)
    result = body.op("Reshape", values, out_shape)
    return _function(
        "QGather", ["packed", "indices", "scales", "zero_points"], body, result, _FORMAT_ATTRIBUTES, opset
    )


def _qconv(opset: int) -> onnx.FunctionProto:
    body = _Body()
    weight = _decode(body, "packed", "scales", "zero_points")
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
    return _function(
        "QConv",
        ["X", "packed", "scales", "zero_points", "B"],
        body,
        "_conv",
        [*_FORMAT_ATTRIBUTES, "weight_shape", *CONV_ATTRIBUTES],
        opset,
    )


_BUILDERS = {"QMatMul": _qmatmul, "QGather": _qgather, "QConv": _qconv}


def reference_functions(op_types: Iterable[str], opset: int) -> list[onnx.FunctionProto]:
    """The reference functions for the given quantized op types, in a fixed order."""
    wanted = set(op_types)
    return [_BUILDERS[name](opset) for name in QUANTIZED_OPS if name in wanted]
