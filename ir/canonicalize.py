"""Canonical form of an imported model.

Shape inference, optional static input shapes, constant folding, topological order,
and unique node names. Models older than opset 13 are upgraded (the reference
functions of quantized ops are written against opset >= 13 semantics).
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from qcompile.errors import UnsupportedModelError, UsageError

from . import mapped
from .model import Model

log = logging.getLogger(__name__)

MIN_OPSET = 13


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["input_ids=1x128", ...]`` -> ``{"input_ids": (1, 128)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.partition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x")) if sep and dims else ()
        except ValueError:
            shape = ()
        if not name or not shape or any(d <= 0 for d in shape):
            raise UsageError(f"--input-shape {spec!r}: expected NAME=DxDx..., e.g. input_ids=1x128")
        shapes[name] = shape
    return shapes


def expand_input_shapes(shapes: dict[str, tuple[int, ...]], inputs: list[str]) -> dict[str, tuple[int, ...]]:
    """``shapes`` with glob patterns (``past_key_values.*=1x3x127x64``) replaced by the inputs they
    match; exact names win over patterns. A pattern that matches no input is an error."""
    patterns = {name: shape for name, shape in shapes.items() if any(c in name for c in "*?[")}
    expanded: dict[str, tuple[int, ...]] = {}
    for pattern, shape in patterns.items():
        matched = fnmatch.filter(inputs, pattern)
        if not matched:
            raise UsageError(f"--input-shape {pattern}: the pattern matches no input (inputs: {', '.join(inputs)})")
        expanded.update(dict.fromkeys(matched, shape))
    expanded.update({name: shape for name, shape in shapes.items() if name not in patterns})
    return expanded


def canonicalize(model: Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Model:
    """Return the canonical form of ``model`` (a new object; ``model`` is untouched)."""
    proto = model.to_proto()
    proto = _upgrade_opset(proto)
    if input_shapes:
        _set_input_shapes(proto, input_shapes)
    proto = infer_shapes(proto)
    graph = gs.import_onnx(proto)
    mapped.map_external(graph)
    graph.cleanup(remove_unused_graph_inputs=False)
    if not any(node.domain == "qcompile" for node in graph.nodes):
        fold_constants(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
    try:
        graph.toposort()
    except Exception as exc:  # gs raises a bare exception on cycles
        raise UnsupportedModelError(f"graph is not a DAG ({exc})") from None
    _unique_names(graph)
    result = Model(graph, metadata=model.metadata, provenance=model.provenance, source=model.source)
    return Model.from_proto(infer_shapes(result.to_proto()), source=model.source)


def fold_constants(graph: gs.Graph) -> None:
    """onnx-graphsurgeon's constant folding, with ``Shape(start=, end=)`` (opset 15) kept exact.

    graphsurgeon 0.6 folds ``Shape`` from its input's shape and ignores ``start``/``end``: a
    ``Shape(x, start=1, end=2)`` of a static ``[1, 9]`` input became ``[1, 9]`` instead of
    ``[9]``, and a ``Gather`` of one took the wrong dimension (the ``torch.export`` exporter
    writes every symbolic size that way). Each such ``Shape`` is first split into a full
    ``Shape`` and a ``Slice`` of it, which graphsurgeon folds correctly (or leaves alone).
    """
    for node in list(graph.nodes):
        if node.op != "Shape" or ("start" not in node.attrs and "end" not in node.attrs):
            continue
        start, end = int(node.attrs.pop("start", 0)), node.attrs.pop("end", None)
        output = node.outputs[0]
        full = gs.Variable(f"{output.name}.full", dtype=np.int64)
        node.outputs = [full]
        bounds = {"start": start, "end": np.iinfo(np.int64).max if end is None else int(end), "axis": 0}
        constants = [gs.Constant(f"{output.name}.{k}", np.array([v], np.int64)) for k, v in bounds.items()]
        graph.nodes.append(gs.Node("Slice", f"{node.name}.slice", inputs=[full, *constants], outputs=[output]))
    graph.fold_constants(error_ok=True)


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, keeping the model as it is when inference fails."""
    if proto.ByteSize() > 2**31 - 1:
        return proto
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # inference is an aid, not a requirement
        log.warning("shape inference failed, continuing without it: %s", exc)
        return proto


def _upgrade_opset(proto: onnx.ModelProto) -> onnx.ModelProto:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)
    if opset >= MIN_OPSET:
        return proto
    try:
        return version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:
        raise UnsupportedModelError(
            f"opset {opset} model could not be upgraded to opset {MIN_OPSET} ({str(exc).splitlines()[0]})"
        ) from None


def _set_input_shapes(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    inputs = {value.name: value for value in proto.graph.input}
    for name, shape in shapes.items():
        if name not in inputs:
            raise UsageError(f"--input-shape {name}: the model has no input {name!r} (inputs: {', '.join(inputs)})")
        tensor_type = inputs[name].type.tensor_type
        old = tensor_type.shape.dim
        if len(old) and len(old) != len(shape):
            raise UsageError(f"--input-shape {name}: model input has rank {len(old)}, got {len(shape)} dims")
        for i, dim in enumerate(old):
            if dim.HasField("dim_value") and dim.dim_value != shape[i]:
                raise UsageError(
                    f"--input-shape {name}: dim {i} is fixed to {dim.dim_value} in the model, got {shape[i]}"
                )
        del tensor_type.shape.dim[:]
        for size in shape:
            tensor_type.shape.dim.add().dim_value = size
    for value in proto.graph.value_info:  # stale symbolic shapes would block re-inference
        value.type.tensor_type.ClearField("shape")


def _unique_names(graph: gs.Graph) -> None:
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)
