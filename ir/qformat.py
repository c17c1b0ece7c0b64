"""The `int` quantized-weight format: group-wise uniform codes packed into uint8.

A quantized weight is always seen as a 2-D matrix ``[rows, cols]`` whose reduction
axis is ``cols`` (MatMul ``B`` transposed, Gemm ``B`` with ``transB=1``, an embedding
table, a Conv filter flattened per output channel). Codes are unsigned integers in
``[0, 2**bits)``; a weight is ``(code - zero_point) * scale`` with one scale and one
zero point per group of ``group_size`` consecutive columns. Symmetric quantization
uses the fixed zero point ``2**(bits-1)``.

Packing: the columns are padded to ``n_groups * group_size`` (``group_size`` is a
multiple of 8); every run of 8 codes becomes ``bits`` bytes, little-endian, code ``i``
at bit offset ``i * bits``. For 2, 4 and 8 bits this is exactly the layout of ONNX
Runtime's ``MatMulNBits`` and ``GatherBlockQuantized``, so backends reuse the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .formats import FunctionBody, WeightFormat, register

MIN_BITS, MAX_BITS = 2, 8
FP16_MIN_NORMAL = 6.104e-05
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedWeight:
    """Packed codes with their group scales and zero points (all ``[rows, ...]``)."""

    format: ClassVar[str] = "int"
    packed: np.ndarray  # uint8 [rows, n_groups * group_size * bits / 8]
    scales: np.ndarray  # float16 or float32 [rows, n_groups]
    zero_points: np.ndarray  # uint8 [rows, n_groups]
    bits: int
    group_size: int
    cols: int
    sym: bool

    @property
    def rows(self) -> int:
        return int(self.packed.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix ``[rows, cols]`` these codes stand for."""
        codes = unpack_codes(self.packed, self.bits).reshape(self.rows, self.n_groups, -1)
        values = (codes.astype(np.float32) - self.zero_points[..., None].astype(np.float32)) * (
            self.scales[..., None].astype(np.float32)
        )
        return values.reshape(self.rows, -1)[:, : self.cols]


def from_codes(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, group_size: int, sym: bool
) -> QuantizedWeight:
    """Pack codes ``[rows, cols]`` chosen elsewhere (e.g. by GPTQ) with their group parameters."""
    rows, cols = codes.shape
    padded = np.zeros((rows, scales.shape[1] * group_size), np.uint8)
    padded[:, :cols] = codes
    return QuantizedWeight(pack_codes(padded, bits), scales, zero_points.astype(np.uint8), bits, group_size,
                           cols, sym)


def effective_group_size(cols: int, group_size: int) -> int:
    """``group_size`` as stored: 0 (per channel) becomes the next power of two >= cols."""
    if group_size == 0:
        return max(16, 1 << (max(cols, 1) - 1).bit_length())
    return group_size


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``[..., n]`` (n a multiple of 8) into ``[..., n * bits / 8]`` bytes."""
    if codes.shape[-1] % 8:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes: not a multiple of 8")
    if bits == 8:
        return codes.astype(np.uint8)
    chunks = codes.reshape(*codes.shape[:-1], -1, 8).astype(np.uint64)
    words = (chunks << (np.arange(8, dtype=np.uint64) * np.uint64(bits))).sum(-1, dtype=np.uint64)
    byte_shifts = np.arange(bits, dtype=np.uint64) * np.uint64(8)
    packed = (words[..., None] >> byte_shifts) & np.uint64(0xFF)
    return packed.astype(np.uint8).reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: bytes ``[..., m]`` to codes ``[..., m * 8 / bits]``."""
    if bits == 8:
        return packed.astype(np.uint8)
    chunks = packed.reshape(*packed.shape[:-1], -1, bits).astype(np.uint64)
    words = (chunks << (np.arange(bits, dtype=np.uint64) * np.uint64(8))).sum(-1, dtype=np.uint64)
    code_shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    codes = (words[..., None] >> code_shifts) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(*packed.shape[:-1], -1)


def _grouped(weight: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``[rows, cols]`` to whole groups: values ``[rows, G, gs]`` and a validity mask."""
    rows, cols = weight.shape
    n_groups = -(-cols // group_size)
    padded = np.zeros((rows, n_groups * group_size), np.float32)
    padded[:, :cols] = weight
    valid = np.zeros(n_groups * group_size, bool)
    valid[:cols] = True
    return padded.reshape(rows, n_groups, group_size), valid.reshape(n_groups, group_size)


def _scale_dtype(weight: np.ndarray, bits: int, group_size: int) -> type:
    """float16 when every group scale the search can pick is a normal float16 number."""
    groups, _ = _grouped(np.nan_to_num(weight), group_size)
    group_absmax = np.abs(groups).max(-1)
    nonzero = group_absmax[group_absmax > 0]
    if not nonzero.size:
        return np.float16
    smallest = float(nonzero.min()) * 0.5 / ((1 << bits) - 1)
    largest = float(nonzero.max()) * 2.0
    return np.float16 if smallest >= FP16_MIN_NORMAL and largest <= FP16_MAX else np.float32


def _fit_groups(
    groups: np.ndarray, valid: np.ndarray, bits: int, sym: bool, shrink: float
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per group for the range shrunk by ``shrink`` (0 < shrink <= 1)."""
    qmax = (1 << bits) - 1
    hi = np.where(valid, groups, -np.inf).max(-1) * shrink
    lo = np.where(valid, groups, np.inf).min(-1) * shrink
    if sym:
        half = 1 << (bits - 1)
        scales = np.maximum(-lo / half, hi / (half - 1))
        zero_points = np.full(scales.shape, half, np.float32)
    else:
        hi, lo = np.maximum(hi, 0.0), np.minimum(lo, 0.0)
        scales = (hi - lo) / qmax
        zero_points = np.zeros_like(scales)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    if not sym:
        zero_points = np.clip(np.round(-lo / scales), 0, qmax)
    return scales, zero_points


def _codes_for(groups: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int) -> np.ndarray:
    q = np.round(groups / scales[..., None]) + zero_points[..., None]
    return np.clip(q, 0, (1 << bits) - 1)


def _column_weight(cols: int, group_size: int, importance: np.ndarray | None) -> np.ndarray:
    """``[n_groups, group_size]`` weights of each column in the range search (0 on padding)."""
    values = np.ones(cols) if importance is None else np.asarray(importance, np.float64)
    if values.shape != (cols,):
        raise ValueError(f"importance has shape {values.shape}, expected ({cols},)")
    values = np.nan_to_num(np.maximum(values, 0.0), posinf=0.0)
    peak = float(values.max()) if values.size else 0.0
    # relative weights (any positive scale gives the same search): float32-safe for huge activations
    values = (values / peak if peak > 0 else np.ones(cols)) + 1e-8
    values = values.astype(np.float32)
    padded, _ = _grouped(values[None, :], group_size)
    return padded[0]


def _refine_scales(groups, column_weight, scales, zero_points, errors, bits, scale_dtype, rounds):
    """Alternate codes and the least-squares scale for them (zero points fixed), per group.

    A group keeps a new scale only when it lowers that group's weighted error.
    """
    for _ in range(rounds):
        centred = _codes_for(groups, scales, zero_points, bits) - zero_points[..., None]
        denominator = (column_weight * centred * centred).sum(-1)
        fitted = (column_weight * centred * groups).sum(-1) / np.where(denominator > 0, denominator, 1.0)
        fitted = np.where((denominator > 0) & (fitted > 0), fitted, scales).astype(scale_dtype).astype(np.float32)
        recon = (_codes_for(groups, fitted, zero_points, bits) - zero_points[..., None]) * fitted[..., None]
        err = (np.square(recon - groups) * column_weight).sum(-1)
        better = err < errors
        scales = np.where(better, fitted, scales)
        errors = np.where(better, err, errors)
    return scales, errors


def quantize_int(
    weight: np.ndarray,
    bits: int,
    group_size: int,
    *,
    sym: bool = False,
    clip_search: int = 20,
    importance: np.ndarray | None = None,
    refine_rounds: int = 3,
    row_chunk: int = 4096,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``[rows, cols]`` with a per-group range search.

    For every group, ``clip_search`` candidate ranges (the full min/max shrunk by up to
    50%) are tried and the one with the smallest squared error kept; 0 disables the
    search (plain min/max). ``importance`` (``[cols]``, e.g. the calibration inputs'
    mean square per channel) weights the error per column, so the search minimises
    the layer's output error under a diagonal approximation instead of the weight
    error. Scales are stored as float16 when every scale fits, else float32.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    weight = np.asarray(weight, np.float32)
    rows, cols = weight.shape
    group_size = effective_group_size(cols, group_size)
    if group_size % 8:
        raise ValueError(f"group_size must be a multiple of 8, got {group_size}")
    scale_dtype = _scale_dtype(weight, bits, group_size)
    shrinks = np.linspace(1.0, 0.5, clip_search) if clip_search > 1 else np.array([1.0])
    n_groups = -(-cols // group_size)
    column_weight = _column_weight(cols, group_size, importance)
    codes = np.empty((rows, n_groups, group_size), np.uint8)
    scales = np.empty((rows, n_groups), np.float32)
    zero_points = np.empty((rows, n_groups), np.uint8)
    for start in range(0, rows, row_chunk):
        groups, valid = _grouped(weight[start : start + row_chunk], group_size)
        best_err = np.full(groups.shape[:2], np.inf, np.float32)
        best_scale = np.ones(groups.shape[:2], np.float32)
        best_zp = np.zeros(groups.shape[:2], np.float32)
        for shrink in shrinks:
            cand_scale, cand_zp = _fit_groups(groups, valid, bits, sym, float(shrink))
            cand_scale = cand_scale.astype(scale_dtype).astype(np.float32)
            recon = (_codes_for(groups, cand_scale, cand_zp, bits) - cand_zp[..., None]) * cand_scale[..., None]
            err = (np.square(recon - groups) * column_weight).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, cand_scale, best_scale)
            best_zp = np.where(better, cand_zp, best_zp)
        best_scale, best_err = _refine_scales(groups, column_weight, best_scale, best_zp, best_err, bits,
                                              scale_dtype, refine_rounds)
        scales[start : start + row_chunk] = best_scale
        zero_points[start : start + row_chunk] = best_zp.astype(np.uint8)
        codes[start : start + row_chunk] = _codes_for(groups, best_scale, best_zp, bits) * valid
    packed = pack_codes(codes.reshape(rows, -1), bits)
    return QuantizedWeight(packed, scales.astype(scale_dtype), zero_points, bits, group_size, cols, sym)


class IntFormat(WeightFormat):
    """``int``: inputs ``packed, scales, zero_points``; see the module docstring."""

    name = "int"
    inputs = ("packed", "scales", "zero_points")
    attributes = ("format", "bits", "group_size", "cols", "sym")

    def node_attributes(self, weight: Any) -> dict[str, Any]:
        return {"format": self.name, "bits": weight.bits, "group_size": weight.group_size, "cols": weight.cols,
                "sym": int(weight.sym)}

    def constants(self, prefix: str, weight: Any) -> list[gs.Constant]:
        return [
            gs.Constant(f"{prefix}.qweight", weight.packed),
            gs.Constant(f"{prefix}.scales", weight.scales),
            gs.Constant(f"{prefix}.zero_points", weight.zero_points),
        ]

    def from_arrays(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> QuantizedWeight:
        packed, scales, zero_points = arrays
        return QuantizedWeight(packed=packed, scales=scales, zero_points=zero_points, bits=int(attrs["bits"]),
                               group_size=int(attrs["group_size"]), cols=int(attrs["cols"]),
                               sym=bool(attrs.get("sym", 0)))

    def check(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> str | None:
        bits, group_size, cols = (int(attrs[k]) for k in ("bits", "group_size", "cols"))
        if not MIN_BITS <= bits <= MAX_BITS or group_size <= 0 or group_size % 8 or cols <= 0:
            return f"bad format attributes bits={bits} group_size={group_size} cols={cols}"
        packed, scales, zero_points = arrays
        n_groups = -(-cols // group_size)
        expected = (packed.shape[0], n_groups * group_size * bits // 8)
        if packed.dtype != np.uint8 or packed.shape != expected:
            return f"packed weight is {packed.dtype}{list(packed.shape)}, expected uint8{list(expected)}"
        if scales.shape != (packed.shape[0], n_groups) or zero_points.shape != scales.shape:
            return (f"scales/zero points shape {scales.shape}/{zero_points.shape}, expected "
                    f"{(packed.shape[0], n_groups)}")
        if not np.isfinite(scales.astype(np.float32)).all():
            return "non-finite scales"
        return None

    def decode(self, body: FunctionBody, inputs: Sequence[str]) -> str:
        """Packed codes ``[R, P]`` to the float matrix ``[R, cols]``."""
        packed, scales, zero_points = inputs
        group_size = body.attr_const("group_size")
        cols = body.attr_const("cols")
        zero, one, minus_one = body.const([0]), body.const([1]), body.const([-1])
        rows = body.op("Slice", body.op("Shape", packed), zero, one)
        codes = decode_codes(body, packed, body.attr_const("bits"))
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


def decode_codes(body: FunctionBody, packed: str, bits: str) -> str:
    """Nodes unpacking ``packed`` ``[R, P]`` into int64 codes ``[R, P*8/bits/8, 8]`` (runs of 8).

    Code ``i`` of a run of 8 starts at bit ``i*bits``: byte ``j = i*bits // 8``,
    offset ``o = i*bits % 8``; ``code = ((b[j] + 256*b[j+1]) // 2**o) % 2**bits``.
    """
    zero, one, minus_one = body.const([0]), body.const([1]), body.const([-1])
    two, eight = body.const(2), body.const(8)
    rows = body.op("Slice", body.op("Shape", packed), zero, one)
    runs = body.op("Reshape", packed, body.op("Concat", rows, minus_one, body.op("Unsqueeze", bits, zero), axis=0))
    runs = body.op("Cast", runs, to=TensorProto.INT64)
    runs = body.op("Pad", runs, body.const([0, 0, 0, 0, 0, 1]))  # a zero byte after each run
    bit_offsets = body.op("Mul", body.op("Range", body.const(0), eight, body.const(1)), bits)
    first_byte = body.op("Div", bit_offsets, eight)
    low = body.op("Gather", runs, first_byte, axis=2)
    high = body.op("Gather", runs, body.op("Add", first_byte, body.const(1)), axis=2)
    window = body.op("Add", low, body.op("Mul", high, body.const(256)))
    shifted = body.op("Div", window, body.op("Pow", two, body.op("Mod", bit_offsets, eight)))
    return body.op("Mod", shifted, body.op("Pow", two, bits))


INT = register(IntFormat())
