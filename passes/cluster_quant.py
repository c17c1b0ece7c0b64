"""Quantization of a ``split`` group onto per-cluster grids (the ``cluster`` format).

The split parts seed one grid per (row, cluster, group): each grid covers only its
cluster's values, so its step is a fraction of the whole row's. Every weight is then
coded on whichever of the ``k`` grids of its group reconstructs it best (its cluster id
is re-chosen, so a weight near a boundary goes to the closer grid). With ``gptq`` this
choice is made column by column inside GPTQ's error-feedback walk: each column is
coded after the errors of the columns before it have been compensated.
"""

from __future__ import annotations

import numpy as np

from qcompile.ir.cluster import ClusterWeight, encode, fit_grids, nearest_codes, storage_dtype

from .gptq import inverse_hessian_factor, prepare_hessian, walk_columns


def quantize_split(matrix: np.ndarray, ids: np.ndarray, *, k: int, bits: int, group_size: int,
                   gram: np.ndarray | None = None, gptq: bool = False, damp: float = 0.01,
                   act_order: bool = True, clip_search: int = 20, block_size: int = 128) -> ClusterWeight:
    """Quantize ``matrix`` ``[rows, cols]`` whose initial clusters are ``ids``."""
    rows, cols = matrix.shape
    group_size = group_size or -(-cols // 8) * 8
    importance = np.diag(gram) if gram is not None else None
    scales, offsets = fit_grids(matrix, ids, k, bits, group_size, importance, clip_search)
    column_group = np.arange(cols) // group_size
    if gptq and gram is not None:
        codes, chosen = _walk(matrix.astype(np.float64), gram.astype(np.float64), scales, offsets, column_group,
                              bits, damp, act_order, block_size)
    else:
        codes, chosen = nearest_codes(matrix.astype(np.float64), scales[:, :, column_group],
                                      offsets[:, :, column_group], bits)
    return encode(codes, chosen, scales, offsets, bits, k, group_size, storage_dtype(matrix, bits))


def _walk(weight: np.ndarray, hessian: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
          column_group: np.ndarray, bits: int, damp: float, act_order: bool, block_size: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's column walk (:func:`walk_columns`) with :func:`nearest_codes` as the quantizer."""
    weight, hessian = prepare_hessian(weight, hessian)
    rows, cols = weight.shape
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(cols)
    factor = inverse_hessian_factor(hessian[np.ix_(order, order)], damp)
    codes = np.empty((rows, cols), np.uint8)
    chosen = np.empty((rows, cols), np.uint8)

    def quantize(position: int, pending: np.ndarray) -> np.ndarray:
        column = int(order[position])
        group = column_group[column]
        grid_s, grid_o = scales[:, :, group : group + 1], offsets[:, :, group : group + 1]
        code, choice = nearest_codes(pending[:, :1], grid_s, grid_o, bits)
        codes[:, column], chosen[:, column] = code[:, 0], choice[:, 0]
        picked_s = np.take_along_axis(grid_s[:, :, 0], choice, axis=1)[:, 0]
        picked_o = np.take_along_axis(grid_o[:, :, 0], choice, axis=1)[:, 0]
        return picked_o + code[:, 0] * picked_s

    walk_columns(np.ascontiguousarray(weight[:, order]), factor, quantize, block_size)
    return codes, chosen
