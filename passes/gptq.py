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
"""

from __future__ import annotations

import numpy as np

from qcompile.ir.qformat import QuantizedWeight, effective_group_size, from_codes, quantize_int


def inverse_hessian_factor(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1``."""
    size = hessian.shape[0]
    damped = hessian + np.eye(size) * damp * max(float(np.mean(np.diag(hessian))), 1e-8)
    lower = np.linalg.cholesky(damped)
    lower_inv = np.linalg.solve(lower, np.eye(size))
    inverse = lower_inv.T @ lower_inv
    return np.linalg.cholesky(inverse).T


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
    weight = np.asarray(weight, np.float64).copy()
    hessian = np.asarray(hessian, np.float64).copy()
    rows, cols = weight.shape
    group_size = effective_group_size(cols, group_size)
    dead = np.diag(hessian) <= 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
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
    """The GPTQ loop over (permuted) columns; returns the codes in the same order."""
    qmax = (1 << bits) - 1
    rows, cols = weight.shape
    codes = np.empty((rows, cols), np.uint8)
    for begin in range(0, cols, block_size):
        end = min(begin + block_size, cols)
        block = weight[:, begin:end].copy()
        errors = np.empty_like(block)
        block_factor = factor[begin:end, begin:end]
        for i in range(end - begin):
            column = begin + i
            q = np.clip(np.round(block[:, i] / scales[:, column]) + zero_points[:, column], 0, qmax)
            codes[:, column] = q
            error = (block[:, i] - (q - zero_points[:, column]) * scales[:, column]) / block_factor[i, i]
            block[:, i:] -= np.outer(error, block_factor[i, i:])
            errors[:, i] = error
        weight[:, end:] -= errors @ factor[begin:end, end:]
    return codes
