"""``bits``: mixed-precision bit allocation, a plan that ``quant`` and ``shiftadd`` then follow.

ShiftAddLLM's allocation, with the measured error the project's algorithm notes
recommend: for every layer the later passes would rewrite and every candidate width
``b``, a cost ``C[i, b]``; then the parameter-weighted multiple-choice knapsack
``min sum_i C[i, b_i]`` s.t. ``sum_i n_i b_i <= avg * sum_i n_i`` (or the model's bytes
``<= max_mb``), solved exactly (:mod:`qcompile.passes.knapsack`). Costs (``score``):

* ``output`` (default): the layer-output error of a quick BCQ fit at ``b`` bits (with
  ``outliers`` kept as sparse corrections, as ``shiftadd`` stores them), relative
  to the output's energy, exact over every calibration row from ``X^T X``
  (as ``passes/layers.output_error``); embedding tables: the relative weight error (their
  output is the rows themselves);
* ``paper``: ShiftAddLLM's ``||IS||_F * std(IS)^2`` with ``IS = W / diag(chol(H^-1))``
  (column-wise), times ``4^-b`` (the noise power of ``b`` bits relative to 0 bits).

``avg`` counts the planes' bits only. ``max_mb`` is a budget for the whole model's weights:
every planned layer as the pass that follows stores it (``shiftadd``: packed planes, alpha
terms, outlier corrections; ``quant``: codes, scales, zero points; with neither after it,
``shiftadd``'s defaults with this pass's ``outliers``), computed from the shapes by that
pass's ``stored_bytes``, plus every other initializer as it is now.

Plan/apply: the plan (JSON) goes to the model's metadata ``qcompile.bits_plan``
(:mod:`qcompile.passes.plan`) and to the pass stats (so to the manifest); ``plan=FILE``
applies a saved or hand-edited plan instead of measuring. The pass does not change any
weight (``changed`` is False); ``shiftadd`` / ``quant`` read the plan.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import UsageError
from qcompile.ir.model import Model, constant_nbytes

from . import knapsack
from .base import Pass, PassResult, option
from .bcqfit import bcq_rowwise
from .context import PassContext
from .gptq import inverse_hessian_factor, prepare_hessian
from .layers import content_key, layer_matrix, select_layers, weight_of
from .plan import check_plan, read_plan, write_plan
from .shiftadd import ShiftAdd, layer_kind

log = logging.getLogger(__name__)

SAMPLED_TABLE_ROWS = 4096  # rows of an embedding table fitted to estimate its error


@dataclass(frozen=True)
class Bits(Pass):
    """Per-layer bit widths by an exact knapsack over measured sensitivities (ShiftAddLLM)."""

    name: ClassVar[str] = "bits"
    summary: ClassVar[str] = "mixed-precision plan: per-layer bits by an exact knapsack over measured errors"

    avg: float = option(0.0, "parameter-weighted average bits budget (0 = none)", min=0.0, max=8.0)
    max_mb: float = option(0.0, "budget for the model's weights in MB of 10^6: the planned layers as the next "
                           "shiftadd/quant stores them (codes, alphas or scales, corrections) plus every other "
                           "weight (0 = none)", min=0.0)
    candidates: tuple[str, ...] = option(("2", "3", "4"), "bit widths to choose from, separated by |")
    score: str = option("output", "output = measured layer-output error of a quick BCQ fit; paper = "
                        "ShiftAddLLM's ||IS||_F*std(IS)^2 x 4^-bits", choices=("output", "paper"))
    group_size: int = option(128, "quick fit: columns per alpha", choices=(32, 64, 128))
    outliers: float = option(0.015, "fraction of each row the later shiftadd keeps as sparse corrections (its "
                             "outliers; 0 = none): in the quick fit (and in max_mb when no shiftadd follows)",
                             min=0.0, max=0.25)
    plan: str = option("", "apply this JSON plan file instead of measuring (e.g. one saved from an earlier run)")
    embeddings: bool = option(True, "plan Gather embedding tables too")
    skip: tuple[str, ...] = option((), "node-name glob patterns left out of the plan, separated by |")
    min_size: int = option(1024, "layers with fewer weights are left out", min=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            widths = [int(c) for c in self.candidates]
        except ValueError:
            raise UsageError(f"bits: candidates={'|'.join(self.candidates)} must be integers") from None
        if not widths or any(not 1 <= b <= 8 for b in widths):
            raise UsageError("bits: candidates must be bit widths in 1..8")
        if not self.plan and not self.avg and not self.max_mb:
            raise UsageError("bits: give a budget (avg=BITS or max_mb=MB) or plan=FILE")
        if self.avg and self.max_mb:
            raise UsageError("bits: give one budget, avg=BITS or max_mb=MB, not both")
        if self.avg and (self.avg < min(widths) or self.avg > max(widths)):
            raise UsageError(f"bits: avg={self.avg} is outside the candidates {min(widths)}..{max(widths)}")

    @property
    def widths(self) -> list[int]:
        return sorted({int(c) for c in self.candidates})

    def needs_calibration(self) -> str | None:
        return None if self.plan else "pass bits needs calibration data (layer Hessians)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        previous = read_plan(model)
        plan = self._load(model) if self.plan else self._measure(model, ctx)
        write_plan(model, plan)
        # the plan lives in metadata: no node changes, so later passes see the same graph
        return PassResult(previous != plan, {"plan": plan, "average_bits": plan.get("average_bits")})

    # -- plan from a file ----------------------------------------------------------------

    def _load(self, model: Model) -> dict[str, Any]:
        path = Path(self.plan)
        try:
            plan = json.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"bits: plan={self.plan}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"bits: plan={self.plan}: not valid JSON ({exc})") from None
        check_plan(plan, f"bits: plan={self.plan}")
        names = {node.name for node in model.graph.nodes}
        unknown = sorted(set(plan["layers"]) - names)
        if unknown:
            raise UsageError(f"bits: plan={self.plan} names layers the model does not have: {', '.join(unknown[:5])}")
        return {**plan, "source": str(path)}

    # -- plan from measurements ----------------------------------------------------------

    def _select(self, model: Model) -> tuple[list[gs.Node], dict[str, str]]:
        return select_layers(model, skip=self.skip, embeddings=self.embeddings, min_size=self.min_size,
                             ignore=lambda node: node.op == "Conv")

    def _measure(self, model: Model, ctx: PassContext) -> dict[str, Any]:
        if ctx.calib is None:
            raise UsageError("pass bits needs calibration data: add --calib FILE")
        nodes, skipped = self._select(model)
        grams = ctx.gram(model, [n.inputs[0].name for n in nodes if n.op in ("MatMul", "Gemm")])
        ctx.progress.start(f"{self.name}: layers", len(nodes))
        costs: dict[str, dict[int, float]] = {}
        shapes: dict[str, tuple[int, int]] = {}
        # layers holding the same values (a tied embedding and LM head) are stored once: one
        # choice for all of them, its weights counted once (on the first), its costs summed
        first_of: dict[str, str] = {}
        owner_of: dict[str, str] = {}
        members: dict[str, list[gs.Node]] = {}
        for node in nodes:
            matrix, _, _ = layer_matrix(node)
            gram_rows = grams.get(node.inputs[0].name)
            gram = gram_rows[0] if gram_rows is not None and gram_rows[0].shape[0] == matrix.shape[1] else None
            owner = owner_of[node.name] = first_of.setdefault(content_key(matrix), node.name)
            members.setdefault(owner, []).append(node)
            layer_costs = self._costs(node.name, matrix, gram, ctx)
            if owner == node.name:
                costs[node.name], shapes[node.name] = layer_costs, matrix.shape
            else:
                costs[owner] = {b: costs[owner][b] + layer_costs[b] for b in layer_costs}
            ctx.progress.advance()
        names = list(costs)
        widths = self.widths
        params = {n: shapes[n][0] * shapes[n][1] for n in names}
        storage = self._storage(ctx)
        stored = {n: [storage.stored_bytes(layer_kind(members[n]), *shapes[n], b) for b in widths] for n in names}
        # every initializer the plan does not cover stays as it is
        planned = {weight.name: weight for weight in map(weight_of, nodes) if weight is not None}
        rest = model.constant_bytes() - sum(map(constant_nbytes, planned.values()))
        if self.max_mb:
            sizes, budget = [stored[n] for n in names], int(self.max_mb * 1e6) - rest
        else:
            sizes = [[params[n] * b for b in widths] for n in names]
            budget = int(np.floor(self.avg * sum(params.values()) + 1e-6))
        solution = knapsack.solve([[costs[n][b] for b in widths] for n in names], sizes, budget)
        if solution is None:
            raise UsageError(f"bits: no plan fits the budget ({self._budget_text()}) even at {widths[0]} bits"
                             + (f" (the weights left out of the plan alone take {rest / 1e6:.3f} MB)"
                                if self.max_mb else ""))
        choice, exact = solution
        layers = {name: widths[index] for name, index in zip(names, choice, strict=True)}
        model_bytes = rest + sum(stored[n][index] for n, index in zip(names, choice, strict=True))
        shared = {name: owner for name, owner in owner_of.items() if owner != name}
        for name, owner in shared.items():
            layers[name], params[name], costs[name] = layers[owner], 0, dict.fromkeys(widths, 0.0)
        layers = {node.name: layers[node.name] for node in nodes}
        total = sum(params.values())
        return {
            "budget": {"avg": self.avg} if self.avg else {"max_mb": self.max_mb},
            "candidates": widths,
            "score": self.score,
            "exact": exact,
            "average_bits": round(sum(params[n] * layers[n] for n in names) / total, 4) if total else None,
            "model_mb": round(model_bytes / 1e6, 6),
            "stored_as": storage.name,
            "layers": layers,
            "costs": {n: {str(b): float(f"{costs[n][b]:.6g}") for b in widths} for n in names},
            "params": params,
            "shared": shared,
            "skipped": skipped,
        }

    def _storage(self, ctx: PassContext) -> Any:
        """The pass whose storage ``max_mb`` counts: the first ``shiftadd`` or ``quant`` after this one,
        else ``shiftadd`` with its defaults and this pass's ``outliers``."""
        return next((p for p in ctx.later if p.name in ("shiftadd", "quant")), None) or ShiftAdd(outliers=self.outliers)

    def _budget_text(self) -> str:
        return f"avg={self.avg}" if self.avg else f"max_mb={self.max_mb}"

    def _costs(self, name: str, matrix: np.ndarray, gram: np.ndarray | None, ctx: PassContext) -> dict[int, float]:
        if self.score == "paper":
            return self._paper_costs(matrix, gram)
        if gram is None and matrix.shape[0] > SAMPLED_TABLE_ROWS:  # rows are fitted independently: sample
            rows = np.sort(ctx.rng(name).choice(matrix.shape[0], SAMPLED_TABLE_ROWS, replace=False))
            matrix = matrix[rows]
        costs = {}
        importance = np.diag(gram) if gram is not None else None
        for bits in self.widths:
            recon = bcq_rowwise(matrix, bits, col_group=self.group_size, rounds=1, importance=importance,
                                outliers=self.outliers, outlier_terms=2).dequantize()
            costs[bits] = relative_output_error(matrix, recon, gram)
        return costs

    def _paper_costs(self, matrix: np.ndarray, gram: np.ndarray | None) -> dict[int, float]:
        if gram is None:
            scaled = matrix.astype(np.float64)
        else:
            weight, hessian = prepare_hessian(matrix, gram)
            scaled = weight / np.diag(inverse_hessian_factor(hessian, 0.01))[None, :]
        score = float(np.linalg.norm(scaled) * np.var(scaled))
        return {bits: score * 4.0 ** -bits for bits in self.widths}


def relative_output_error(weight: np.ndarray, recon: np.ndarray, gram: np.ndarray | None) -> float:
    """``||X (W - Q)^T||^2 / ||X W^T||^2`` over the calibration rows (from ``X^T X``); the
    relative weight error without ``gram``. What ``passes/layers.output_error`` reports as SQNR."""
    delta = np.asarray(recon, np.float64) - weight
    if gram is None:
        return float(np.square(delta).sum() / max(float(np.square(weight).sum()), 1e-300))
    noise = float(((delta @ gram) * delta).sum())
    signal = float(((weight.astype(np.float64) @ gram) * weight).sum())
    return noise / max(signal, 1e-300)
