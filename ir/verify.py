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
from .model import Model, constant_nbytes


def verify(model: Model) -> None:
    """Raise :class:`VerificationError` naming the first problem found."""
    graph = model.graph
    _check_names_and_dataflow(graph)
    for node in model.quantized_nodes():
        _check_quantized(node)
    proto = weightless(model).to_proto()
    if proto.ByteSize() < 2**31 - 1:
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise VerificationError(f"ONNX checker: {str(exc).splitlines()[0]}") from None


WEIGHT_BYTES = 1024  # constants this large are weights: the checker sees them as typed inputs


def weightless(model: Model) -> Model:
    """A copy of ``model`` whose weights (memory-mapped, or in memory and at least
    :data:`WEIGHT_BYTES`) are typed graph inputs: the checker checks every node, function and
    type without the exported proto holding a second copy of the weights, or reading their file."""
    copied = model.copy()
    graph = copied.graph
    stand_ins: dict[str, gs.Variable] = {}
    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and _is_weight(tensor):
                if tensor.name not in stand_ins:
                    stand_ins[tensor.name] = gs.Variable(tensor.name, dtype=tensor.export_dtype,
                                                         shape=list(tensor.shape))
                node.inputs[index] = stand_ins[tensor.name]
    declared = {tensor.name for tensor in graph.inputs}
    graph.inputs = [stand_ins.get(tensor.name, tensor) for tensor in graph.inputs]
    graph.inputs.extend(stand_in for name, stand_in in stand_ins.items() if name not in declared)
    return copied


def _is_weight(tensor: gs.Constant) -> bool:
    return isinstance(tensor._values, mapped.MappedValues) or constant_nbytes(tensor) >= WEIGHT_BYTES


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
