"""The IR's model container: an onnx-graphsurgeon graph plus what surrounds it.

``Model`` wraps a ``gs.Graph`` and carries the metadata that ONNX keeps outside the
graph (metadata properties, IR version) and the provenance of every node a pass
created (written to the node's ``metadata_props`` as ``qcompile.pass``). The
reference functions of quantized ops are never stored: :meth:`Model.to_proto`
regenerates them from the op types present, so they cannot go stale.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import mapped, qops

PROVENANCE_KEY = "qcompile.pass"
MIN_IR_VERSION = 10  # node metadata_props (provenance) need IR version 10


class Model:
    """An ONNX model under compilation."""

    def __init__(
        self,
        graph: gs.Graph,
        *,
        metadata: dict[str, str] | None = None,
        provenance: dict[str, str] | None = None,
        source: Path | None = None,
    ) -> None:
        self.graph = graph
        self.metadata = dict(metadata or {})
        self.provenance = dict(provenance or {})
        self.source = source

    # -- conversion ------------------------------------------------------------------

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source: Path | None = None) -> Model:
        """Import a model; reference functions of the qcompile domain are dropped."""
        if any(f.domain == qops.DOMAIN for f in proto.functions):
            kept = [f for f in proto.functions if f.domain != qops.DOMAIN]
            proto = copy.copy(proto)  # never edit the caller's proto
            del proto.functions[:]
            proto.functions.extend(kept)
        provenance = {
            node.name: prop.value
            for node in proto.graph.node
            for prop in node.metadata_props
            if prop.key == PROVENANCE_KEY
        }
        graph = gs.import_onnx(proto)
        mapped.map_external(graph)  # weights exported as references to their file stay there
        metadata = {prop.key: prop.value for prop in proto.metadata_props}
        return cls(graph, metadata=metadata, provenance=provenance, source=source)

    def to_proto(self) -> onnx.ModelProto:
        """Export to ONNX with the reference functions the quantized ops need."""
        graph = self.graph
        function_keys = [qops.function_key(node) if qops.is_quantized(node) else None for node in graph.nodes]
        domains = [d for d in (graph.import_domains or []) if d.domain != qops.DOMAIN]
        if any(function_keys):
            domains.append(onnx.helper.make_opsetid(qops.DOMAIN, qops.DOMAIN_VERSION))
        graph.import_domains = domains or None
        proto = gs.export_onnx(graph, do_type_check=False)
        if not any(d.domain in ("", "ai.onnx") for d in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("", self.opset))
        proto.functions.extend(qops.reference_functions(filter(None, function_keys), self.opset))
        proto.ir_version = max(proto.ir_version, MIN_IR_VERSION)
        proto.producer_name = "qcompile"
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, self.metadata)
        for node, key in zip(proto.graph.node, function_keys, strict=True):
            if key is not None:
                node.overload = key[1]  # graphsurgeon does not carry overloads
            if node.name in self.provenance:
                prop = node.metadata_props.add()
                prop.key, prop.value = PROVENANCE_KEY, self.provenance[node.name]
        return proto

    def copy(self) -> Model:
        """An independent copy of the graph: new nodes, tensors and attribute dicts; the weight
        arrays are shared (passes replace a constant's values, never edit them in place), so a
        copy costs no weight bytes."""
        graph = self.graph.copy()
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Variable) and isinstance(tensor.shape, list):
                tensor.shape = list(tensor.shape)  # graphsurgeon shares the shape list
        return Model(graph, metadata=self.metadata, provenance=self.provenance, source=self.source)

    # -- queries ---------------------------------------------------------------------

    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def quantized_nodes(self) -> list[gs.Node]:
        return [node for node in self.graph.nodes if qops.is_quantized(node)]

    def tensors(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def constant_bytes(self) -> int:
        """Bytes of every initializer: the size of the weights on disk."""
        return sum(
            constant_nbytes(tensor)
            for tensor in self.graph.tensors().values()
            if isinstance(tensor, gs.Constant)
        )

    def mark(self, node: gs.Node, pass_name: str) -> None:
        """Record that ``pass_name`` created ``node`` (its provenance)."""
        self.provenance[node.name] = pass_name

    def splice(self, nodes: list[gs.Node], readers: list[gs.Node], old: gs.Tensor, new: gs.Tensor,
               pass_name: str) -> None:
        """Add ``nodes`` (which compute ``new`` from ``old``) and make ``readers`` read ``new``."""
        for reader in readers:
            for index, value in enumerate(list(reader.inputs)):
                if value is old:
                    reader.inputs[index] = new
        self.graph.nodes.extend(nodes)
        for node in nodes:
            self.mark(node, pass_name)


def constant_nbytes(constant: gs.Constant) -> int:
    """Bytes of a constant's values (from its shape and dtype, without loading them)."""
    shape = constant.shape or ()
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(constant.dtype).itemsize


def constant_bias_add(graph: gs.Graph, layer: gs.Node, width: int | None = None
                      ) -> tuple[gs.Node, gs.Constant] | None:
    """The ``Add`` of a constant 1-D float32 bias that alone consumes ``layer``'s output.

    Returns that ``Add`` and its bias (``width`` long when given), or None. The pattern
    a bias takes after a MatMul in exported graphs; passes fold into it and backends
    fold it into their kernels.
    """
    output = layer.outputs[0]
    if output in graph.outputs or len(output.outputs) != 1:
        return None
    add = output.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    bias = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    if not isinstance(bias, gs.Constant) or len(bias.shape) != 1 or bias.dtype != np.float32:
        return None
    if width is not None and bias.shape[0] != width:
        return None
    return add, bias
