"""Quantizing a sparse weight: only the non-zeros, with their own group parameters.

Used by ``quant`` for layers with many exact zeros (after ``prune``): the zeros become
the sparse layout's metadata (:mod:`qcompile.ir.sparse`), the non-zeros of each row are
compacted and quantized by the ``int`` format, so the groups (and their scales) cover
non-zeros only, and decoding gives exactly zero where the weight was zero. With a
Hessian (``method=gptq``), GPTQ's error feedback runs over the kept weights only
(:func:`qcompile.passes.obs.masked_gptq`): the pruned positions are never refilled.
"""

from __future__ import annotations

import numpy as np

from qcompile.ir.qformat import effective_group_size, from_codes, quantize_int
from qcompile.ir.sparse import SparseWeight, choose_placement, sparse_weight

from .obs import masked_gptq

SCALE_AND_ZERO_POINT_BITS = 24  # float16 scale + uint8 zero point per group


def zero_fraction(matrix: np.ndarray) -> float:
    return float(np.count_nonzero(matrix == 0) / matrix.size) if matrix.size else 0.0


def quantize_sparse(matrix: np.ndarray, *, bits: int, group_size: int, sym: bool = False, clip_search: int = 20,
                    hessian: np.ndarray | None = None, damp: float = 0.01, act_order: bool = True) -> SparseWeight:
    """Quantize the non-zeros of ``matrix`` ``[rows, cols]`` (zeros stay exactly zero): RTN with
    a range search per group of non-zeros, or mask-aware GPTQ when ``hessian`` (X^T X) is given."""
    matrix = np.asarray(matrix, np.float32)
    mask = matrix != 0
    value_bits = bits + SCALE_AND_ZERO_POINT_BITS / max(effective_group_size(matrix.shape[1], group_size), 1)
    placement = choose_placement(mask, value_bits)
    start = quantize_int(placement.compact(matrix), bits, group_size, sym=sym, clip_search=clip_search)
    if hessian is None:
        return sparse_weight(start, placement)
    size = start.group_size
    group = np.maximum(placement.slot_of(), 0) // size  # each kept weight's group in its compact row
    scales = np.take_along_axis(start.scales.astype(np.float64), group, axis=1)
    zero_points = np.take_along_axis(start.zero_points.astype(np.float64), group, axis=1)
    codes = masked_gptq(matrix, hessian, mask, scales, zero_points, bits, damp=damp, act_order=act_order)
    slot_zero_points = np.repeat(start.zero_points, size, axis=1)[:, : placement.width]
    compact_codes = placement.compact(codes, fill=slot_zero_points)  # empty slots decode to exactly 0
    return sparse_weight(from_codes(compact_codes, start.scales, start.zero_points, bits, size, sym), placement)
