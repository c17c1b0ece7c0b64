"""The shift-add lookup-table computation of ``QMatMul`` with ``bcq`` weights, in NumPy.

This is the specification the shift-add kernels implement (ShiftAddLLM's "query and add"):
``Y = X W^T`` without a single multiplication by a weight.

1. **Query**: for every token and every block of 8 activations ``x_0..x_7``, a table of
   the 256 signed sums ``LUT[c] = sum_t (2 c_t - 1) x_t`` is built with 255 additions
   (``LUT[0] = -sum x_t``; setting bit ``t`` adds ``2 x_t``). The tables are shared by
   every output row.
2. **Look-up**: one byte of a binary plane (8 weights of one row) indexes the table of
   its block: the plane's contribution of those 8 weights, in one read.
3. **Shift and add**: the result is multiplied by the plane's alpha, a sum of signed
   powers of two: one shift (``ldexp``) per term, then additions.

Block-wise alphas (``col_group`` a multiple of 8) are constant over a table's block, so
they apply after the look-up. Column-wise alphas (``col_group=1``) differ inside a block:
the activations are shifted first (``alpha_i[g, k] * x_k``, shifts and adds again) and
every (row group, plane) gets its own tables -- more tables, still no multiplication.

Exactness: every step is an exact operation (sign flips, shifts, additions) except the
additions' rounding. :func:`lut_matmul` accumulates in ``dtype``; with activations whose
sums are exactly representable (e.g. small integers, float64) it is bit-for-bit equal to
``X @ W^T`` of the dequantized weight, because then no addition rounds in either order.
For general float32 activations the two differ only by float round-off of reordered
sums (bounded by ``K * eps * sum |alpha| |x|`` per output).

``bcq_outliers`` weights (:mod:`qcompile.ir.bcq_outliers`): the table computation of the
``bcq`` part, then each row's ``k`` sparse corrections, ``x[col] * S`` by shifts and adds
(:func:`shift_add`), added to the row's output.
"""

from __future__ import annotations

import numpy as np

from .bcq import EXPONENT_BIAS, BCQWeight
from .bcq_outliers import BCQOutlierWeight

BLOCK = 8


def build_tables(activations: np.ndarray) -> np.ndarray:
    """``[..., K]`` (K a multiple of 8) to the tables ``[..., K / 8, 256]``, with additions only."""
    blocks = activations.reshape(*activations.shape[:-1], -1, BLOCK)
    tables = np.empty((*blocks.shape[:-1], 1 << BLOCK), activations.dtype)
    tables[..., 0] = -blocks.sum(-1)
    for bit in range(BLOCK):
        low = 1 << bit
        doubled = blocks[..., bit] + blocks[..., bit]  # 2 x_t: a shift by one
        tables[..., low : 2 * low] = tables[..., :low] + doubled[..., None]
    return tables


def shift_add(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``values * alpha`` for APoT alphas given by their int8 term codes ``[..., terms]``.

    One ``ldexp`` (a shift: an add to the float exponent) per term, then additions;
    ``codes`` broadcasts against ``values[..., None]``.
    """
    codes = codes.astype(np.int32)
    shifted = np.ldexp(values[..., None], np.abs(codes) - EXPONENT_BIAS)
    signed = np.where(codes > 0, shifted, np.where(codes < 0, -shifted, 0))
    out = signed[..., 0]
    for term in range(1, codes.shape[-1]):
        out = out + signed[..., term]
    return out


def lut_matmul(activations: np.ndarray, weight: BCQWeight | BCQOutlierWeight, dtype: type = np.float32
               ) -> np.ndarray:
    """``activations @ W^T`` for ``[M, K]`` activations (``K = weight.cols``): ``[M, rows]``."""
    if isinstance(weight, BCQOutlierWeight):
        dense = lut_matmul(activations, weight.dense, dtype)
        x_sparse: np.ndarray = np.asarray(activations, dtype)[:, weight.outlier_cols.astype(np.intp)]  # [M, R, k]
        corrections = shift_add(x_sparse, weight.outlier_values[None])  # [M, R, k]
        for slot in range(weight.per_row):
            dense = dense + corrections[..., slot]
        return dense
    x: np.ndarray = np.asarray(activations, dtype)
    tokens, cols = x.shape
    if cols != weight.cols:
        raise ValueError(f"activations have {cols} columns, the weight {weight.cols}")
    padded = -(-cols // BLOCK) * BLOCK
    x = np.pad(x, ((0, 0), (0, padded - cols)))
    row_group = np.arange(weight.rows) // weight.row_group  # [R]
    planes = weight.planes.astype(np.intp)  # [R, Q, B] table indices
    block_index = np.arange(padded // BLOCK)
    if weight.col_group % BLOCK == 0:
        tables = build_tables(x)  # [M, B, 256]
        looked_up = tables[:, block_index[None, None, :], planes]  # [M, R, Q, B]
        alpha_codes = weight.alphas[row_group][:, block_index * BLOCK // weight.col_group]  # [R, B, Q, T]
        products = shift_add(looked_up, alpha_codes.transpose(0, 2, 1, 3)[None])
    elif weight.col_group == 1:
        codes = np.pad(weight.alphas, ((0, 0), (0, padded - cols), (0, 0), (0, 0)))  # [G, K, Q, T], 0 = no term
        scaled = shift_add(x[:, None, :, None], codes[None])  # [M, G, K, Q]
        tables = build_tables(scaled.transpose(0, 1, 3, 2))  # [M, G, Q, B, 256]
        plane_index = np.arange(weight.bits)
        products = tables[:, row_group[:, None, None], plane_index[None, :, None], block_index[None, None, :],
                          planes]  # [M, R, Q, B]
    else:
        raise ValueError(f"col_group={weight.col_group}: table blocks of 8 need alphas per column or per 8k columns")
    out = products[..., 0]  # accumulate blocks, then planes, by additions
    for block in range(1, products.shape[-1]):
        out = out + products[..., block]
    result = out[..., 0]
    for plane in range(1, weight.bits):
        result = result + out[..., plane]
    return result


def dense_matmul(activations: np.ndarray, weight: BCQWeight | BCQOutlierWeight, dtype: type = np.float32) -> np.ndarray:
    """The dequantize-and-MatMul reference the table computation must equal."""
    return np.asarray(activations, dtype) @ weight.dequantize().astype(dtype).T
