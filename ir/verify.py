"""Structural verification of a model, run after every pass.

Checks: the ONNX checker on the exported model (reference functions included), no
dangling values (every node input is a graph input, an initializer or some node's
output), unique node names and tensor producers, and that every quantized node's
weights agree with its format attributes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.errors import VerificationError

from .model import Model
from .qformat import MAX_BITS, MIN_BITS


def verify(model: Model) -> None:
    """Raise :class:`VerificationError` naming the first problem found."""
    graph = model.graph
    _check_names_and_dataflow(graph)
    for node in model.quantized_nodes():
        _check_quantized(node)
    proto = model.to_proto()
    if proto.ByteSize() < 2**31 - 1:
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise VerificationError(f"ONNX checker: {str(exc).splitlines()[0]}") from None


def _check_names_and_dataflow(graph: gs.Graph) -> None:
    names: set[str] = set()
    produced: set[str] = {t.name for t in graph.inputs}
    for node in graph.nodes:
        if node.name in names:
            raise VerificationError(f"duplicate node name {node.name!r}")
        names.add(node.name)
        for tensor in node.inputs:
            if tensor.name and not isinstance(tensor, gs.Constant) and tensor.name not in produced:
                raise VerificationError(f"node {node.name!r}: input {tensor.name!r} is never produced")
        for tensor in node.outputs:
            if tensor.name in produced:
                raise VerificationError(f"tensor {tensor.name!r} is produced twice")
            produced.add(tensor.name)
    for tensor in graph.outputs:
        if not isinstance(tensor, gs.Constant) and tensor.name not in produced:
            raise VerificationError(f"graph output {tensor.name!r} is never produced")


def _check_quantized(node: gs.Node) -> None:
    where = f"{node.op} {node.name!r}"
    if node.attrs.get("format") != "int":
        raise VerificationError(f"{where}: unknown format {node.attrs.get('format')!r}")
    bits, group_size, cols = (int(node.attrs[k]) for k in ("bits", "group_size", "cols"))
    if not MIN_BITS <= bits <= MAX_BITS or group_size <= 0 or group_size % 8 or cols <= 0:
        raise VerificationError(f"{where}: bad format attributes bits={bits} group_size={group_size} cols={cols}")
    weight_inputs = node.inputs[0:1] + node.inputs[2:4] if node.op == "QGather" else node.inputs[1:4]
    if not all(isinstance(t, gs.Constant) for t in weight_inputs):
        raise VerificationError(f"{where}: packed weight, scales and zero points must be initializers")
    packed, scales, zero_points = (np.asarray(t.values) for t in weight_inputs)
    n_groups = -(-cols // group_size)
    expected = (packed.shape[0], n_groups * group_size * bits // 8)
    if packed.dtype != np.uint8 or packed.shape != expected:
        raise VerificationError(f"{where}: packed weight is {packed.dtype}{list(packed.shape)}, expected uint8{list(expected)}")
    if scales.shape != (packed.shape[0], n_groups) or zero_points.shape != scales.shape:
        raise VerificationError(f"{where}: scales/zero points shape {scales.shape}/{zero_points.shape}, expected {(packed.shape[0], n_groups)}")
    if not np.isfinite(scales.astype(np.float32)).all():
        raise VerificationError(f"{where}: non-finite scales")
    if node.op == "QConv" and int(np.prod(node.attrs["weight_shape"][1:])) != cols:
        raise VerificationError(f"{where}: weight_shape {node.attrs['weight_shape']} does not match cols={cols}")

