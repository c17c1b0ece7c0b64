"""Optimal Brain Surgeon column walks for sparse weights: SparseGPT pruning and mask-aware GPTQ.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (2023). For a layer ``Y = X W^T`` (``W`` ``[rows, cols]``) the Hessian of the
output error is ``H = X^T X``; with ``U`` the upper Cholesky factor of ``H^-1``, the
columns are walked in blocks: each column is replaced by its pruned (and/or quantized)
value and the error, divided by ``U_ii``, is fed to the columns not yet visited, so the
remaining weights absorb what the pruned ones contributed to the output.

* :func:`obs_prune` chooses the mask of each block of columns when the walk reaches it
  (on the weights as updated so far) with a caller-given rule, then compensates.
* :func:`masked_gptq` is GPTQ with a fixed mask: masked positions are forced to exactly
  zero during the walk (plain GPTQ would refill them through its error feedback) and
  every kept weight is rounded with its own (per-element) scale and zero point, which
  is what quantizing only the non-zeros with their own group parameters needs.

Rows are independent given ``H``: they are walked in chunks to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .gptq import inverse_hessian_factor

# (current block weights [rows, b], first column, diag(U) of the block) -> keep mask [rows, b]
BlockMask = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


def _prepared(weight: np.ndarray, hessian: np.ndarray, damp: float, order: np.ndarray | None):
    weight = np.asarray(weight, np.float64).copy()
    hessian = np.asarray(hessian, np.float64).copy()
    dead = np.diag(hessian) <= 0  # inputs that are always zero: any value is as good
    hessian[dead, dead] = 1.0
    if order is not None:
        hessian = hessian[np.ix_(order, order)]
        weight = weight[:, order]
    return weight, inverse_hessian_factor(hessian, damp)


def obs_prune(weight: np.ndarray, hessian: np.ndarray, block_mask: BlockMask, *, damp: float = 0.01,
              block_size: int = 128, row_chunk: int = 2048) -> np.ndarray:
    """SparseGPT: prune ``weight`` ``[rows, cols]`` block by block with ``block_mask`` and
    compensate the error; returns the new float64 weight (pruned entries exactly 0)."""
    weight, factor = _prepared(weight, hessian, damp, None)
    rows, cols = weight.shape
    for first in range(0, rows, row_chunk):
        chunk = weight[first : first + row_chunk]
        for begin in range(0, cols, block_size):
            end = min(begin + block_size, cols)
            keep = block_mask(chunk[:, begin:end], begin, np.diag(factor)[begin:end])
            _walk_block(chunk, factor, begin, end, _masker(keep, begin))
        weight[first : first + row_chunk] = chunk
    return weight


def masked_gptq(weight: np.ndarray, hessian: np.ndarray, keep: np.ndarray, scales: np.ndarray,
                zero_points: np.ndarray, bits: int, *, damp: float = 0.01, block_size: int = 128,
                act_order: bool = True, row_chunk: int = 2048) -> np.ndarray:
    """GPTQ of the kept weights of ``weight`` with per-element ``scales``/``zero_points``
    (``[rows, cols]``); masked positions stay exactly zero. Returns the codes ``[rows, cols]``
    (``zero_points`` where masked, which decodes to 0)."""
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(weight.shape[1])
    weight, factor = _prepared(weight, hessian, damp, order)
    keep, scales, zero_points = keep[:, order], scales[:, order], zero_points[:, order]
    qmax = (1 << bits) - 1
    rows, cols = weight.shape
    codes = np.empty((rows, cols), np.uint8)
    for first in range(0, rows, row_chunk):
        part = slice(first, first + row_chunk)
        quantize = _column_quantizer(keep[part], scales[part], zero_points[part], codes[part], qmax)
        for begin in range(0, cols, block_size):
            _walk_block(weight[part], factor, begin, min(begin + block_size, cols), quantize)
    restored = np.empty_like(codes)
    restored[:, order] = codes
    return restored


def _masker(keep: np.ndarray, begin: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """Column ``i`` (of the whole weight) with the entries ``keep`` (of its block) drops set to 0."""
    return lambda values, i: values * keep[:, i - begin]


def _column_quantizer(keep: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, codes: np.ndarray,
                      qmax: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """Round column ``i`` with its per-element parameters (masked: the zero point, i.e. 0),
    record the codes in ``codes`` and return the values they decode to."""

    def quantize(values: np.ndarray, i: int) -> np.ndarray:
        q = np.clip(np.round(values / scales[:, i]) + zero_points[:, i], 0, qmax)
        q = np.where(keep[:, i], q, zero_points[:, i])
        codes[:, i] = q
        return (q - zero_points[:, i]) * scales[:, i]

    return quantize


def _walk_block(weight: np.ndarray, factor: np.ndarray, begin: int, end: int,
                replace: Callable[[np.ndarray, int], np.ndarray]) -> None:
    """Replace columns ``begin:end`` of ``weight`` (in place) one by one by ``replace(column, index)``,
    feeding each column's error to the later columns of the block, then the block's to the rest."""
    block = weight[:, begin:end].copy()
    errors = np.empty_like(block)
    block_factor = factor[begin:end, begin:end]
    for i in range(end - begin):
        new = replace(block[:, i], begin + i)
        error = (block[:, i] - new) / block_factor[i, i]
        block[:, i + 1 :] -= np.outer(error, block_factor[i, i + 1 :])
        block[:, i] = new
        errors[:, i] = error
    weight[:, begin:end] = block
    weight[:, end:] -= errors @ factor[begin:end, end:]
