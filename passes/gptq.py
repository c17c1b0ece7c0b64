"""GPTQ: quantize a layer column by column, feeding each column's error forward.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (2023). For a layer ``Y = X W^T`` with ``W`` ``[rows, cols]``
and calibration inputs ``X``, the Hessian of the output error is ``H = X^T X``. Walking
the columns (largest ``diag(H)`` first with ``act_order``), each column is rounded and
its error, scaled by the inverse Hessian's Cholesky factor, is subtracted from the
columns not yet quantized, so the layer output, not the weight, is what stays close.

Group scales and zero points are fixed before the walk ("static groups": the range
search of :func:`qcompile.ir.qformat.quantize_int`, weighted by ``diag(H)``), so the
stored format is the plain ``int`` format. Rows are independent given ``H``, so they
are processed in chunks: memory is ``O(cols^2 + row_chunk * cols)``.

The walk itself (:func:`walk_columns`) takes the column quantizer as a function, so other
quantizers reuse it: ``shiftadd`` fits binary-coded columns inside the same loop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.linalg import lapack

from qcompile.ir.qformat import QuantizedWeight, effective_group_size, from_codes, quantize_int


def inverse_hessian_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U`` is the inverse).

    With ``J`` the order reversal, ``J A J = L L^T`` gives ``A = R R^T`` for the upper ``R = J L J``,
    so ``A^-1 = (R^-1)^T R^-1`` and ``U = J L^-1 J``: one Cholesky and one triangular inverse,
    about a quarter of the work of inverting ``A`` and factoring the inverse.
    """
    size = hessian.shape[0]
    damped = hessian + np.eye(size) * damp * max(float(np.mean(np.diag(hessian))), 1e-8)
    lower = np.linalg.cholesky(damped[::-1, ::-1])
    inverse, info = lapack.dtrtri(lower, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (info {info})")
    return np.ascontiguousarray(inverse[::-1, ::-1])


def prepare_hessian(weight: np.ndarray, hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies of ``weight`` and ``hessian`` with dead inputs (``H_jj = 0``) neutralised.

    A column no calibration row ever excites gets ``H_jj = 1`` and a zero weight, so the
    factorisation stays defined and the column costs nothing.
    """
    weight = np.asarray(weight, np.float64).copy()
    hessian = np.asarray(hessian, np.float64).copy()
    dead = np.diag(hessian) <= 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    return weight, hessian


ColumnQuantizer = Callable[[int, np.ndarray], np.ndarray]
"""``quantize(column, pending) -> values``: ``pending`` holds the (error-compensated) columns
``column, column+1, ...`` of the current block of the walk (``[rows, k]``, read only); return
the quantized values of the first of them, ``[rows]``."""


def walk_columns(weight: np.ndarray, factor: np.ndarray, quantize: ColumnQuantizer, block_size: int = 128) -> None:
    """The GPTQ loop over the columns of ``weight`` (in walk order; updated in place).

    Each column is quantized by ``quantize`` after the errors of all earlier columns were fed
    into it; its error, divided by ``U_jj``, is subtracted from the later columns through row
    ``j`` of the inverse Hessian's Cholesky factor ``U`` (lazily, once per block of
    ``block_size`` columns for the columns beyond the block).
    """
    cols = weight.shape[1]
    for begin in range(0, cols, block_size):
        end = min(begin + block_size, cols)
        block = weight[:, begin:end].copy()
        errors = np.empty_like(block)
        block_factor = factor[begin:end, begin:end]
        for i in range(end - begin):
            values = quantize(begin + i, block[:, i:])
            error = (block[:, i] - values) / block_factor[i, i]
            block[:, i:] -= np.outer(error, block_factor[i, i:])
            errors[:, i] = error
        weight[:, end:] -= errors @ factor[begin:end, end:]


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    *,
    bits: int,
    group_size: int,
    sym: bool = False,
    clip_search: int = 20,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    row_chunk: int = 2048,
) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` ``[rows, cols]`` given ``hessian`` ``[cols, cols]`` (X^T X)."""
    weight, hessian = prepare_hessian(weight, hessian)
    rows, cols = weight.shape
    group_size = effective_group_size(cols, group_size)
    start = quantize_int(weight.astype(np.float32), bits, group_size, sym=sym, clip_search=clip_search,
                         importance=np.diag(hessian))
    scales = start.scales.astype(np.float64)
    zero_points = start.zero_points.astype(np.float64)
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(cols)
    factor = inverse_hessian_factor(hessian[np.ix_(order, order)], damp)
    group_of_column = order // group_size
    codes = np.empty((rows, cols), np.uint8)
    for first in range(0, rows, row_chunk):
        chunk = slice(first, min(first + row_chunk, rows))
        codes[chunk][:, order] = _walk_columns(
            weight[chunk][:, order],
            scales[chunk][:, group_of_column],
            zero_points[chunk][:, group_of_column],
            factor,
            bits,
            block_size,
        )
    return from_codes(codes, start.scales, start.zero_points, bits, group_size, sym)


def _walk_columns(weight, scales, zero_points, factor, bits, block_size) -> np.ndarray:
    """GPTQ with the uniform quantizer of fixed group parameters; returns the codes in walk order."""
    qmax = (1 << bits) - 1
    codes = np.empty(weight.shape, np.uint8)

    def quantize(column: int, pending: np.ndarray) -> np.ndarray:
        q = np.clip(np.round(pending[:, 0] / scales[:, column]) + zero_points[:, column], 0, qmax)
        codes[:, column] = q
        return (q - zero_points[:, column]) * scales[:, column]

    walk_columns(weight, factor, quantize, block_size)
    return codes
