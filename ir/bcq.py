"""The `bcq` quantized-weight format: binary planes with power-of-two scales (ShiftAddLLM).

A weight ``[rows, cols]`` (reduction axis last) is stored as ``bits`` binary planes
``B_i`` with entries in ``{-1, +1}`` and one scale ``alpha_i`` per plane and group:

    W[r, c] = sum_i alpha_i[r // row_group, c // col_group] * B_i[r, c]

Every ``alpha`` is a sum of at most ``terms`` signed powers of two, so multiplying an
activation by it is a few shifts and adds, and the artifact holds no float multiplier
for the weight. Grouping:

* ``row_group=g, col_group=1`` -- *column-wise* alphas: one per input column and group of
  ``g`` output rows (what ShiftAddLLM's GPTQ loop fits column by column);
* ``row_group=g, col_group=8`` -- *block-wise* alphas: 8 consecutive input columns share
  them, the layout of the 8-activation lookup-table kernel (:mod:`qcompile.ir.lut`);
* ``row_group=1, col_group=g`` -- *row-wise* alphas, the classic BCQ layout, used for
  embedding tables: with ``row_group=1`` every input has ``rows`` as its first axis, which
  ``QGather`` relies on (it gathers the same rows from every input). QGather nodes must
  use ``row_group=1``.

Storage (inputs in this order):

* ``planes``: uint8 ``[rows, bits, ceil(cols / 8)]``; bit ``t`` (least significant first)
  of byte ``j`` is column ``8j + t``; 1 means +1, 0 means -1. So one byte is exactly the
  index into an 8-activation table ``LUT[c] = sum_t (2 c_t - 1) x_t``.
* ``alphas``: int8 ``[ceil(rows / row_group), ceil(cols / col_group), bits, terms]``; each
  nonzero value ``v`` is the term ``sign(v) * 2 ** (|v| - 64)`` (exponents -63..63), 0 is
  an unused term. One byte per term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .formats import FunctionBody, WeightFormat, register

MIN_BITS, MAX_BITS = 1, 4
MAX_TERMS = 4
EXPONENT_BIAS = 64
MIN_EXPONENT, MAX_EXPONENT = 1 - EXPONENT_BIAS, 127 - EXPONENT_BIAS


@dataclass(frozen=True)
class BCQWeight:
    """Binary planes and APoT-coded alphas of one weight (see the module docstring)."""

    format: ClassVar[str] = "bcq"
    sym: ClassVar[bool] = True  # no zero point: the codebook is symmetric around 0
    planes: np.ndarray  # uint8 [rows, bits, ceil(cols / 8)]
    alphas: np.ndarray  # int8 [row_groups, col_groups, bits, terms]
    cols: int
    row_group: int
    col_group: int

    @property
    def bits(self) -> int:
        return int(self.planes.shape[1])

    @property
    def rows(self) -> int:
        return int(self.planes.shape[0])

    @property
    def terms(self) -> int:
        return int(self.alphas.shape[3])

    @property
    def group_size(self) -> int:
        """Weights sharing one alpha (``row_group * col_group``)."""
        return self.row_group * self.col_group

    @property
    def packed(self) -> np.ndarray:
        return self.planes

    @property
    def scales(self) -> np.ndarray:
        """The alphas as float32 ``[row_groups, col_groups, bits]``."""
        return decode_alphas(self.alphas)

    @property
    def nbytes(self) -> int:
        return int(self.planes.nbytes + self.alphas.nbytes)

    def signs(self) -> np.ndarray:
        """The planes as float32 ``{-1, +1}`` ``[rows, bits, cols]``."""
        return unpack_planes(self.planes, self.cols).astype(np.float32) * 2.0 - 1.0

    def expanded_alphas(self) -> np.ndarray:
        """float32 ``[rows, bits, cols]``: each weight's alpha per plane."""
        alphas = decode_alphas(self.alphas)  # [RG, CG, bits]
        row_index = np.arange(self.rows) // self.row_group
        col_index = np.arange(self.cols) // self.col_group
        return alphas[row_index][:, col_index].transpose(0, 2, 1)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix ``[rows, cols]``; sums the planes in order, like the reference function."""
        products = self.expanded_alphas() * self.signs()
        out = products[:, 0]
        for plane in range(1, self.bits):
            out = out + products[:, plane]
        return out.astype(np.float32)


def pack_planes(signs: np.ndarray) -> np.ndarray:
    """Boolean/±1 ``[rows, bits, cols]`` (True or +1 = +1) to uint8 ``[rows, bits, ceil(cols/8)]``."""
    return np.packbits(np.asarray(signs) > 0, axis=-1, bitorder="little")


def unpack_planes(planes: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_planes`: uint8 0/1 ``[rows, bits, cols]``."""
    return np.unpackbits(planes, axis=-1, count=cols, bitorder="little")


def encode_terms(signs: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """Terms ``sign * 2**exponent`` (sign 0 = unused) as the int8 codes of the format."""
    exponents = np.asarray(exponents)
    signs = np.asarray(signs)
    if np.any((signs != 0) & ((exponents < MIN_EXPONENT) | (exponents > MAX_EXPONENT))):
        raise ValueError(f"alpha exponent outside [{MIN_EXPONENT}, {MAX_EXPONENT}]")
    return (np.sign(signs) * (exponents + EXPONENT_BIAS) * (signs != 0)).astype(np.int8)


def decode_alphas(codes: np.ndarray) -> np.ndarray:
    """int8 term codes ``[..., terms]`` to the float32 alphas ``[...]`` they sum to."""
    values = codes.astype(np.int32)
    magnitudes = np.ldexp(np.float32(1.0), np.abs(values) - EXPONENT_BIAS).astype(np.float32)
    return (np.sign(values).astype(np.float32) * magnitudes).sum(-1, dtype=np.float32)


def from_signs(signs: np.ndarray, alpha_codes: np.ndarray, row_group: int, col_group: int) -> BCQWeight:
    """Pack ``signs`` ``[rows, bits, cols]`` (±1 or bool) with int8 alpha codes."""
    return BCQWeight(pack_planes(signs), np.asarray(alpha_codes, np.int8), int(signs.shape[2]), row_group, col_group)


class BCQFormat(WeightFormat):
    """``bcq``: inputs ``planes, alphas``; see the module docstring."""

    name = "bcq"
    inputs = ("planes", "alphas")
    attributes = ("format", "cols", "row_group", "col_group")

    def node_attributes(self, weight: Any) -> dict[str, Any]:
        return {"format": self.name, "cols": weight.cols, "row_group": weight.row_group,
                "col_group": weight.col_group}

    def constants(self, prefix: str, weight: Any) -> list[gs.Constant]:
        return [gs.Constant(f"{prefix}.planes", weight.planes), gs.Constant(f"{prefix}.alphas", weight.alphas)]

    def from_arrays(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> BCQWeight:
        planes, alphas = arrays
        return BCQWeight(planes=planes, alphas=alphas, cols=int(attrs["cols"]), row_group=int(attrs["row_group"]),
                         col_group=int(attrs["col_group"]))

    def check(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> str | None:
        cols, row_group, col_group = (int(attrs[k]) for k in ("cols", "row_group", "col_group"))
        if cols <= 0 or row_group <= 0 or col_group <= 0:
            return f"bad format attributes cols={cols} row_group={row_group} col_group={col_group}"
        planes, alphas = arrays
        if planes.dtype != np.uint8 or planes.ndim != 3 or planes.shape[2] != -(-cols // 8):
            return f"planes are {planes.dtype}{list(planes.shape)}, expected uint8[rows, bits, {-(-cols // 8)}]"
        rows, bits = planes.shape[0], planes.shape[1]
        if not MIN_BITS <= bits <= MAX_BITS:
            return f"{bits} planes, expected {MIN_BITS}..{MAX_BITS}"
        expected = (-(-rows // row_group), -(-cols // col_group), bits)
        if alphas.dtype != np.int8 or alphas.ndim != 4 or alphas.shape[:3] != expected \
                or not 1 <= alphas.shape[3] <= MAX_TERMS:
            return f"alphas are {alphas.dtype}{list(alphas.shape)}, expected int8[{', '.join(map(str, expected))}, terms]"
        if np.any(alphas == -128):
            return "alpha term code -128 is not valid"
        return None

    def decode(self, body: FunctionBody, inputs: Sequence[str]) -> str:
        """Planes ``[R, Q, P]`` and alphas ``[RG, CG, Q, T]`` to the float matrix ``[R, cols]``."""
        planes, alphas = inputs
        cols = body.attr_const("cols")
        row_group = body.attr_const("row_group")
        col_group = body.attr_const("col_group")
        zero, one, minus_one = body.const([0]), body.const([1]), body.const([-1])
        # bits: byte // 2**t % 2 for t = 0..7, then +-1
        as_int = body.op("Unsqueeze", body.op("Cast", planes, to=TensorProto.INT32), minus_one)
        powers = body.op("Constant", value_ints=[1 << t for t in range(8)])
        powers = body.op("Cast", powers, to=TensorProto.INT32)
        bits = body.op("Mod", body.op("Div", as_int, powers), body.op("Cast", body.const(2), to=TensorProto.INT32))
        signs = body.op("Sub", body.op("Mul", body.op("Cast", bits, to=TensorProto.FLOAT),
                                       body.op("Constant", value_float=2.0)),
                        body.op("Constant", value_float=1.0))
        shape = body.op("Shape", planes)
        rows_and_planes = body.op("Slice", shape, zero, body.const([2]))
        signs = body.op("Reshape", signs, body.op("Concat", rows_and_planes, minus_one, axis=0))
        signs = body.op("Slice", signs, zero, body.op("Unsqueeze", cols, zero), body.const([2]))  # [R, Q, cols]
        # alphas: sum_t sign(v) * 2**(|v| - 64)
        codes = body.op("Cast", alphas, to=TensorProto.FLOAT)
        exponent = body.op("Sub", body.op("Abs", codes), body.op("Constant", value_float=float(EXPONENT_BIAS)))
        terms = body.op("Mul", body.op("Sign", codes), body.op("Pow", body.op("Constant", value_float=2.0), exponent))
        alpha = body.op("ReduceSum", terms, minus_one, keepdims=0)  # [RG, CG, Q]
        rows = body.op("Squeeze", body.op("Slice", shape, zero, one), zero)
        row_index = body.op("Div", body.op("Range", body.const(0), rows, body.const(1)), row_group)
        col_index = body.op("Div", body.op("Range", body.const(0), cols, body.const(1)), col_group)
        alpha = body.op("Gather", body.op("Gather", alpha, row_index, axis=0), col_index, axis=1)  # [R, cols, Q]
        alpha = body.op("Transpose", alpha, perm=[0, 2, 1])
        products = body.op("Mul", alpha, signs)  # [R, Q, cols]
        return body.op("ReduceSum", products, one, keepdims=0)


BCQ = register(BCQFormat())
