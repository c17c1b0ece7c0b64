"""Which weights a pruning criterion keeps: vectorised masks shared by ``prune`` and its plan."""

from __future__ import annotations

import numpy as np

from qcompile.errors import UsageError


def parse_pattern(text: str, where: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M consecutive weights (0 < N < M <= 64)."""
    n_text, colon, m_text = text.strip().partition(":")
    try:
        n, m = int(n_text), int(m_text)
    except ValueError:
        n, m = 0, 0
    if not colon or not 0 < n < m <= 64:
        raise UsageError(f"{where}={text!r} is not valid: expected N:M with 0 < N < M <= 64, e.g. 2:4")
    return n, m


def wanda_scores(matrix: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Wanda's ``|W_ij| * ||X_j||_2``, the input norm per channel from ``X^T X``."""
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    return np.abs(matrix) * norms[None, :].astype(np.float32)


def keep_mask(scores: np.ndarray, *, sparsity: float = 0.0, count: int | None = None,
              pattern: tuple[int, int] | None = None, scope: str = "row") -> np.ndarray:
    """True where a weight is kept, dropping the lowest ``scores`` ``[rows, cols]``.

    ``pattern=(n, m)``: the ``n`` best of every ``m`` consecutive columns (a shorter last
    run keeps at most ``n``). Otherwise ``count`` weights per row (``round(sparsity * cols)``
    when not given) are dropped: the lowest of each row (``scope="row"``), or the lowest
    ``count * rows`` of the whole matrix (``scope="layer"``).
    """
    rows, cols = scores.shape
    if pattern is not None:
        n, m = pattern
        padded = np.full((rows, -(-cols // m) * m), -np.inf, np.float64)
        padded[:, :cols] = scores
        groups = padded.reshape(rows, -1, m)
        keep = np.zeros(groups.shape, bool)
        np.put_along_axis(keep, np.argsort(-groups, axis=-1, kind="stable")[..., :n], True, axis=-1)
        return keep.reshape(rows, -1)[:, :cols]
    drop = int(round(sparsity * cols)) if count is None else int(count)
    keep = np.ones((rows, cols), bool)
    if drop <= 0:
        return keep
    if scope == "layer":
        flat = np.argpartition(scores.reshape(-1), min(drop * rows, scores.size) - 1)[: drop * rows]
        keep.reshape(-1)[flat] = False
        return keep
    drop = min(drop, cols)
    np.put_along_axis(keep, np.argpartition(scores, drop - 1, axis=1)[:, :drop], False, axis=1)
    return keep
