"""ONNX Runtime backend: the IR becomes a model ONNX Runtime runs fast.

* ``QMatMul`` with 2, 4 or 8 bits and a power-of-two group size >= 16 becomes
  ``com.microsoft.MatMulNBits``, reusing the packed bytes as they are (the IR's
  packing is MatMulNBits' layout). ``accuracy_level`` 4 lets the CPU kernel quantize
  the activations to int8 on the fly and use integer dot products (much faster at
  large batch; the error it adds is measured and recorded).
* ``QGather`` likewise becomes ``com.microsoft.GatherBlockQuantized``.
* Everything else stays a ``qcompile`` op with its reference function, which ONNX
  Runtime inlines and constant-folds when the session starts: small on disk, FP32
  speed (3-bit ``int`` weights, ``QConv``).

Targets: ``cpu``; ``cuda`` (CUDA execution provider first in the manifest); ``edge``
(also writes the ``.ort`` format for ONNX Runtime Mobile).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from qcompile.ir import io, qops
from qcompile.ir.model import Model
from qcompile.ir.qformat import QuantizedWeight, pack_codes

from qcompile.errors import BackendError

log = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "edge")
MSFT_DOMAIN = "com.microsoft"
NATIVE_BITS = (2, 4, 8)
MODEL_FILE = "model.onnx"
ORT_FILE = "model.ort"


def providers_for(target: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if target == "cuda" else ["CPUExecutionProvider"]


def lower(model: Model, *, accuracy_level: int = 4) -> tuple[Model, dict[str, str]]:
    """A copy of ``model`` with native ONNX Runtime kernels; returns it and, per layer, the kernel used."""
    lowered = model.copy()
    graph = lowered.graph
    kernels: dict[str, str] = {}
    for node in list(graph.nodes):
        if not qops.is_quantized(node):
            continue
        weight = qops.read_weight(node)
        native = weight.bits in NATIVE_BITS and _power_of_two(weight.group_size)
        replacement: list[gs.Node] | None = None
        if native and node.op == "QMatMul":
            replacement = [_matmul_nbits(node, weight, accuracy_level)]
        elif native and node.op == "QGather":
            replacement = _gather_block_quantized(node, weight)
        if replacement is None:
            kernels[node.name] = f"{node.op} reference function (decoded when the session starts)"
            continue
        kernels[node.name] = replacement[0].op
        position = graph.nodes.index(node)
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes[position : position + 1] = replacement
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if any(n.domain == MSFT_DOMAIN for n in graph.nodes):
        domains = [d for d in (graph.import_domains or []) if d.domain != MSFT_DOMAIN]
        graph.import_domains = [*domains, onnx.helper.make_opsetid(MSFT_DOMAIN, 1)]
    return lowered, kernels


def _power_of_two(value: int) -> bool:
    return value >= 16 and value & (value - 1) == 0


def _packed_zero_points(weight: QuantizedWeight) -> np.ndarray:
    """Zero points packed ``bits`` per value along the groups, as MatMulNBits expects."""
    padded = np.zeros((weight.rows, -(-weight.n_groups // 8) * 8), np.uint8)
    padded[:, : weight.n_groups] = weight.zero_points
    return pack_codes(padded, weight.bits)[:, : -(-weight.n_groups * weight.bits // 8)]


def _matmul_nbits(node: gs.Node, weight: QuantizedWeight, accuracy_level: int) -> gs.Node:
    name = node.inputs[1].name
    blob = weight.group_size * weight.bits // 8
    inputs = [
        node.inputs[0],
        gs.Constant(f"{name}.nbits", weight.packed.reshape(weight.rows, weight.n_groups, blob)),
        gs.Constant(f"{name}.nbits_scales", weight.scales.astype(np.float32).reshape(-1)),
    ]
    if not weight.sym:
        inputs.append(gs.Constant(f"{name}.nbits_zero_points", _packed_zero_points(weight).reshape(-1)))
    attrs = {
        "K": weight.cols,
        "N": weight.rows,
        "bits": weight.bits,
        "block_size": weight.group_size,
        "accuracy_level": accuracy_level,
    }
    return gs.Node("MatMulNBits", node.name, attrs, inputs, list(node.outputs), domain=MSFT_DOMAIN)


def _gather_block_quantized(node: gs.Node, weight: QuantizedWeight) -> list[gs.Node]:
    name = node.inputs[0].name
    inputs = [
        gs.Constant(f"{name}.gbq", weight.packed),
        node.inputs[1],
        gs.Constant(f"{name}.gbq_scales", weight.scales),
    ]
    if not weight.sym:
        inputs.append(gs.Constant(f"{name}.gbq_zero_points", _packed_zero_points(weight)))
    attrs = {"bits": weight.bits, "block_size": weight.group_size, "gather_axis": 0, "quantize_axis": 1}
    output = node.outputs[0]
    if weight.scales.dtype == np.float32:
        return [gs.Node("GatherBlockQuantized", node.name, attrs, inputs, [output], domain=MSFT_DOMAIN)]
    half = gs.Variable(f"{output.name}/fp16", weight.scales.dtype, output.shape)
    return [
        gs.Node("GatherBlockQuantized", node.name, attrs, inputs, [half], domain=MSFT_DOMAIN),
        gs.Node("Cast", f"{node.name}/cast", {"to": onnx.TensorProto.FLOAT}, [half], [output]),
    ]


def emit(model: Model, folder: Path, *, target: str = "cpu", accuracy_level: int = 4) -> dict:
    """Write the ONNX Runtime artifact's model files into ``folder``; return the manifest section."""
    if target not in TARGETS:
        raise BackendError(f"backend ort: unknown target {target!r} (targets: {', '.join(TARGETS)})")
    lowered, kernels = lower(model, accuracy_level=accuracy_level)
    model_path = io.save(lowered, folder / MODEL_FILE)
    files = [MODEL_FILE] + [p.name for p in folder.glob(f"{MODEL_FILE}.data")]
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if target == "edge":
            options.optimized_model_filepath = str(folder / ORT_FILE)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            options.add_session_config_entry("session.save_model_format", "ORT")
            files.append(ORT_FILE)
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BackendError(f"backend ort: ONNX Runtime rejected the emitted model ({str(exc).splitlines()[0]})") from None
    return {
        "backend": "ort",
        "target": target,
        "providers": providers_for(target),
        "model_file": MODEL_FILE,
        "files": files,
        "accuracy_level": accuracy_level,
        "kernels": kernels,
    }
