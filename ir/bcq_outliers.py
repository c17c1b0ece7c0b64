"""The `bcq_outliers` format: a ``bcq`` weight plus a few sparse APoT-coded corrections per row.

Dense-and-sparse decomposition (SqueezeLLM, SpQR) for binary-coding quantization: the few
weights that would distort their group's alphas (outliers) are left out of the BCQ fit and
corrected by a sparse addend, so

    W[r, c] = BCQ[r, c] + S[r, c]

where ``BCQ`` is an ordinary :mod:`qcompile.ir.bcq` weight and ``S`` holds ``k`` nonzeros in
every row. Each stored correction is a sum of at most ``terms`` signed powers of two, coded
like the alphas (one int8 per term), so ``x * S[r, c]`` is shifts and adds and the layer
stays multiplication-free. At an outlier the BCQ planes keep the codeword nearest to the
weight and ``S`` only carries what that codeword misses, which keeps the correction small
and its APoT rounding fine.

Row-wise ELL layout (every row the same number of corrections) rather than CSR: every input
keeps ``rows`` as its first axis, as ``QGather`` needs, a kernel walks fixed-width rows, and
there are no row pointers to store; the fit picks the same count in every row.

Storage (inputs after the ``bcq`` ones, in this order):

* ``outlier_cols``: uint16 ``[rows, k]`` (int32 when ``cols > 65536``), the columns of each
  row's corrections, strictly increasing;
* ``outlier_values``: int8 ``[rows, k, terms]``, the corrections' APoT term codes (as the
  ``bcq`` alphas: ``sign(v) * 2 ** (|v| - 64)``, 0 = unused term).

Bytes per correction: 2 (column) + ``terms``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .bcq import BCQ, EXPONENT_BIAS, MAX_TERMS, BCQWeight, decode_alphas
from .formats import FunctionBody, WeightFormat, register


@dataclass(frozen=True)
class BCQOutlierWeight:
    """A ``bcq`` weight and its sparse corrections (see the module docstring)."""

    format: ClassVar[str] = "bcq_outliers"
    sym: ClassVar[bool] = True
    dense: BCQWeight
    outlier_cols: np.ndarray  # uint16/int32 [rows, k]
    outlier_values: np.ndarray  # int8 [rows, k, terms]

    @property
    def bits(self) -> int:
        return self.dense.bits

    @property
    def rows(self) -> int:
        return self.dense.rows

    @property
    def cols(self) -> int:
        return self.dense.cols

    @property
    def terms(self) -> int:
        return self.dense.terms

    @property
    def group_size(self) -> int:
        return self.dense.group_size

    @property
    def row_group(self) -> int:
        return self.dense.row_group

    @property
    def col_group(self) -> int:
        return self.dense.col_group

    @property
    def planes(self) -> np.ndarray:
        return self.dense.planes

    @property
    def alphas(self) -> np.ndarray:
        return self.dense.alphas

    @property
    def packed(self) -> np.ndarray:
        return self.dense.planes

    @property
    def scales(self) -> np.ndarray:
        return self.dense.scales

    @property
    def per_row(self) -> int:
        """Corrections per row (``k``)."""
        return int(self.outlier_cols.shape[1])

    @property
    def nnz(self) -> int:
        return self.rows * self.per_row

    @property
    def nbytes(self) -> int:
        return int(self.dense.nbytes + self.outlier_cols.nbytes + self.outlier_values.nbytes)

    def corrections(self) -> np.ndarray:
        """float32 ``[rows, k]``: the value of each stored correction."""
        return decode_alphas(self.outlier_values)

    def sparse(self) -> np.ndarray:
        """The float32 sparse addend ``S`` as a dense ``[rows, cols]`` matrix."""
        out = np.zeros((self.rows, self.cols), np.float32)
        np.put_along_axis(out, self.outlier_cols.astype(np.int64), self.corrections(), axis=1)
        return out

    def dequantize(self) -> np.ndarray:
        """The float32 matrix: the ``bcq`` part, each correction added at its place (as the
        reference function does)."""
        out = self.dense.dequantize()
        index = self.outlier_cols.astype(np.int64)
        updated = np.take_along_axis(out, index, axis=1) + self.corrections()
        np.put_along_axis(out, index, updated, axis=1)
        return out


def column_dtype(cols: int) -> type:
    return np.uint16 if cols <= 1 << 16 else np.int32


def with_outliers(dense: BCQWeight, mask: np.ndarray, codes: np.ndarray) -> BCQOutlierWeight:
    """``dense`` plus corrections at ``mask`` (bool ``[rows, cols]``, the same count in every
    row); ``codes`` int8 ``[rows, cols, terms]`` holds the corrections' term codes."""
    rows, cols = mask.shape
    per_row = mask.sum(1)
    if rows and (per_row != per_row[0]).any():
        raise ValueError("bcq_outliers needs the same number of corrections in every row")
    k = int(per_row[0]) if rows else 0
    index = np.argsort(~mask, axis=1, kind="stable")[:, :k]  # the masked columns, increasing
    values = np.take_along_axis(codes, index[:, :, None], axis=1)
    return BCQOutlierWeight(dense, index.astype(column_dtype(cols)), values.astype(np.int8))


class BCQOutlierFormat(WeightFormat):
    """``bcq_outliers``: inputs ``planes, alphas, outlier_cols, outlier_values``."""

    name = "bcq_outliers"
    inputs = (*BCQ.inputs, "outlier_cols", "outlier_values")
    attributes = BCQ.attributes

    def node_attributes(self, weight: Any) -> dict[str, Any]:
        return {**BCQ.node_attributes(weight.dense), "format": self.name}

    def constants(self, prefix: str, weight: Any) -> list[gs.Constant]:
        return [*BCQ.constants(prefix, weight.dense), gs.Constant(f"{prefix}.outlier_cols", weight.outlier_cols),
                gs.Constant(f"{prefix}.outlier_values", weight.outlier_values)]

    def from_arrays(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> BCQOutlierWeight:
        planes, alphas, cols, values = arrays
        dense = BCQWeight(planes=planes, alphas=alphas, cols=int(attrs["cols"]), row_group=int(attrs["row_group"]),
                          col_group=int(attrs["col_group"]))
        return BCQOutlierWeight(dense, cols, values)

    def check(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> str | None:
        if len(arrays) != len(self.inputs):
            return f"{len(arrays)} weight inputs, expected {len(self.inputs)}"
        problem = BCQ.check(attrs, arrays[:2])
        if problem is not None:
            return problem
        planes, _, index, values = arrays
        rows, cols = planes.shape[0], int(attrs["cols"])
        expected = column_dtype(cols)
        if index.dtype != expected or index.ndim != 2 or index.shape[0] != rows or index.shape[1] < 1:
            return f"outlier_cols are {index.dtype}{list(index.shape)}, expected {np.dtype(expected)}[{rows}, k>=1]"
        k = index.shape[1]
        if values.dtype != np.int8 or values.ndim != 3 or values.shape[:2] != (rows, k) \
                or not 1 <= values.shape[2] <= MAX_TERMS:
            return f"outlier_values are {values.dtype}{list(values.shape)}, expected int8[{rows}, {k}, terms]"
        if np.any(values == -128):
            return "outlier term code -128 is not valid"
        wide = index.astype(np.int64)
        if wide.max() >= cols or (k > 1 and np.any(np.diff(wide, axis=1) <= 0)):
            return "outlier_cols must be strictly increasing column indices below cols in every row"
        return None

    def decode(self, body: FunctionBody, inputs: Sequence[str]) -> str:
        """The ``bcq`` matrix, then ``W[r, c] += S`` at the stored columns (gather, add, scatter:
        the columns of a row are distinct, so no reduction is needed)."""
        planes, alphas, cols, values = inputs
        dense = BCQ.decode(body, [planes, alphas])
        index = body.op("Cast", cols, to=TensorProto.INT64)
        codes = body.op("Cast", values, to=TensorProto.FLOAT)
        exponent = body.op("Sub", body.op("Abs", codes), body.op("Constant", value_float=float(EXPONENT_BIAS)))
        terms = body.op("Mul", body.op("Sign", codes), body.op("Pow", body.op("Constant", value_float=2.0), exponent))
        correction = body.op("ReduceSum", terms, body.const([-1]), keepdims=0)  # [R, k]
        updated = body.op("Add", body.op("GatherElements", dense, index, axis=1), correction)
        return body.op("ScatterElements", dense, index, updated, axis=1)


BCQ_OUTLIERS = register(BCQOutlierFormat())
