"""Artifact bytes on disk: constants stored narrower than the kernels read them.

ONNX Runtime's quantized kernels want float32 scales and, for codes of 3 bits, a 4-bit
layout (it has no 3-bit kernel). Storing those wide forms would give away what the IR
saved: float16 scales and 3-bit codes. So the artifact keeps the narrow bytes and a few
standard ops that widen them; every input of those ops is a constant, so ONNX Runtime's
constant folding runs them once when the session starts, before the kernels pre-pack
their weights. The disk holds the narrow form, memory the wide one, and the widening is
exact (checked here before anything is rewritten).

* float32 scales of ``MatMulNBits`` / ``GatherBlockQuantized`` whose every value is a
  float16 number → float16 constant + ``Cast``.
* uint8 4-bit code blobs whose every code is below 8 → the same codes packed at 3 bits
  (:func:`qcompile.ir.qformat.pack_codes` layout) + integer ops that re-pack them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir.qformat import pack_codes, unpack_codes

MSFT_DOMAIN = "com.microsoft"
SCALE_INPUT = 2  # MatMulNBits and GatherBlockQuantized: scales are input 2
DATA_INPUT = {"MatMulNBits": 1, "GatherBlockQuantized": 0}


@dataclass
class Compaction:
    """What :func:`compact` rewrote, for the manifest."""

    float16_scales: list[str] = field(default_factory=list)
    three_bit_codes: list[str] = field(default_factory=list)
    bytes_saved: int = 0

    def summary(self) -> dict:
        return {"float16_scales": len(self.float16_scales), "three_bit_codes": len(self.three_bit_codes),
                "bytes_saved": self.bytes_saved}


def compact(graph: gs.Graph) -> Compaction:
    """Store the quantized kernels' constants in their narrow form (see the module docstring)."""
    done = Compaction()
    replaced: set[str] = set()  # constants already stored narrow (a tied table is read by two kernels)
    for node in list(graph.nodes):
        if node.domain != MSFT_DOMAIN or node.op not in DATA_INPUT:
            continue
        scales = _root_constant(node.inputs[SCALE_INPUT]) if len(node.inputs) > SCALE_INPUT else None
        if scales is not None and scales.name not in replaced and _float16_exact(scales.values):
            replaced.add(scales.name)
            _widen(graph, scales, _cast_nodes(scales))
            done.float16_scales.append(scales.name)
            done.bytes_saved += scales.values.nbytes // 2
        data = _root_constant(node.inputs[DATA_INPUT[node.op]])
        if node.attrs.get("bits") == 4 and data is not None and data.name not in replaced and _three_bit(data.values):
            replaced.add(data.name)
            _widen(graph, data, _repack_nodes(graph, data))
            done.three_bit_codes.append(data.name)
            done.bytes_saved += data.values.nbytes // 4
    return done


def _root_constant(tensor: gs.Tensor) -> gs.Constant | None:
    """The constant behind ``tensor``, looking through ``Reshape`` views (tied weights)."""
    while isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Reshape":
        tensor = tensor.inputs[0].inputs[0]
    return tensor if isinstance(tensor, gs.Constant) else None


def _float16_exact(values: np.ndarray) -> bool:
    if values.dtype != np.float32 or values.size < 64:
        return False
    with np.errstate(over="ignore"):
        return bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def _three_bit(values: np.ndarray) -> bool:
    """A 4-bit blob whose codes all fit in 3 bits, in whole runs of 8 codes."""
    if values.dtype != np.uint8 or values.size % 4 or values.size < 64:
        return False
    return bool(((values & 0x88) == 0).all())


def _widen(graph: gs.Graph, constant: gs.Constant, nodes: list[gs.Node]) -> None:
    """Replace every use of ``constant`` by the output of ``nodes`` (which read its narrow form)."""
    wide = nodes[-1].outputs[0]
    for consumer in list(constant.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is constant:
                consumer.inputs[index] = wide
    graph.nodes.extend(nodes)


def _cast_nodes(scales: gs.Constant) -> list[gs.Node]:
    narrow = gs.Constant(f"{scales.name}.fp16", scales.values.astype(np.float16))
    wide = gs.Variable(f"{scales.name}.fp32", np.float32, list(scales.shape))
    return [gs.Node("Cast", f"{scales.name}/widen", {"to": 1}, [narrow], [wide])]


def _repack_nodes(graph: gs.Graph, data: gs.Constant) -> list[gs.Node]:
    """Ops turning 3-bit packed bytes back into ``data``'s 4-bit bytes (same shape)."""
    name = data.name
    codes = unpack_codes(data.values.reshape(-1), 4)
    narrow = gs.Constant(f"{name}.3bit", pack_codes(codes, 3))
    runs = codes.size // 8
    nodes: list[gs.Node] = []

    def op(kind: str, inputs: list[gs.Tensor], dtype, attrs: dict | None = None) -> gs.Variable:
        out = gs.Variable(f"{name}.widen{len(nodes)}", dtype)
        nodes.append(gs.Node(kind, f"{name}/widen{len(nodes)}", attrs or {}, inputs, [out]))
        return out

    def const(suffix: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{name}.widen_{suffix}", values)

    # 3 bytes -> one 24-bit word per run of 8 codes (code i at bit 3i)
    triples = op("Cast", [op("Reshape", [narrow, const("runs", np.array([runs, 3], np.int64))], np.uint8)],
                 np.int32, {"to": 6})
    words = _row_sum(op, const, triples, np.array([1, 1 << 8, 1 << 16], np.int32), graph.opset, "bytes", keepdims=1)
    # code i = word // 8^i - 8 * (word // 8^(i+1))  (integer division; no Mod below opset 10)
    powers = np.array([8**i for i in range(8)], np.int32)
    low = op("Div", [words, const("p", powers)], np.int32)
    high = op("Div", [words, const("p8", powers * 8)], np.int32)
    codes8 = op("Sub", [low, op("Mul", [high, const("eight", np.array(8, np.int32))], np.int32)], np.int32)
    # two codes per byte, low nibble first
    pairs = op("Reshape", [codes8, const("pairs", np.array([runs * 4, 2], np.int64))], np.int32)
    nibbles = _row_sum(op, const, pairs, np.array([1, 16], np.int32), graph.opset, "nibbles", keepdims=0)
    flat = op("Cast", [nibbles], np.uint8, {"to": 2})
    out = op("Reshape", [flat, const("shape", np.array(data.shape, np.int64))], np.uint8)
    out.shape = list(data.shape)
    return nodes


def _row_sum(op, const, matrix: gs.Variable, weights: np.ndarray, opset: int, suffix: str, *,
             keepdims: int) -> gs.Variable:
    """``sum_j matrix[:, j] * weights[j]`` per row (ReduceSum's axes moved to an input in opset 13)."""
    scaled = op("Mul", [matrix, const(f"w_{suffix}", weights)], np.int32)
    if opset >= 13:
        return op("ReduceSum", [scaled, const(f"axis_{suffix}", np.array([1], np.int64))], np.int32,
                  {"keepdims": keepdims})
    return op("ReduceSum", [scaled], np.int32, {"axes": [1], "keepdims": keepdims})
