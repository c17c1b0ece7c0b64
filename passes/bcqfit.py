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
the weighted error. Cost per round is ``O(n * 2^bits)`` per group: linear in the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.ir.bcq import MAX_EXPONENT, MIN_EXPONENT, BCQWeight, encode_terms, from_signs

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


def bcq_rowwise(matrix: np.ndarray, bits: int, *, terms: int = 3, col_group: int = 128, rounds: int = 5,
                importance: np.ndarray | None = None, row_chunk: int = 4096) -> BCQWeight:
    """Row-wise BCQ of ``[rows, cols]``: alphas per row and group of ``col_group`` columns.

    For layers without a Hessian (embedding tables, Conv): each group is fitted on its own,
    its error weighted per column by ``importance`` (e.g. the inputs' mean square) if given.
    """
    matrix = np.asarray(matrix, np.float64)
    rows, cols = matrix.shape
    col_group = min(col_group, cols) if col_group > 0 else cols
    n_groups = -(-cols // col_group)
    padded = n_groups * col_group
    column_weight = np.zeros(padded)
    column_weight[:cols] = 1.0 if importance is None else np.maximum(np.asarray(importance, np.float64), 0) + 1e-12
    signs = np.empty((rows, bits, cols), bool)
    codes = np.empty((rows, n_groups, bits, terms), np.int8)
    for first in range(0, rows, row_chunk):
        part = matrix[first : first + row_chunk]
        values = np.zeros((part.shape[0], padded))
        values[:, :cols] = part
        fit = fit_bcq(values.reshape(-1, col_group), bits, terms=terms, rounds=rounds,
                      weights=np.tile(column_weight.reshape(n_groups, col_group), (part.shape[0], 1)))
        chunk_signs = fit.signs.reshape(part.shape[0], padded, bits).transpose(0, 2, 1)
        signs[first : first + row_chunk] = chunk_signs[:, :, :cols]
        codes[first : first + row_chunk] = fit.codes.reshape(part.shape[0], n_groups, bits, terms)
    return from_signs(signs, codes, 1, col_group)


def bcq_gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, *, terms: int = 3, layout: str = "column",
             group_size: int = 128, rounds: int = 5, damp: float = 0.01, act_order: bool = True,
             block_size: int = 128, row_chunk: int = 2048) -> BCQWeight:
    """ShiftAddLLM's multi-objective fit: BCQ inside the GPTQ column walk.

    ``layout="column"``: each input column gets its own alphas per group of ``group_size``
    output rows, fitted on the column after the errors of the columns before it were fed
    forward. ``layout="block"``: 8 consecutive input columns share alphas (the lookup-table
    kernel's layout); they are fitted on the 8 columns when the walk reaches the block
    (each column's error weighted by ``1 / [H^-1]_jj``, its cost in GPTQ's objective), then
    every column of the block gets the nearest codes for them after compensation. With
    ``act_order`` the walk visits columns (blocks) by decreasing input energy.
    """
    weight, hessian = prepare_hessian(weight, hessian)
    rows, cols = weight.shape
    col_group = 8 if layout == "block" else 1
    padded_cols = -(-cols // col_group) * col_group
    if padded_cols != cols:  # zero columns, uncorrelated with the rest, cost nothing
        weight = np.pad(weight, ((0, 0), (0, padded_cols - cols)))
        hessian = np.pad(hessian, ((0, padded_cols - cols), (0, padded_cols - cols)))
        hessian[np.arange(cols, padded_cols), np.arange(cols, padded_cols)] = 1.0
    row_group = min(group_size, rows) if group_size > 0 else rows
    energy = np.diag(hessian).reshape(-1, col_group).sum(1)
    block_order = np.argsort(-energy, kind="stable") if act_order else np.arange(energy.size)
    order = (block_order[:, None] * col_group + np.arange(col_group)).reshape(-1)
    factor = inverse_hessian_factor(hessian[np.ix_(order, order)], damp)
    column_weight = 1.0 / np.square(np.diag(factor))
    column_weight[order >= cols] = 0.0
    signs = np.zeros((rows, bits, padded_cols), bool)
    codes = np.zeros((-(-rows // row_group), padded_cols // col_group, bits, terms), np.int8)
    row_chunk = max(row_group, row_chunk // row_group * row_group)
    for first in range(0, rows, row_chunk):
        last = min(first + row_chunk, rows)
        walker = _ColumnFitter(bits, terms, rounds, row_group, col_group, last - first, column_weight)
        walk_columns(weight[first:last][:, order], factor, walker, block_size)
        signs[first:last][:, :, order] = walker.signs
        codes[first // row_group : -(-last // row_group)][:, block_order] = walker.codes
    return from_signs(signs[:, :, :cols], codes, row_group, col_group)


class _ColumnFitter:
    """The column quantizer of :func:`bcq_gptq` for one chunk of rows (walk order)."""

    def __init__(self, bits, terms, rounds, row_group, col_group, rows, column_weight):
        self.bits, self.terms, self.rounds = bits, terms, rounds
        self.row_group, self.col_group, self.rows = row_group, col_group, rows
        self.groups = -(-rows // row_group)
        self.row_mask = (np.arange(self.groups * row_group) < rows).astype(np.float64).reshape(self.groups, row_group)
        self.column_weight = column_weight
        cols = column_weight.size
        self.signs = np.zeros((rows, bits, cols), bool)
        self.codes = np.zeros((self.groups, cols // col_group, bits, terms), np.int8)
        self.alphas = np.zeros((self.groups, bits))

    def _grouped(self, values: np.ndarray) -> np.ndarray:
        """``[rows, k]`` to ``[groups, row_group * k]`` (zero rows pad the last group)."""
        padded = np.zeros((self.groups * self.row_group, values.shape[1]))
        padded[: self.rows] = values
        return padded.reshape(self.groups, -1)

    def __call__(self, column: int, pending: np.ndarray) -> np.ndarray:
        width = self.col_group
        if column % width == 0:
            weights = self.row_mask[:, :, None] * self.column_weight[None, None, column : column + width]
            fit = fit_bcq(self._grouped(pending[:, :width]), self.bits, terms=self.terms, rounds=self.rounds,
                          weights=weights.reshape(self.groups, -1))
            self.alphas = fit.alphas
            self.codes[:, column // width] = fit.codes
            if width == 1:
                return self._store(column, fit.signs)
        values = self._grouped(pending[:, :1])
        return self._store(column, nearest_codes(values, self.alphas))

    def _store(self, column: int, signs: np.ndarray) -> np.ndarray:
        """Record the codes ``[groups, row_group, bits]`` of ``column``; return its values ``[rows]``."""
        self.signs[:, :, column] = signs.reshape(-1, self.bits)[: self.rows]
        return reconstruct(signs, self.alphas).reshape(-1)[: self.rows]
