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

from . import mapped, qops
from .model import Model


def verify(model: Model) -> None:
    """Raise :class:`VerificationError` naming the first problem found."""
    graph = model.graph
    _check_names_and_dataflow(graph)
    for node in model.quantized_nodes():
        _check_quantized(node)
    proto = without_mapped_data(model.to_proto())
    if proto.ByteSize() < 2**31 - 1:
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise VerificationError(f"ONNX checker: {str(exc).splitlines()[0]}") from None


def without_mapped_data(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (modified) with its memory-mapped initializers turned into typed graph inputs:
    the checker then checks the graph without reading (or resolving) the weights' file."""
    kept = [t for t in proto.graph.initializer if mapped.mapped_info(t) is None]
    if len(kept) == len(proto.graph.initializer):
        return proto
    declared = {value.name for value in proto.graph.input}
    for tensor in proto.graph.initializer:
        if mapped.mapped_info(tensor) is not None and tensor.name not in declared:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


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
    try:
        fmt = qops.node_format(node)
    except ValueError as exc:
        raise VerificationError(f"{where}: {exc}") from None
    missing = [name for name in fmt.attributes if name not in node.attrs]
    if missing:
        raise VerificationError(f"{where}: {fmt.name} format attributes missing: {', '.join(missing)}")
    expected_inputs = len(fmt.inputs) + (2 if node.op == "QConv" else 1)
    if len(node.inputs) != expected_inputs:
        raise VerificationError(f"{where}: {len(node.inputs)} inputs, the {fmt.name} format needs {expected_inputs}")
    weight_inputs = qops.weight_inputs(node)
    if not all(isinstance(t, gs.Constant) for t in weight_inputs):
        raise VerificationError(f"{where}: {', '.join(fmt.inputs)} must be initializers")
    problem = fmt.check(node.attrs, [np.asarray(t.values) for t in weight_inputs])
    if problem:
        raise VerificationError(f"{where}: {problem}")
    cols = int(node.attrs.get("cols", 0))
    if node.op == "QConv" and int(np.prod(node.attrs["weight_shape"][1:])) != cols:
        raise VerificationError(f"{where}: weight_shape {node.attrs['weight_shape']} does not match cols={cols}")
