"""The pass context: what passes may use besides the model.

Calibration data, the target, an explicit seed, a progress reporter, the executor that
runs per-layer work (:mod:`.executor`), and activation capture with ONNX Runtime
(bounded in memory, cached per model state). No global
state: everything a pass reads comes through here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import ExecutionError
from qcompile.ir import runtime
from qcompile.ir.model import Model

from .calibration import CalibrationSet
from .executor import Executor, SerialExecutor

if TYPE_CHECKING:
    from .base import Pass
    from .sequential import SequentialStatistics

log = logging.getLogger(__name__)


class Progress:
    """Progress over a pass's units of work (layers). The default reports nothing."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int = 1) -> None:
        pass


@dataclass
class PassContext:
    calib: CalibrationSet | None = None
    # Synthetic samples for passes that only *benefit* from activation statistics, used
    # when the user gave no calibration data (passes that need data still refuse to run).
    synthetic_calib: CalibrationSet | None = None
    target: str = "cpu"
    seed: int = 0
    progress: Progress = field(default_factory=Progress)
    executor: Executor = field(default_factory=SerialExecutor)  # per-layer work (see .executor)
    max_capture_bytes: int = 512 * 2**20
    max_capture_rows: int = 4096
    # Drop the rows of padding tokens (attention_mask == 0) from the Hessians X^T X: the
    # model's outputs at those positions are never used, and with short sentences padded
    # to a fixed length they would make up most of every Hessian (MiniLM: 69% of the rows;
    # 3-bit GPTQ 0.9607 -> 0.9677 without them). Captured rows (activation ranges, fold's
    # channel maxima) keep them: measured on MiniLM W6A6 (128 calibration sentences),
    # ranges without padding rows give 0.9317 against 0.9528 with them, and neither an
    # output-weighted range search (0.9219) nor unclipped ranges (0.9122) do better.
    skip_padding: bool = True
    # The model as it entered the pipeline, for passes with ``needs_reference`` (``tune``'s
    # teacher); set by the manager only then. Not a copy: passes never edit it (they work on
    # the manager's copy), so it costs no memory beyond the input model the caller holds.
    reference: Model | None = None
    # The passes after the one running, set by the manager before each pass (empty for a pass
    # run alone): ``bits`` sizes a ``max_mb`` budget by how the pass that follows stores weights.
    later: tuple[Pass, ...] = ()

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator seeded by ``seed`` and ``salt`` (e.g. a layer name): order-independent."""
        digest = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")
        return np.random.default_rng([self.seed, digest])

    def capture(
        self, model: Model, tensor_names: Iterable[str], *, allow_synthetic: bool = False
    ) -> dict[str, np.ndarray]:
        """Values of ``tensor_names`` on the calibration samples, as ``[rows, last_dim]``.

        With ``allow_synthetic``, the synthetic samples stand in for missing calibration
        data (see :attr:`uses_synthetic`). At most ``max_capture_rows`` rows per tensor
        are kept (spread over all samples), and tensors are captured a few at a time so
        that no more than ``max_capture_bytes`` are held at once beyond what is returned.
        """
        return self.statistics(model, rows_of=tensor_names, allow_synthetic=allow_synthetic)[1]

    def gram(
        self, model: Model, tensor_names: Iterable[str], *, allow_synthetic: bool = False
    ) -> dict[str, tuple[np.ndarray, int, np.ndarray]]:
        """Per tensor, ``(X^T X, rows, column sums)`` over every calibration row (no row limit).

        The Hessian of a linear layer's output error (GPTQ), and everything needed for
        that layer's exact output error statistics; float64, ``[dim, dim]``.
        """
        return self.statistics(model, gram_of=tensor_names, allow_synthetic=allow_synthetic)[0]

    def statistics(
        self,
        model: Model,
        *,
        gram_of: Iterable[str] = (),
        rows_of: Iterable[str] = (),
        allow_synthetic: bool = False,
    ) -> tuple[dict[str, tuple[np.ndarray, int, np.ndarray]], dict[str, np.ndarray]]:
        """:meth:`gram` of ``gram_of`` and :meth:`capture` of ``rows_of`` in one calibration run."""
        gram_names, row_names = list(gram_of), list(rows_of)
        grams: dict[str, tuple[np.ndarray, int, np.ndarray]] = {}
        captured: dict[str, np.ndarray] = {}
        for _, parts in self._stream(model, [*gram_names, *row_names], allow_synthetic, set(gram_names)):
            chunk_grams, chunk_rows = self.reduce(parts, gram_names, row_names)
            grams.update(chunk_grams)
            captured.update(chunk_rows)
        return grams, captured

    def sequential(self) -> SequentialStatistics:
        """:meth:`statistics` stage after stage, each stage's on the model as rewritten so far
        (needs calibration data; see :mod:`.sequential`)."""
        from .sequential import SequentialStatistics

        return SequentialStatistics(self)

    def reduce(self, parts: dict[str, list[tuple[np.ndarray, np.ndarray | None]]], gram_of: Iterable[str],
               rows_of: Iterable[str]) -> tuple[dict[str, tuple[np.ndarray, int, np.ndarray]], dict[str, np.ndarray]]:
        """Grams of ``gram_of`` and subsampled rows of ``rows_of`` from per-sample ``(rows, real-token
        rows or None)`` parts (those of the names in ``parts``)."""
        grams = {name: _gram([rows[keep] if keep is not None else rows for rows, keep in parts[name]])
                 for name in gram_of if name in parts}
        captured = {name: self._subsample(np.concatenate([rows for rows, _ in parts[name]], axis=0))
                    for name in rows_of if name in parts}
        return grams, captured

    def _subsample(self, rows: np.ndarray) -> np.ndarray:
        if rows.shape[0] > self.max_capture_rows:
            rows = rows[np.linspace(0, rows.shape[0] - 1, self.max_capture_rows).astype(np.int64)]
        return rows.astype(np.float32, copy=False)

    def _stream(self, model: Model, tensor_names: Iterable[str], allow_synthetic: bool,
                skip_padding_of: AbstractSet[str] = frozenset()):
        """Yield ``(names, {name: [per sample, ([rows, last_dim] array, real-token rows or None)]})``,
        a few tensors at a time; the real-token rows only for ``skip_padding_of`` (None: keep all)."""
        samples = self.calib or (self.synthetic_calib if allow_synthetic else None)
        if samples is None:
            return
        names = list(dict.fromkeys(tensor_names))
        for chunk in self._chunks(names, model, samples.n_samples):
            session = runtime.make_session(model, extra_outputs=chunk)
            collected: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {name: [] for name in chunk}
            for feed in samples.batches(1):
                try:
                    values = session.run(chunk, feed)
                except Exception as exc:  # ORT's own exception types
                    message = runtime.ort_message(exc)
                    if not samples.synthetic:
                        raise ExecutionError(f"ONNX Runtime failed on the calibration data ({samples.source}): "
                                             f"{message}") from None
                    log.warning("no activation statistics: synthetic inputs are not valid for this model (%s)",
                                message)
                    return
                for name, value in zip(chunk, values, strict=True):
                    value = np.asarray(value)
                    rows = value.reshape(-1, value.shape[-1]) if value.ndim else value.reshape(1, 1)
                    keep = token_rows(feed, value) if self.skip_padding and name in skip_padding_of else None
                    collected[name].append((rows, keep))
            yield chunk, collected

    @property
    def uses_synthetic(self) -> bool:
        """True when activation statistics come from synthetic samples."""
        return self.calib is None and self.synthetic_calib is not None

    def _chunks(self, names: list[str], model: Model, n_samples: int) -> list[list[str]]:
        tensors = model.tensors()
        per_sample = {name: _bytes_per_sample(tensors.get(name)) for name in names}
        budget_rows = max(1, n_samples)
        chunks: list[list[str]] = [[]]
        used = 0
        for name in names:
            size = per_sample[name] * budget_rows
            if chunks[-1] and used + size > self.max_capture_bytes:
                chunks.append([])
                used = 0
            chunks[-1].append(name)
            used += size
        return [c for c in chunks if c]


def token_rows(feed: dict[str, np.ndarray], value: np.ndarray) -> np.ndarray | None:
    """Which rows of ``value`` (as ``[-1, last_dim]``) are real tokens, or None to keep all.

    Only for the transformer convention: an ``attention_mask`` input ``[batch, seq]`` of the
    shape of a per-token tensor's leading axes ``[batch, seq, dim]``.
    """
    mask = feed.get("attention_mask")
    if mask is None or value.ndim != 3:
        return None
    mask = np.asarray(mask)
    if mask.ndim != 2 or tuple(value.shape[:2]) != mask.shape:
        return None
    return mask.reshape(-1) != 0


def _gram(parts: list[np.ndarray], chunk_rows: int = 4096) -> tuple[np.ndarray, int, np.ndarray]:
    """``(X^T X, rows, column sums)`` of the row blocks ``parts``, accumulated in float64
    (the sums give the inputs' means, e.g. for bias correction, at no extra calibration run).

    Parts (one per sample, often a few dozen rows) are stacked into blocks of about
    ``chunk_rows`` rows first: one product per sample would add a whole ``dim x dim`` matrix
    per sample, which is memory-bound (7x slower for MiniLM's 1536-wide inputs).
    """
    dim = parts[0].shape[1]
    # the first block's product is kept as it is: for wide inputs (VGG's 25088 columns: 5 GB)
    # a zeroed matrix plus the product would double the peak
    accumulated: np.ndarray | None = None
    sums = np.zeros(dim, np.float64)
    first = 0
    while first < len(parts):
        last, rows = first, 0
        while last < len(parts) and (rows == 0 or rows + parts[last].shape[0] <= chunk_rows):
            rows += parts[last].shape[0]
            last += 1
        block = np.concatenate([p.astype(np.float64, copy=False) for p in parts[first:last]])
        if accumulated is None:
            accumulated = block.T @ block
        else:
            accumulated += block.T @ block
        sums += block.sum(0)
        first = last
    assert accumulated is not None
    return accumulated, sum(p.shape[0] for p in parts), sums


def _bytes_per_sample(tensor: gs.Tensor | None) -> int:
    if tensor is None or not tensor.shape:
        return 1 << 20
    dims = [d if isinstance(d, int) and d > 0 else 128 for d in tensor.shape[1:]]
    return int(np.prod(dims, dtype=np.int64)) * 4
