"""ONNX Runtime backend: the IR becomes a model ONNX Runtime runs fast.

* ``QMatMul`` with 2, 4 or 8 bits and a power-of-two group size >= 16 becomes
  ``com.microsoft.MatMulNBits``, reusing the packed bytes as they are (the IR's
  packing is MatMulNBits' layout). ``accuracy_level`` 4 lets the CPU kernel quantize
  the activations to int8 on the fly and use integer dot products (much faster at
  large batch; the error it adds is measured and recorded).
* ``QMatMul`` with 8-bit per-channel symmetric weights whose input is quantized by a
  ``QuantizeLinear`` (``quant(act_bits=8)``) → ``com.microsoft.MatMulIntegerToFloat``:
  a u8s8 integer GEMM, exact with respect to the IR's QDQ semantics.
* ``QGather`` likewise becomes ``com.microsoft.GatherBlockQuantized`` (when its rows
  hold whole groups: that kernel infers the row length from the packed bytes).
* A ``QGather`` and a ``QMatMul`` that read the same packed weight (a tied embedding and
  LM head) keep one copy on disk: the MatMulNBits inputs are ``Reshape`` views of the
  GatherBlockQuantized initializers (the bytes are the same; ONNX Runtime folds the
  reshapes when the session starts).
* 3-bit ``int`` weights run in the 4-bit kernels (their codes re-packed at 4 bits, an
  exact change); on disk they stay 3-bit, as do float16 scales (:mod:`.ort_storage`:
  standard ops widen them when the session starts).
* Everything else stays a ``qcompile`` op with its reference function, which ONNX
  Runtime inlines and constant-folds when the session starts: small on disk, FP32
  speed (``QConv``, other formats, and sparse weights: ONNX Runtime has no sparse
  kernel, so the bitmask / N:M forms are decoded to dense float).

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

from qcompile.errors import BackendError, UnsupportedModelError
from qcompile.ir import io, qops, runtime
from qcompile.ir.model import Model, constant_bias_add
from qcompile.ir.qformat import QuantizedWeight, pack_codes, unpack_codes
from qcompile.ir.sparse import SparseWeight

from . import ort_fusion
from .ort_storage import compact

log = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "edge")
MSFT_DOMAIN = "com.microsoft"
NATIVE_BITS = (2, 4, 8)
WIDENED_BITS = {3: 4}  # code widths without a kernel: run in the next wider one
MODEL_FILE = "model.onnx"
ORT_FILE = "model.ort"
# ONNX Runtime fuses the residual Add + LayerNormalization after a MatMulNBits into
# SkipLayerNormalization, whose CPU kernel measured 2x slower than the two ops it
# replaces (MiniLM, batch 8 x seq 64: 10.7 ms vs 4.9 ms); artifact sessions skip it.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def make_session(model_path: Path, backend: dict, *, providers: list[str] | None = None,
                 threads: int | None = None) -> ort.InferenceSession:
    """The ONNX Runtime session an artifact runs in, with the options its manifest records.

    Layers left to their reference functions (formats ONNX Runtime has no kernel for, e.g.
    ``bcq``) are decoded to float with NumPy first (:func:`qcompile.ir.qops.decode_to_float`):
    the file keeps them packed, and plain ONNX Runtime still runs it as it is, but decoding
    inside the session holds far more memory than the float model.
    """
    if _has_reference_layers(model_path):
        model = io.load(model_path)
        layers = qops.decode_to_float(model.graph)
        try:
            session = runtime.make_session(model, threads=threads, providers=providers,
                                           disabled_optimizers=backend.get("disabled_optimizers", []))
        except UnsupportedModelError as exc:
            raise BackendError(f"ONNX Runtime cannot load the artifact: {exc}") from None
        session._qcompile_decoded_layers = layers  # type: ignore[attr-defined]
        return session
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(model_path),
            options,
            providers=providers or ["CPUExecutionProvider"],
            disabled_optimizers=list(backend.get("disabled_optimizers", [])),
        )
    except Exception as exc:  # ORT's own exception types
        raise BackendError(f"ONNX Runtime cannot load the artifact: {runtime.ort_message(exc)}") from None


def _has_reference_layers(model_path: Path) -> bool:
    """Whether the artifact's graph still holds ``qcompile`` quantized ops (read without its weights)."""
    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - unreadable: ONNX Runtime gives the error below
        return False
    return any(node.domain == qops.DOMAIN for node in graph.node)


def providers_for(target: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if target == "cuda" else ["CPUExecutionProvider"]


def lower(model: Model, *, accuracy_level: int = 4, fuse: bool = True
          ) -> tuple[Model, dict[str, str], list[list[str]], dict, dict]:
    """A copy of ``model`` with native ONNX Runtime kernels.

    Returns the lowered model, the kernel used per quantized layer, the groups of layers
    merged into one kernel because they read the same input, what was stored narrower
    on disk than the kernels read it, and what :mod:`.ort_fusion` fused (``fuse``: RMSNorm,
    residual + RMSNorm and attention blocks into ONNX Runtime's fused kernels).
    """
    lowered = model.copy()
    graph = lowered.graph
    kernels: dict[str, str] = {}
    tied = _tied_weights(graph)
    gather_constants: dict[str, dict[str, gs.Constant]] = {}
    for node in list(graph.nodes):
        if not qops.is_quantized(node):
            continue
        ir_weight = qops.read_weight(node)
        weight = _kernel_weight(ir_weight)
        if isinstance(weight, SparseWeight):
            kernels[node.name] = (f"{node.op} reference function, {weight.format} format ({weight.pattern}): no sparse "
                                  "kernel in ONNX Runtime, decoded to dense float when the session starts")
            continue
        if not isinstance(weight, QuantizedWeight):  # formats without an ONNX Runtime kernel
            kernels[node.name] = f"{node.op} reference function, {weight.format} format (decoded when the session starts)"
            continue
        native = weight.bits in NATIVE_BITS and _power_of_two(weight.group_size) and not (
            weight.bits == 2 and weight.group_size > 256)  # 2-bit MatMulNBits refuses blocks over 256
        replacement: list[gs.Node] | None = None
        quantized_input = _quantized_input(node) if node.op == "QMatMul" else None
        if quantized_input is not None and _integer_gemm_weight(weight):
            replacement = [_matmul_integer(node, weight, quantized_input,
                                           constant_bias_add(graph, node, weight.rows))]
        elif native and node.op == "QMatMul":
            name = node.inputs[1].name
            views = _gather_views(node, weight, gather_constants[name]) if name in tied else None
            if views is None and _read_by_qgather(node.inputs[1]):
                views = _packed_view(node, weight)
            replacement = [_matmul_nbits(node, weight, accuracy_level, constant_bias_add(graph, node, weight.rows),
                                         views[0] if views else None)]
            replacement += views[1] if views else []
        elif native and node.op == "QGather" and weight.cols % weight.group_size == 0:
            replacement = _gather_block_quantized(node, weight)
            if node.inputs[0].name in tied:
                gather_constants[node.inputs[0].name] = _gather_inputs(replacement[0])
        if replacement is None:
            kernels[node.name] = f"{node.op} reference function (decoded when the session starts)"
            continue
        kernels[node.name] = replacement[0].op + (f" ({ir_weight.bits}-bit codes in the {weight.bits}-bit kernel)"
                                                  if weight is not ir_weight else "")
        position = graph.nodes.index(node)
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes[position : position + 1] = replacement
    merged_groups = _merge_shared_input(graph)
    fusion = ort_fusion.fuse(graph) if fuse else {"fused": {}, "skipped": {}, "disabled": True}
    graph.cleanup(remove_unused_graph_inputs=False)
    storage = compact(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if any(n.domain == MSFT_DOMAIN for n in graph.nodes):
        domains = [d for d in (graph.import_domains or []) if d.domain != MSFT_DOMAIN]
        graph.import_domains = [*domains, onnx.helper.make_opsetid(MSFT_DOMAIN, 1)]
    return lowered, kernels, merged_groups, storage.summary(), fusion


def _kernel_weight(weight):
    """``weight`` as the kernel reads it: 3-bit ``int`` codes re-packed at 4 bits (same values)."""
    if not isinstance(weight, QuantizedWeight) or weight.bits not in WIDENED_BITS:
        return weight
    wide = WIDENED_BITS[weight.bits]
    codes = unpack_codes(weight.packed, weight.bits)
    # the kernels' implicit symmetric zero point is 2**(wide-1): give the narrow one explicitly
    zero_points = np.full_like(weight.zero_points, 1 << (weight.bits - 1)) if weight.sym else weight.zero_points
    return QuantizedWeight(pack_codes(codes, wide), weight.scales, zero_points, wide, weight.group_size,
                           weight.cols, sym=False)


def _tied_weights(graph: gs.Graph) -> set[str]:
    """Packed weights read by both a natively lowerable ``QGather`` and a ``QMatMul`` (tied embedding + LM head).

    QGather nodes come first in the returned order of lowering: the graph is sorted, and
    an embedding lookup precedes the LM head that shares its table.
    """
    gathers, matmuls = set(), set()
    for node in graph.nodes:
        if not qops.is_quantized(node):
            continue
        weight = qops.read_weight(node)  # only its layout matters here: no need to re-pack 3-bit codes
        if not isinstance(weight, QuantizedWeight) or weight.bits not in (*NATIVE_BITS, *WIDENED_BITS) or \
                not _power_of_two(weight.group_size) or weight.cols % weight.group_size:
            continue
        if node.op == "QGather":
            gathers.add(node.inputs[0].name)
        elif node.op == "QMatMul":
            matmuls.add(node.inputs[1].name)
    first_gather = {}
    for node in graph.nodes:
        if node.op == "QGather" and node.inputs[0].name in gathers:
            first_gather.setdefault(node.inputs[0].name, graph.nodes.index(node))
    matmul_positions = {node.inputs[1].name: graph.nodes.index(node) for node in graph.nodes if node.op == "QMatMul"}
    return {name for name in gathers & matmuls if first_gather[name] < matmul_positions[name]}


def _read_by_qgather(packed: gs.Tensor) -> bool:
    return any(reader.op == "QGather" for reader in packed.outputs)


def _packed_view(node: gs.Node, weight: QuantizedWeight) -> tuple[list[gs.Tensor], list[gs.Node]] | None:
    """MatMulNBits' B as a Reshape view of the IR's packed bytes, which a QGather that keeps its
    reference function (rows not a whole number of groups) also reads: one copy of a tied table."""
    packed = node.inputs[1]
    blob = weight.group_size * weight.bits // 8
    if not isinstance(packed, gs.Constant) or packed.values.size != weight.rows * weight.n_groups * blob:
        return None
    view = gs.Variable(f"{node.name}.tied_data", np.uint8)
    shape = gs.Constant(f"{node.name}.tied_data_shape", np.array([weight.rows, weight.n_groups, blob], np.int64))
    reshape = gs.Node("Reshape", f"{node.name}/tied_data", inputs=[packed, shape], outputs=[view])
    scales = gs.Constant(f"{packed.name}.nbits_scales", weight.scales.astype(np.float32).reshape(-1))
    zero_points = (gs.Constant(f"{packed.name}.nbits_zero_points", _packed_zero_points(weight).reshape(-1))
                   if not weight.sym else gs.Variable.empty())
    return [view, scales, zero_points], [reshape]


def _gather_inputs(gather: gs.Node) -> dict[str, gs.Constant]:
    names = ("data", "indices", "scales", "zero_points")
    return {role: tensor for role, tensor in zip(names, gather.inputs, strict=False)
            if isinstance(tensor, gs.Constant)}


def _gather_views(node: gs.Node, weight: QuantizedWeight, constants: dict[str, gs.Constant]
                  ) -> tuple[list[gs.Tensor], list[gs.Node]]:
    """MatMulNBits' B, scales and zero points as Reshape views of a GatherBlockQuantized's initializers."""
    blob = weight.group_size * weight.bits // 8
    shapes = {"data": [weight.rows, weight.n_groups, blob], "scales": [-1], "zero_points": [-1]}
    tensors: list[gs.Tensor] = []
    nodes = []
    for role in ("data", "scales", "zero_points"):
        if role not in constants:
            tensors.append(gs.Variable.empty())
            continue
        view = gs.Variable(f"{node.name}.tied_{role}", constants[role].dtype)
        shape = gs.Constant(f"{node.name}.tied_{role}_shape", np.array(shapes[role], np.int64))
        nodes.append(gs.Node("Reshape", f"{node.name}/tied_{role}", inputs=[constants[role], shape], outputs=[view]))
        tensors.append(view)
    return tensors, nodes


def _merge_shared_input(graph: gs.Graph) -> list[list[str]]:
    """Merge MatMulNBits nodes that read the same input (attention Q, K, V) into one.

    Exact: output columns are independent, so the weights, scales, zero points and
    biases are concatenated along N and a ``Split`` restores the original outputs.
    The activation is then quantized once and the wider GEMM runs more efficiently.
    Returns the names of every merged group.
    """
    groups: dict[tuple, list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op == "MatMulNBits" and node.domain == MSFT_DOMAIN:
            has_zero_points = len(node.inputs) > 3 and bool(node.inputs[3].name)
            key = (node.inputs[0].name, node.attrs["K"], node.attrs["bits"], node.attrs["block_size"],
                   node.attrs["accuracy_level"], has_zero_points)
            groups.setdefault(key, []).append(node)
    merged = []
    for (_, _, _, _, _, has_zero_points), members in groups.items():
        if len(members) < 2:
            continue
        merged.append([m.name for m in members])
        _merge(graph, members, has_zero_points)
    return merged


def _merge(graph: gs.Graph, members: list[gs.Node], has_zero_points: bool) -> None:
    first = members[0]
    widths = [int(m.attrs["N"]) for m in members]

    def concat(index: int, suffix: str, fill=None) -> gs.Constant:
        parts = []
        for member, width in zip(members, widths, strict=True):
            tensor = member.inputs[index] if len(member.inputs) > index else None
            parts.append(np.asarray(tensor.values) if tensor is not None and tensor.name else fill(width))
        return gs.Constant(f"{first.name}.merged_{suffix}", np.concatenate(parts, axis=0))

    inputs = [first.inputs[0], concat(1, "B"), concat(2, "scales")]
    inputs.append(concat(3, "zero_points") if has_zero_points else gs.Variable.empty())
    inputs.append(gs.Variable.empty())
    if any(len(m.inputs) > 5 and m.inputs[5].name for m in members):
        inputs.append(concat(5, "bias", fill=lambda width: np.zeros(width, np.float32)))
    outputs = [m.outputs[0] for m in members]
    wide = gs.Variable(f"{first.name}.merged_out", np.float32)
    attrs = {**first.attrs, "N": sum(widths)}
    fused = gs.Node("MatMulNBits", f"{first.name}/merged", attrs, inputs, [wide], domain=MSFT_DOMAIN)
    sizes = gs.Constant(f"{first.name}.merged_split", np.array(widths, np.int64))
    split = gs.Node("Split", f"{first.name}/merged_split", {"axis": -1}, [wide, sizes], outputs)
    for member in members:
        member.inputs.clear()
        member.outputs.clear()
    graph.nodes.extend([fused, split])


def _power_of_two(value: int) -> bool:
    return value >= 16 and value & (value - 1) == 0


def _packed_zero_points(weight: QuantizedWeight) -> np.ndarray:
    """Zero points packed ``bits`` per value along the groups, as MatMulNBits expects."""
    padded = np.zeros((weight.rows, -(-weight.n_groups // 8) * 8), np.uint8)
    padded[:, : weight.n_groups] = weight.zero_points
    return pack_codes(padded, weight.bits)[:, : -(-weight.n_groups * weight.bits // 8)]


def _quantized_input(node: gs.Node) -> gs.Node | None:
    """The 8-bit ``QuantizeLinear`` whose ``DequantizeLinear`` feeds ``node`` directly, if any."""
    producers = node.inputs[0].inputs
    if len(producers) != 1 or producers[0].op != "DequantizeLinear":
        return None
    dequantize = producers[0]
    sources = dequantize.inputs[0].inputs
    if len(sources) != 1 or sources[0].op != "QuantizeLinear" or dequantize.inputs[0].dtype != np.uint8:
        return None
    quantize = sources[0]
    same = all(a is b for a, b in zip(quantize.inputs[1:3], dequantize.inputs[1:3], strict=False))
    return quantize if same and len(quantize.inputs) == 3 else None


def _integer_gemm_weight(weight: QuantizedWeight) -> bool:
    """8-bit, one symmetric scale per output channel: exactly an int8 GEMM operand."""
    return weight.bits == 8 and weight.n_groups == 1 and weight.sym


def _absorb_bias(node: gs.Node, bias_add: tuple[gs.Node, gs.Constant] | None
                 ) -> tuple[gs.Constant | None, list[gs.Tensor]]:
    """Detach a following bias ``Add``: its constant, and the outputs the fused kernel takes over."""
    if bias_add is None:
        return None, list(node.outputs)
    add, bias = bias_add
    outputs = list(add.outputs)
    add.inputs.clear()
    add.outputs.clear()
    return bias, outputs


def _matmul_integer(node: gs.Node, weight: QuantizedWeight, quantize: gs.Node,
                    bias_add: tuple[gs.Node, gs.Constant] | None) -> gs.Node:
    """``MatMulIntegerToFloat`` on the quantized activation and int8 weights (u8s8 GEMM)."""
    name = node.inputs[1].name
    codes = unpack_codes(weight.packed, weight.bits)[:, : weight.cols].astype(np.int16)
    int8_weight = np.ascontiguousarray((codes - 128).T.astype(np.int8))  # [K, N], zero point 0
    inputs = [
        quantize.outputs[0],
        gs.Constant(f"{name}.int8", int8_weight),
        quantize.inputs[1],
        gs.Constant(f"{name}.int8_scales", weight.scales[:, 0].astype(np.float32)),
        quantize.inputs[2],
    ]
    bias, outputs = _absorb_bias(node, bias_add)
    if bias is not None:
        inputs += [gs.Variable.empty(), bias]
    return gs.Node("MatMulIntegerToFloat", node.name, {}, inputs, outputs, domain=MSFT_DOMAIN)


def _matmul_nbits(node: gs.Node, weight: QuantizedWeight, accuracy_level: int,
                  bias_add: tuple[gs.Node, gs.Constant] | None, views: list[gs.Tensor] | None = None) -> gs.Node:
    """MatMulNBits for ``node``; a following bias ``Add`` is folded into its bias input.

    ``views``: B, scales and zero points already available (a tied embedding's), else made here.
    """
    name = node.inputs[1].name
    blob = weight.group_size * weight.bits // 8
    if views is not None:
        packed, scales, zero_points = views
        inputs = [node.inputs[0], packed, scales]
    else:
        inputs = [
            node.inputs[0],
            gs.Constant(f"{name}.nbits", weight.packed.reshape(weight.rows, weight.n_groups, blob)),
            gs.Constant(f"{name}.nbits_scales", weight.scales.astype(np.float32).reshape(-1)),
        ]
        zero_points = (gs.Constant(f"{name}.nbits_zero_points", _packed_zero_points(weight).reshape(-1))
                       if not weight.sym else gs.Variable.empty())
    bias, outputs = _absorb_bias(node, bias_add)
    if bias is not None:
        inputs += [zero_points, gs.Variable.empty(), bias]
    elif not weight.sym:
        inputs.append(zero_points)
    attrs = {
        "K": weight.cols,
        "N": weight.rows,
        "bits": weight.bits,
        "block_size": weight.group_size,
        "accuracy_level": accuracy_level,
    }
    return gs.Node("MatMulNBits", node.name, attrs, inputs, outputs, domain=MSFT_DOMAIN)


def _gather_block_quantized(node: gs.Node, weight: QuantizedWeight) -> list[gs.Node]:
    """GatherBlockQuantized with float32 scales: the kernel computes in the scales' type, and
    float16 arithmetic would round the decoded rows (measured: 47 dB against the IR at 8 bits)."""
    name = node.inputs[0].name
    inputs = [
        gs.Constant(f"{name}.gbq", weight.packed),
        node.inputs[1],
        gs.Constant(f"{name}.gbq_scales", weight.scales.astype(np.float32)),
    ]
    if not weight.sym:
        inputs.append(gs.Constant(f"{name}.gbq_zero_points", _packed_zero_points(weight)))
    attrs = {"bits": weight.bits, "block_size": weight.group_size, "gather_axis": 0, "quantize_axis": 1}
    return [gs.Node("GatherBlockQuantized", node.name, attrs, inputs, list(node.outputs), domain=MSFT_DOMAIN)]


def emit(model: Model, folder: Path, *, target: str = "cpu", accuracy_level: int = 4, fuse: bool = True) -> dict:
    """Write the ONNX Runtime artifact's model files into ``folder``; return the manifest section."""
    if target not in TARGETS:
        raise BackendError(f"backend ort: unknown target {target!r} (targets: {', '.join(TARGETS)})")
    lowered, kernels, merged_groups, storage, fusion = lower(model, accuracy_level=accuracy_level, fuse=fuse)
    model_path = io.save(lowered, folder / MODEL_FILE)
    files = [MODEL_FILE] + [p.name for p in folder.glob(f"{MODEL_FILE}.data")]
    has_qdq = any(node.op == "QuantizeLinear" for node in lowered.graph.nodes)
    disabled = list(DISABLED_OPTIMIZERS) + (list(runtime.SEMANTICS_CHANGING_OPTIMIZERS) if has_qdq else [])
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if target == "edge":  # the .ort file is the optimized graph: optimize it as artifact sessions do
            options.optimized_model_filepath = str(folder / ORT_FILE)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            options.add_session_config_entry("session.save_model_format", "ORT")
            files.append(ORT_FILE)
        elif lowered.quantized_nodes():
            # only whether ONNX Runtime accepts the file: folding the reference functions'
            # decode would hold many times the float model (the sessions that run it decode
            # those layers with NumPy first, see make_session)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
    except Exception as exc:
        raise BackendError(f"backend ort: ONNX Runtime rejected the emitted model ({str(exc).splitlines()[0]})") from None
    return {
        "backend": "ort",
        "target": target,
        "providers": providers_for(target),
        "disabled_optimizers": disabled,
        "model_file": MODEL_FILE,
        "files": files,
        "accuracy_level": accuracy_level,
        "kernels": kernels,
        "merged": merged_groups,
        "storage": storage,
        "fusion": fusion,
    }
