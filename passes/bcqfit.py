"""Binary-coding quantization (BCQ) with power-of-two alphas: the fitting behind ``shiftadd``.

ShiftAddLLM (You et al., 2024): a group of weights ``w`` is approximated by
``sum_i alpha_i * b_i`` with ``b_i`` in ``{-1, +1}`` and every ``alpha_i`` a sum of at most
``terms`` signed powers of two ("additive powers of two", APoT). Fitting, vectorised over
any number of groups at once:

1. init: the better of greedy (``b_i = sign(r)``, ``alpha_i = mean |r|`` on the residual
   ``r``) and a few uniform grids (a uniform quantizer is a BCQ with alphas in ratio
   ``2^(bits-1) : ... : 2 : 1``), per group;
2. then ``rounds`` times: alphas by (weighted) least squares for the current codes, each
   alpha rounded to APoT, codes set to the nearest of the ``2^bits`` codewords for the
   rounded alphas. The rounding happens inside every round, so the codes are always the
   best ones for the alphas that will be stored. The best state of any round is kept.

Group weights (e.g. ``1 / [H^-1]_jj`` per column, or 0 on padding) make the fit minimise
the weighted error. With ``outliers`` (a fraction of each row), the most salient weights get
weight 0 in their group's fit and are stored as sparse APoT corrections
(:mod:`qcompile.ir.bcq_outliers`). Cost per round is ``O(n * 2^bits)`` per group: linear in the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.ir.bcq import (
    MAX_EXPONENT,
    MIN_EXPONENT,
    BCQWeight,
    decode_alphas,
    encode_terms,
    from_signs,
)
from qcompile.ir.bcq_outliers import BCQOutlierWeight, with_outliers

from .gptq import inverse_hessian_factor, prepare_hessian, walk_columns

CHUNK_ELEMENTS = 1 << 22  # values x codewords held at once by the nearest-codeword search


@dataclass
class BCQFit:
    """Codes and APoT alphas of ``G`` groups of ``n`` values each."""

    signs: np.ndarray  # bool [G, n, bits] (True = +1)
    alphas: np.ndarray  # float64 [G, bits], each an exact APoT value
    raw: np.ndarray  # float64 [G, bits], the values ``alphas`` were rounded from
    error: np.ndarray  # float64 [G], weighted squared error
    terms: int

    @property
    def codes(self) -> np.ndarray:
        """int8 ``[G, bits, terms]``: the format's encoding of ``alphas``."""
        return apot_codes(self.raw, self.terms)

    def reconstruct(self) -> np.ndarray:
        return reconstruct(self.signs, self.alphas)


def apot_round(alphas: np.ndarray, terms: int) -> np.ndarray:
    """Round every value to a sum of at most ``terms`` signed powers of two, greedily on the residual.

    Each step takes the power of two nearest to the residual in value (``2^L`` below
    ``1.5 * 2^L``, else ``2^(L+1)``); exponents outside the format's range are dropped.
    """
    residual = np.asarray(alphas, np.float64).copy()
    values = np.zeros_like(residual)
    for _ in range(terms):
        step = _nearest_power_of_two(residual)
        values += step
        residual -= step
    return values


def apot_codes(alphas: np.ndarray, terms: int) -> np.ndarray:
    """The int8 codes ``[..., terms]`` of :func:`apot_round`'s terms for ``alphas``."""
    residual = np.asarray(alphas, np.float64).copy()
    signs = np.zeros((*residual.shape, terms), np.int8)
    exponents = np.zeros((*residual.shape, terms), np.int64)
    for term in range(terms):
        step = _nearest_power_of_two(residual)
        residual -= step
        signs[..., term] = np.sign(step)
        _, exponent = np.frexp(np.where(step != 0, np.abs(step), 1.0))
        exponents[..., term] = np.where(step != 0, exponent - 1, 0)
    return encode_terms(signs, exponents)


def _nearest_power_of_two(values: np.ndarray) -> np.ndarray:
    """Signed power of two nearest to each value (0 for 0 and for magnitudes outside the format)."""
    magnitude = np.abs(values)
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(magnitude / 1.5)) + 1.0
    usable = (magnitude > 0) & (exponent >= MIN_EXPONENT)
    exponent = np.where(usable, np.minimum(exponent, MAX_EXPONENT), 0.0)
    return np.where(usable, np.sign(values) * np.exp2(exponent), 0.0)


def _codewords(bits: int) -> np.ndarray:
    """All ``2^bits`` sign patterns, ``[2^bits, bits]`` of ±1."""
    index = np.arange(1 << bits)[:, None]
    return ((index >> np.arange(bits)) & 1).astype(np.float64) * 2.0 - 1.0


def nearest_codes(values: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Sign patterns ``[G, n, bits]`` (bool) whose codeword ``sum_i alpha_i b_i`` is nearest to each value."""
    groups, count = values.shape
    bits = alphas.shape[1]
    patterns = _codewords(bits)
    codebook = alphas @ patterns.T  # [G, 2^bits]
    chosen = np.empty((groups, count), np.int64)
    step = max(1, CHUNK_ELEMENTS // max(1, count << bits))
    for first in range(0, groups, step):
        part = slice(first, first + step)
        distance = np.abs(values[part, :, None] - codebook[part, None, :])
        chosen[part] = distance.argmin(-1)
    return patterns[chosen] > 0


def reconstruct(signs: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """``sum_i alpha_i b_i`` for bool signs ``[G, n, bits]`` and alphas ``[G, bits]``: ``[G, n]``."""
    return np.einsum("gnb,gb->gn", signs * 2.0 - 1.0, alphas)


def _least_squares(values, weights, signs) -> np.ndarray:
    """Per group, alphas minimising ``sum w (v - B alpha)^2``; a tiny ridge keeps equal planes solvable."""
    basis = signs * 2.0 - 1.0  # [G, n, q]
    weighted = basis * weights[..., None]
    gram = np.matmul(weighted.transpose(0, 2, 1), basis)  # [G, q, q]
    rhs = np.matmul(weighted.transpose(0, 2, 1), values[..., None])[..., 0]
    ridge = 1e-9 * np.maximum(np.trace(gram, axis1=1, axis2=2), 1e-30)
    gram = gram + ridge[:, None, None] * np.eye(basis.shape[2])
    return np.linalg.solve(gram, rhs[..., None])[..., 0]


def _error(values, weights, signs, alphas) -> np.ndarray:
    return (weights * np.square(values - reconstruct(signs, alphas))).sum(-1)


def fit_bcq(values: np.ndarray, bits: int, *, terms: int = 3, rounds: int = 5,
            weights: np.ndarray | None = None) -> BCQFit:
    """Fit ``G`` groups ``values`` ``[G, n]`` with ``bits`` planes and APoT alphas of ``terms`` terms.

    ``weights`` (``[G, n]`` or ``[n]``, non-negative) weight each value's squared error.
    ``rounds=0`` keeps the better start (greedy or uniform grid), alphas rounded to APoT.
    """
    values = np.asarray(values, np.float64)
    weights = np.ones_like(values) if weights is None else np.broadcast_to(
        np.asarray(weights, np.float64), values.shape)
    total = np.maximum(weights.sum(-1), 1e-300)
    residual = values.copy()
    greedy = np.empty((*values.shape, bits), bool)
    greedy_alphas = np.empty((values.shape[0], bits))
    for plane in range(bits):
        greedy[..., plane] = residual >= 0
        greedy_alphas[:, plane] = (weights * np.abs(residual)).sum(-1) / total
        residual -= np.where(greedy[..., plane], 1.0, -1.0) * greedy_alphas[:, plane, None]
    best = _best_start(values, weights, [greedy_alphas, *_uniform_alphas(values, weights, bits)], terms)
    signs = best.signs
    for _ in range(rounds):
        candidate = _rounded(values, weights, _least_squares(values, weights, signs), terms)
        best = _better(best, candidate)
        if np.array_equal(candidate.signs, signs):
            break
        signs = candidate.signs
    return _sorted_planes(best)


# Step of the MSE-optimal uniform quantizer of a unit Gaussian with 2^bits levels (Max 1960).
GAUSSIAN_UNIFORM_STEP = {1: 1.596, 2: 0.996, 3: 0.586, 4: 0.335}


def _uniform_alphas(values, weights, bits) -> list[np.ndarray]:
    """A few uniform grids: alphas ``step * 2^(bits-2-i)`` give the levels ``step * (k + 1/2)``,
    ``|k| < 2^(bits-1)`` -- a uniform quantizer is a special BCQ, and a better start than
    greedy for 3-4 bits (fewer ALS rounds to converge)."""
    rms = np.sqrt((weights * np.square(values)).sum(-1) / np.maximum(weights.sum(-1), 1e-300))
    shape = 2.0 ** (bits - 2 - np.arange(bits))
    return [(rms * GAUSSIAN_UNIFORM_STEP[bits] * multiplier)[:, None] * shape[None, :]
            for multiplier in (0.75, 1.0, 1.3)]


def _best_start(values, weights, starts: list[np.ndarray], terms: int) -> BCQFit:
    """Per group, the best of several starting alphas ``[G, bits]`` (each rounded, codes
    nearest): evaluated in one batched call, since the walk fits few groups at a time and
    per-call overhead dominates there. Ties go to the earlier start."""
    count, groups = len(starts), values.shape[0]
    fit = _rounded(np.tile(values, (count, 1)), np.tile(weights, (count, 1)), np.concatenate(starts), terms)
    choice = fit.error.reshape(count, groups).argmin(0)
    pick = choice * groups + np.arange(groups)
    return BCQFit(fit.signs[pick], fit.alphas[pick], fit.raw[pick], fit.error[pick], terms)


def _better(best: BCQFit, candidate: BCQFit) -> BCQFit:
    """Per group, the fit with the smaller error."""
    better = candidate.error < best.error
    return BCQFit(np.where(better[:, None, None], candidate.signs, best.signs),
                  np.where(better[:, None], candidate.alphas, best.alphas),
                  np.where(better[:, None], candidate.raw, best.raw),
                  np.where(better, candidate.error, best.error), best.terms)


def _rounded(values, weights, alphas, terms) -> BCQFit:
    """Alphas made non-negative (flipping their planes), rounded to APoT; codes nearest for them."""
    raw = np.abs(alphas)
    rounded = apot_round(raw, terms)
    signs = nearest_codes(values, rounded)
    return BCQFit(signs, rounded, raw, _error(values, weights, signs, rounded), terms)


def _sorted_planes(fit: BCQFit) -> BCQFit:
    """Planes ordered by decreasing alpha (the order does not change the value)."""
    order = np.argsort(-fit.alphas, axis=1, kind="stable")
    return BCQFit(np.take_along_axis(fit.signs, order[:, None, :], axis=2),
                  np.take_along_axis(fit.alphas, order, axis=1),
                  np.take_along_axis(fit.raw, order, axis=1), fit.error, fit.terms)


def outliers_per_row(fraction: float, cols: int) -> int:
    """Corrections per row for an outlier ``fraction``: ``round(fraction * cols)``, at least 1
    when ``fraction > 0``, at most ``cols``."""
    return 0 if fraction <= 0 else int(min(cols, max(1, round(fraction * cols))))


def top_per_row(score: np.ndarray, count: int) -> np.ndarray:
    """bool ``[rows, cols]``: the ``count`` largest scores of every row (ties to the lower column)."""
    mask = np.zeros(score.shape, bool)
    if count > 0:
        chosen = np.argsort(-score, axis=1, kind="stable")[:, :count]
        np.put_along_axis(mask, chosen, True, axis=1)
    return mask


def _group_rms(matrix: np.ndarray, row_group: int, col_group: int) -> np.ndarray:
    """``[rows, cols]``: the rms of each weight's (``row_group`` x ``col_group``) tile."""
    rows, cols = matrix.shape
    padded = np.zeros((-(-rows // row_group) * row_group, -(-cols // col_group) * col_group))
    padded[:rows, :cols] = np.square(matrix)
    tiles = padded.reshape(padded.shape[0] // row_group, row_group, -1, col_group)
    counts = np.zeros_like(padded)
    counts[:rows, :cols] = 1.0
    count = counts.reshape(tiles.shape).sum((1, 3))
    rms = np.sqrt(tiles.sum((1, 3)) / np.maximum(count, 1.0))
    return np.repeat(np.repeat(rms, row_group, 0), col_group, 1)[:rows, :cols]


def _corrections(residual: np.ndarray, terms: int, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """APoT term codes ``[..., terms]`` of ``residual`` and the exact values they decode to.

    Terms are dropped from the smallest while ``base + correction`` would not be exact in
    float32 (a correction below the float32 resolution of the weight it corrects), so the
    float32 weight is exactly the dense part plus the correction, as the shift-add
    computation (:mod:`qcompile.ir.lut`) sums them.
    """
    codes = apot_codes(residual, terms)
    keep = np.zeros(residual.shape, np.int64)
    for count in range(1, terms + 1):  # greedy APoT terms come largest first
        head = codes.copy()
        head[..., count:] = 0
        total = base + decode_alphas(head).astype(np.float64)
        keep = np.where(total.astype(np.float32).astype(np.float64) == total, count, keep)
    codes[np.arange(terms) >= keep[..., None]] = 0
    return codes, decode_alphas(codes).astype(np.float64)


def bcq_rowwise(matrix: np.ndarray, bits: int, *, terms: int = 3, col_group: int = 128, rounds: int = 5,
                importance: np.ndarray | None = None, row_chunk: int = 4096,
                outliers: float = 0.0, outlier_terms: int | None = None) -> BCQWeight | BCQOutlierWeight:
    """Row-wise BCQ of ``[rows, cols]``: alphas per row and group of ``col_group`` columns.

    For layers without a Hessian (embedding tables, Conv): each group is fitted on its own,
    its error weighted per column by ``importance`` (e.g. the inputs' mean square) if given.
    ``outliers``: the fraction of each row kept out of the fit (largest ``|w| / rms(group)``,
    times ``sqrt(importance)``) and corrected sparsely, each correction an APoT value of
    ``outlier_terms`` terms (default ``terms``).
    """
    outlier_terms = terms if outlier_terms is None else outlier_terms
    matrix = np.asarray(matrix, np.float64)
    rows, cols = matrix.shape
    col_group = min(col_group, cols) if col_group > 0 else cols
    n_groups = -(-cols // col_group)
    padded = n_groups * col_group
    column_weight = np.zeros(padded)
    column_weight[:cols] = 1.0 if importance is None else np.maximum(np.asarray(importance, np.float64), 0) + 1e-12
    per_row = outliers_per_row(outliers, cols)
    signs = np.empty((rows, bits, cols), bool)
    codes = np.empty((rows, n_groups, bits, terms), np.int8)
    mask = np.zeros((rows, cols), bool)
    outlier_codes = np.zeros((rows, cols, outlier_terms), np.int8) if per_row else None
    for first in range(0, rows, row_chunk):
        part = matrix[first : first + row_chunk]
        values = np.zeros((part.shape[0], padded))
        values[:, :cols] = part
        weights = np.tile(column_weight.reshape(n_groups, col_group), (part.shape[0], 1))
        if per_row:
            score = np.abs(part) / np.maximum(_group_rms(part, 1, col_group), 1e-30)
            if importance is not None:
                score = score * np.sqrt(column_weight[:cols])
            chunk_mask = top_per_row(score, per_row)
            mask[first : first + row_chunk] = chunk_mask
            inliers = np.ones((part.shape[0], padded))
            inliers[:, :cols] = ~chunk_mask
            weights = weights * inliers.reshape(-1, col_group)
        fit = fit_bcq(values.reshape(-1, col_group), bits, terms=terms, rounds=rounds, weights=weights)
        chunk_signs = fit.signs.reshape(part.shape[0], padded, bits).transpose(0, 2, 1)
        signs[first : first + row_chunk] = chunk_signs[:, :, :cols]
        codes[first : first + row_chunk] = fit.codes.reshape(part.shape[0], n_groups, bits, terms)
        if outlier_codes is not None:
            recon = reconstruct(fit.signs, fit.alphas).reshape(part.shape[0], padded)[:, :cols]
            chunk_codes, _ = _corrections(np.where(mask[first : first + row_chunk], part - recon, 0.0),
                                          outlier_terms, recon)
            outlier_codes[first : first + row_chunk] = chunk_codes
    dense = from_signs(signs, codes, 1, col_group)
    return dense if outlier_codes is None else with_outliers(dense, mask, outlier_codes)


def bcq_gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, *, terms: int = 3, layout: str = "column",
             group_size: int = 128, rounds: int = 5, damp: float = 0.01, act_order: bool = True,
             block_size: int = 128, row_chunk: int = 2048, outliers: float = 0.0,
             outlier_terms: int | None = None) -> BCQWeight | BCQOutlierWeight:
    """ShiftAddLLM's multi-objective fit: BCQ inside the GPTQ column walk.

    ``layout="column"``: each input column gets its own alphas per group of ``group_size``
    output rows, fitted on the column after the errors of the columns before it were fed
    forward. ``layout="block"``: 8 consecutive input columns share alphas (the lookup-table
    kernel's layout); they are fitted on the 8 columns when the walk reaches the block
    (each column's error weighted by ``1 / [H^-1]_jj``, its cost in GPTQ's objective), then
    every column of the block gets the nearest codes for them after compensation. With
    ``act_order`` the walk visits columns (blocks) by decreasing input energy.
    ``layout="row"``: alphas per row and group of ``group_size`` consecutive columns (the
    row-wise layout ``QGather`` needs, for an embedding table tied to an LM head), each group
    fitted when the walk reaches it, on its columns as compensated so far.

    ``outliers``: the fraction of each row chosen before the walk by
    ``|w| / rms(alpha group) / U_jj`` (the weight's size in its group, and its column's cost
    in GPTQ's objective); they get weight 0 in their group's alpha fit, keep the codes
    nearest to them, and what those miss after compensation is stored as an APoT correction
    (its rounding error is fed forward like any other), of ``outlier_terms`` powers of two
    (default ``terms``).
    """
    outlier_terms = terms if outlier_terms is None else outlier_terms
    weight, hessian = prepare_hessian(weight, hessian)
    rows, cols = weight.shape
    if layout == "row":  # alphas per row and group of group_size columns: GPTQ with groups fitted as reached
        col_group, row_group = (min(group_size, cols) if group_size > 0 else cols), 1
        block_size = -(-block_size // col_group) * col_group
    else:
        col_group = 8 if layout == "block" else 1
        row_group = min(group_size, rows) if group_size > 0 else rows
    padded_cols = -(-cols // col_group) * col_group
    if padded_cols != cols:  # zero columns, uncorrelated with the rest, cost nothing
        weight = np.pad(weight, ((0, 0), (0, padded_cols - cols)))
        hessian = np.pad(hessian, ((0, padded_cols - cols), (0, padded_cols - cols)))
        hessian[np.arange(cols, padded_cols), np.arange(cols, padded_cols)] = 1.0
    energy = np.diag(hessian).reshape(-1, col_group).sum(1)
    block_order = np.argsort(-energy, kind="stable") if act_order else np.arange(energy.size)
    order = (block_order[:, None] * col_group + np.arange(col_group)).reshape(-1)
    factor = inverse_hessian_factor(hessian[np.ix_(order, order)], damp)
    column_weight = 1.0 / np.square(np.diag(factor))
    column_weight[order >= cols] = 0.0
    per_row = outliers_per_row(outliers, cols)
    mask = None
    if per_row:
        walked = weight[:, order]
        score = np.abs(walked) / np.maximum(_group_rms(walked, row_group, col_group), 1e-30) / np.diag(factor)
        score[:, order >= cols] = -np.inf
        mask = top_per_row(score, per_row)  # walk order
    signs = np.zeros((rows, bits, padded_cols), bool)
    codes = np.zeros((-(-rows // row_group), padded_cols // col_group, bits, terms), np.int8)
    outlier_codes = np.zeros((rows, padded_cols, outlier_terms), np.int8) if per_row else None
    row_chunk = max(row_group, row_chunk // row_group * row_group)
    for first in range(0, rows, row_chunk):
        last = min(first + row_chunk, rows)
        walker = _ColumnFitter(bits, terms, rounds, row_group, col_group, last - first, column_weight,
                               None if mask is None else mask[first:last], outlier_terms)
        walk_columns(weight[first:last][:, order], factor, walker, block_size)
        signs[first:last][:, :, order] = walker.signs
        codes[first // row_group : -(-last // row_group)][:, block_order] = walker.codes
        if outlier_codes is not None:
            outlier_codes[first:last][:, order] = walker.outlier_codes
    dense = from_signs(signs[:, :, :cols], codes, row_group, col_group)
    if mask is None or outlier_codes is None:
        return dense
    dense_mask = np.zeros((rows, padded_cols), bool)
    dense_mask[:, order] = mask
    return with_outliers(dense, dense_mask[:, :cols], outlier_codes[:, :cols])


class _ColumnFitter:
    """The column quantizer of :func:`bcq_gptq` for one chunk of rows (walk order)."""

    def __init__(self, bits, terms, rounds, row_group, col_group, rows, column_weight, outliers=None,
                 outlier_terms=None):
        self.bits, self.terms, self.rounds = bits, terms, rounds
        self.row_group, self.col_group, self.rows = row_group, col_group, rows
        self.groups = -(-rows // row_group)
        self.row_mask = (np.arange(self.groups * row_group) < rows).astype(np.float64).reshape(self.groups, row_group)
        self.column_weight = column_weight
        cols = column_weight.size
        self.signs = np.zeros((rows, bits, cols), bool)
        self.codes = np.zeros((self.groups, cols // col_group, bits, terms), np.int8)
        self.alphas = np.zeros((self.groups, bits))
        self.outliers = outliers  # bool [rows, cols] in walk order, or None
        self.outlier_terms = terms if outlier_terms is None else outlier_terms
        self.outlier_codes = np.zeros((rows, cols, self.outlier_terms), np.int8) if outliers is not None else None

    def _grouped(self, values: np.ndarray) -> np.ndarray:
        """``[rows, k]`` to ``[groups, row_group * k]`` (zero rows pad the last group)."""
        padded = np.zeros((self.groups * self.row_group, values.shape[1]))
        padded[: self.rows] = values
        return padded.reshape(self.groups, -1)

    def __call__(self, column: int, pending: np.ndarray) -> np.ndarray:
        width = self.col_group
        if column % width == 0:
            weights = (self.row_mask[:, :, None] * self.column_weight[None, None, column : column + width]).reshape(
                self.groups, -1)
            if self.outliers is not None:
                weights = weights * (1.0 - self._grouped(self.outliers[:, column : column + width]))
            fit = fit_bcq(self._grouped(pending[:, :width]), self.bits, terms=self.terms, rounds=self.rounds,
                          weights=weights)
            self.alphas = fit.alphas
            self.codes[:, column // width] = fit.codes
            if width == 1:
                return self._corrected(column, pending[:, 0], self._store(column, fit.signs))
        values = self._grouped(pending[:, :1])
        return self._corrected(column, pending[:, 0], self._store(column, nearest_codes(values, self.alphas)))

    def _store(self, column: int, signs: np.ndarray) -> np.ndarray:
        """Record the codes ``[groups, row_group, bits]`` of ``column``; return its values ``[rows]``."""
        self.signs[:, :, column] = signs.reshape(-1, self.bits)[: self.rows]
        return reconstruct(signs, self.alphas).reshape(-1)[: self.rows]

    def _corrected(self, column: int, target: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``values`` plus the APoT corrections of the column's outliers (recorded)."""
        if self.outliers is None or self.outlier_codes is None:
            return values
        rows = np.flatnonzero(self.outliers[:, column])
        if rows.size:
            codes, corrections = _corrections(target[rows] - values[rows], self.outlier_terms, values[rows])
            self.outlier_codes[rows, column] = codes
            values = values.copy()
            values[rows] += corrections
        return values
