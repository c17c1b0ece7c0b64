"""``prune``: set weights to zero (unstructured or N:M), by magnitude, Wanda or SparseGPT.

Every layer with a constant weight (MatMul, Gemm, Conv; embeddings only with
``embeddings=true``) is seen as ``W`` ``[rows, cols]`` with the reduction axis last,
and a fraction of it is set to exactly zero:

* ``method=magnitude``: drop the smallest ``|W_ij|``;
* ``method=wanda`` (Sun et al., "A Simple and Effective Pruning Approach for Large
  Language Models", 2024): drop the smallest ``|W_ij| * ||X_j||_2``, the input norm per
  channel taken over every calibration row (``sqrt(diag(X^T X))``); Conv layers, whose
  per-channel input norms are not collected, fall back to magnitude (stats say so);
* ``method=sparsegpt`` (Frantar & Alistarh, 2023): OBS saliency ``W_ij^2 / U_jj^2``
  chosen block by block, with error compensation (implies ``update``).

``sparsity`` is the fraction pruned, compared within each output row (``scope=row``, as
Wanda does: every row keeps the same count) or over the whole layer; ``pattern=N:M``
instead keeps the ``N`` best of every ``M`` consecutive weights along the reduction axis
(2:4 for sparse tensor cores). ``update=true`` (MatMul/Gemm with calibration data) walks
the columns SparseGPT's way: the mask of each 128-column block is chosen on the weights as
updated so far, and the remaining weights absorb the error (:mod:`qcompile.passes.obs`).

Global decision: :meth:`Prune.plan` gives each layer its sparsity or pattern (uniform;
or ``allocate=sensitivity``: from the measured output error of candidate sparsities, a
greedy allocation whose parameter-weighted mean meets ``sparsity``), then per-layer
``layers`` overrides; :meth:`Prune.apply` prunes (with ``sequential``, in stages of layers
that do not feed each other, each stage's statistics taken on the model pruned so far, as
the reference implementations do). The pruned model stays float (a later
``quant`` stores pruned layers sparse). Lossy; stats report per layer the sparsity and
the output SQNR/cosine over the calibration rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, NamedTuple, cast

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import UsageError
from qcompile.ir.model import Model

from .base import Pass, PassResult, matches_any, option
from .context import PassContext
from .layers import as_rows, correct_bias, output_error, select_layers, weight_of
from .obs import obs_prune
from .pruning import keep_mask, parse_pattern, wanda_scores
from .sequential import SequentialStatistics, layer_stages

log = logging.getLogger(__name__)

CANDIDATE_STEPS = tuple(round(0.05 * k, 2) for k in range(-5, 6))  # sensitivity plan: candidates around the target
MAX_SPARSITY = 0.95


@dataclass(frozen=True)
class Prune(Pass):
    """Weight pruning (magnitude, Wanda, SparseGPT), unstructured or N:M; keeps the model float."""

    name: ClassVar[str] = "prune"
    summary: ClassVar[str] = "weight pruning: magnitude, Wanda or SparseGPT; unstructured or N:M (2:4)"

    method: str = option("magnitude", "magnitude = smallest |w|; wanda = smallest |w|*||x|| (needs --calib); "
                         "sparsegpt = OBS saliency with error compensation (needs --calib)",
                         choices=("magnitude", "wanda", "sparsegpt"))
    sparsity: float = option(0.5, "fraction of each layer's weights set to zero (unstructured)", min=0.0,
                             max=MAX_SPARSITY)
    pattern: str = option("", "N:M semi-structured sparsity along the reduction axis, e.g. 2:4 (replaces sparsity)")
    scope: str = option("row", "unstructured: compare weights within each output row or over the whole layer",
                        choices=("row", "layer"))
    update: bool = option(False, "SparseGPT error compensation of the remaining weights (MatMul/Gemm; needs --calib)")
    allocate: str = option("uniform", "uniform = every layer at sparsity; sensitivity = per-layer sparsities from "
                           "measured output error, parameter-weighted mean = sparsity (needs --calib)",
                           choices=("uniform", "sensitivity"))
    layers: tuple[str, ...] = option((), "per-layer overrides glob=value (a fraction, N:M, or 0 = dense), separated by |")
    embeddings: bool = option(False, "prune Gather embedding tables too (by magnitude within each row)")
    damp: float = option(0.01, "update: Hessian damping, as a fraction of its mean diagonal", min=0.0, max=1.0)
    sequential: bool = option(False, "with --calib: prune in stages, each stage's input statistics taken on the "
                              "model pruned so far (one calibration run per stage: slower)")
    bias_correction: bool = option(False, "with --calib: add each layer's mean output error (W - W')E[x] to its "
                                   "bias (MatMul + Add, Gemm)")
    block_size: int = option(128, "update: columns per block (a multiple of M for N:M)", min=8, max=4096)
    skip: tuple[str, ...] = option((), "node-name glob patterns left dense, separated by |")
    min_size: int = option(1024, "layers with fewer weights stay dense", min=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern:
            parse_pattern(self.pattern, f"{self.name}: pattern")
        for item in self.layers:
            glob, eq, value = item.rpartition("=")
            if not eq or not glob:
                raise UsageError(f"{self.name}: layers item {item!r} should look like glob=0.6 or glob=2:4")
            _target(value, f"{self.name}: layers {item!r}")
        if self.allocate == "sensitivity" and self.pattern:
            raise UsageError(f"{self.name}: allocate=sensitivity plans unstructured sparsity; drop pattern")

    @property
    def compensates(self) -> bool:
        return self.update or self.method == "sparsegpt"

    def needs_calibration(self) -> str | None:
        if self.method != "magnitude":
            return f"prune(method={self.method}) needs calibration data"
        if self.update:
            return "prune(update=true) needs calibration data (the layer Hessians)"
        if self.allocate == "sensitivity":
            return "prune(allocate=sensitivity) needs calibration data (measured output errors)"
        return None

    # -- the pass ----------------------------------------------------------------------

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        reason = self.needs_calibration()
        if reason and ctx.calib is None:
            raise UsageError(f"{reason}: add --calib FILE")
        candidates, skipped = self._select(model)
        first_grams = self._grams(model, candidates, ctx)[0] if self.allocate == "sensitivity" else {}
        plan = self.plan(candidates, first_grams)
        changed, layers = self.apply(model, candidates, plan, ctx)
        total = sum(s["params"] for s in layers.values())
        zeros = sum(s["params"] * s["sparsity"] for s in layers.values())
        stats = {"layers": layers, "skipped": skipped, "plan": plan, "pruned": len(layers),
                 "sparsity": round(zeros / total, 4) if total else 0.0,
                 "activation_statistics": "calibration" if ctx.calib is not None else "none",
                 "sequential": self._sequential(ctx)}
        return PassResult(changed, stats)

    def _sequential(self, ctx: PassContext) -> bool:
        return self.sequential and ctx.calib is not None

    @staticmethod
    def _grams(model: Model, nodes: list[gs.Node], source: PassContext | SequentialStatistics
               ) -> tuple[dict[str, np.ndarray | None], dict[str, np.ndarray]]:
        """Per layer, ``X^T X`` of its input over the calibration rows (None: Conv, Gather, no data);
        per linear input tensor, its channel means over the same rows."""
        linear = [n.inputs[0].name for n in nodes if n.op in ("MatMul", "Gemm")]
        grams, _ = source.statistics(model, gram_of=linear) if linear else ({}, {})
        means = {name: sums / max(rows, 1) for name, (_, rows, sums) in grams.items()}
        return {n.name: _gram_for(n, grams) for n in nodes}, means

    def _select(self, model: Model) -> tuple[list[gs.Node], dict[str, str]]:
        return select_layers(model, skip=self.skip, embeddings=self.embeddings, min_size=self.min_size)

    # -- plan --------------------------------------------------------------------------

    def plan(self, nodes: list[gs.Node], grams: dict[str, np.ndarray | None]) -> dict[str, dict[str, Any]]:
        """Per layer ``{"sparsity": s}`` or ``{"pattern": "N:M"}``, and where it came from."""
        default: dict[str, Any] = {"pattern": self.pattern} if self.pattern else {"sparsity": self.sparsity}
        plan = {n.name: {**default, "source": "uniform"} for n in nodes}
        if self.allocate == "sensitivity":
            plan.update(self._sensitivity_plan(nodes, grams))
        for node in nodes:
            for item in self.layers:
                glob, _, value = item.rpartition("=")
                if matches_any(node.name, (glob,)):
                    plan[node.name] = {**_target(value, item), "source": f"layers {item}"}
        return plan

    def _sensitivity_plan(self, nodes: list[gs.Node], grams: dict[str, np.ndarray | None]) -> dict[str, dict]:
        """Greedy: start every layer at its lowest candidate and raise, one step at a time, the layer
        whose next step adds the least relative output error per weight pruned, until the
        parameter-weighted mean sparsity reaches the target."""
        candidates = sorted({min(max(self.sparsity + step, 0.0), MAX_SPARSITY) for step in CANDIDATE_STEPS})
        costs: dict[str, list[float]] = {}
        sizes: dict[str, int] = {}
        for node in nodes:
            matrix = _rows(node)
            sizes[node.name] = matrix.size
            scores = self._scores(node, matrix, grams[node.name])
            costs[node.name] = [_relative_error(matrix, matrix * keep_mask(scores, sparsity=s, scope=self.scope),
                                                grams[node.name]) for s in candidates]
        level = dict.fromkeys(costs, 0)
        total = sum(sizes.values())
        pruned = sum(sizes[name] * candidates[0] for name in costs)
        while total and pruned < self.sparsity * total - 0.5:
            steps = [((costs[n][level[n] + 1] - costs[n][level[n]]) / (sizes[n] * (candidates[level[n] + 1]
                                                                                 - candidates[level[n]])), n)
                     for n in costs if level[n] + 1 < len(candidates)]
            if not steps:
                break
            _, name = min(steps)
            pruned += sizes[name] * (candidates[level[name] + 1] - candidates[level[name]])
            level[name] += 1
        while True:  # the last step may overshoot: undo the steps that are not needed, costliest first
            undo = [(costs[n][level[n] - 1] - costs[n][level[n]], n) for n in costs if level[n] > 0
                    and pruned - sizes[n] * (candidates[level[n]] - candidates[level[n] - 1]) >= self.sparsity * total - 0.5]
            if not undo:
                break
            _, name = min(undo)
            pruned -= sizes[name] * (candidates[level[name]] - candidates[level[name] - 1])
            level[name] -= 1
        return {name: {"sparsity": round(candidates[level[name]], 4), "source": "sensitivity",
                       "relative_error": round(costs[name][level[name]], 6)} for name in costs}

    # -- apply -------------------------------------------------------------------------

    def apply(self, model: Model, nodes: list[gs.Node], plan: dict[str, dict[str, Any]],
              ctx: PassContext) -> tuple[bool, dict[str, dict]]:
        """Prune every layer of ``nodes`` as ``plan`` says; returns (changed, per-layer stats).

        Sequentially (with calibration data and ``sequential``): in stages of layers that do not
        feed each other, each stage's input statistics taken on the model pruned so far, so every
        layer compensates for what was pruned before it (as Wanda's and SparseGPT's code do).
        """
        ctx.progress.start(f"{self.name}: layers", len(nodes))
        done: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        pruned_names = {n.name for n in nodes}
        changed = False
        layers = {}
        stages = layer_stages(model, nodes) if self._sequential(ctx) else [nodes]
        source = ctx.sequential() if self._sequential(ctx) else ctx
        for stage in stages:
            grams, input_means = self._grams(model, stage, source)
            keys = {node.name: (node.inputs[1 if node.op != "Gather" else 0].name,
                                f"{node.op}{node.attrs.get('transB', '')}") for node in stage}
            todo: dict[tuple[str, str], gs.Node] = {}  # a weight read by several layers of one kind is pruned once
            for node in stage:
                if keys[node.name] not in done:
                    todo.setdefault(keys[node.name], node)
            matrices = {key: _rows(node) for key, node in todo.items()}
            pruned_matrices = ctx.executor.map(partial(_prune_item, self), (
                (node.op, matrices[key], plan[node.name], grams[node.name]) for key, node in todo.items()))
            done.update({key: (matrices[key], result) for key, result in zip(todo, pruned_matrices, strict=True)})
            means = input_means if self.bias_correction and ctx.calib is not None else {}
            for node in stage:
                target = plan[node.name]
                matrix, pruned = done[keys[node.name]]
                changed |= _write_back(node, pruned, pruned_names)
                layers[node.name] = self._layer_stats(node, matrix, pruned, target, grams[node.name])
                if node.inputs[0].name in means:
                    shift = correct_bias(model, node, matrix, pruned, means[node.inputs[0].name])
                    layers[node.name]["bias_shift"] = round(shift, 6) if shift is not None else "no constant bias"
                ctx.progress.advance()
        if changed:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        return changed, layers

    def _criterion(self, node: gs.Node, gram: np.ndarray | None) -> str:
        if self.method == "sparsegpt" and gram is None:
            return "magnitude"
        if self.method == "wanda" and (gram is None or node.op == "Gather"):
            return "magnitude"
        return self.method

    def _scores(self, node: gs.Node, matrix: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
        if self._criterion(node, gram) == "wanda":
            assert gram is not None
            return wanda_scores(matrix, gram)
        return np.abs(matrix)

    def _prune(self, node: gs.Node, matrix: np.ndarray, target: dict, gram: np.ndarray | None) -> np.ndarray:
        n_m = parse_pattern(target["pattern"], "pattern") if target.get("pattern") else None
        sparsity = float(target.get("sparsity", 0.0))
        if n_m is None and sparsity <= 0:
            return matrix
        if not (self.compensates and gram is not None):
            scores = self._scores(node, matrix, gram)
            return matrix * keep_mask(scores, sparsity=sparsity, pattern=n_m, scope=self.scope)
        block = self.block_size if n_m is None else max(n_m[1], self.block_size // n_m[1] * n_m[1])
        criterion = self._criterion(node, gram)
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))

        def block_mask(values: np.ndarray, begin: int, factor_diag: np.ndarray) -> np.ndarray:
            if criterion == "sparsegpt":
                scores = np.square(values) / np.square(factor_diag)[None, :]
            elif criterion == "wanda":
                scores = np.abs(values) * norms[None, begin : begin + values.shape[1]]
            else:
                scores = np.abs(values)
            count = _block_count(sparsity, begin, values.shape[1], matrix.shape[1])
            return keep_mask(scores, count=count, pattern=n_m, scope=self.scope)

        pruned = obs_prune(matrix, gram, block_mask, damp=self.damp, block_size=block)
        return pruned.astype(np.float32)

    def _layer_stats(self, node: gs.Node, matrix: np.ndarray, pruned: np.ndarray, target: dict,
                     gram: np.ndarray | None) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "op": node.op,
            "shape": list(matrix.shape),
            "params": int(matrix.size),
            "target": target.get("pattern") or target.get("sparsity"),
            "sparsity": round(float(np.count_nonzero(pruned == 0) / pruned.size), 4),
            "criterion": self._criterion(node, gram),
            "update": bool(self.compensates and gram is not None),
        }
        if gram is not None:
            stats.update(output_error(matrix.astype(np.float64), pruned.astype(np.float64), gram))
        return stats


class _LayerKind(NamedTuple):
    """What :meth:`Prune._prune` reads of a layer (its op type): a picklable stand-in for the node."""

    op: str


def _prune_item(prune: Prune, item: tuple[str, np.ndarray, dict, np.ndarray | None]) -> np.ndarray:
    """One work item of :meth:`Prune.apply` (module level: executors pickle it)."""
    op, matrix, target, gram = item
    return prune._prune(cast(gs.Node, _LayerKind(op)), matrix, target, gram)


def _target(value: str, where: str) -> dict[str, Any]:
    """``"0.6"`` -> ``{"sparsity": 0.6}``; ``"2:4"`` -> ``{"pattern": "2:4"}``."""
    value = value.strip()
    if ":" in value:
        parse_pattern(value, where)
        return {"pattern": value}
    try:
        fraction = float(value)
    except ValueError:
        raise UsageError(f"{where}: {value!r} is neither a fraction nor N:M") from None
    if not 0.0 <= fraction <= MAX_SPARSITY:
        raise UsageError(f"{where}: sparsity {fraction} is out of range: expected in [0, {MAX_SPARSITY}]")
    return {"sparsity": fraction}


def _rows(node: gs.Node) -> np.ndarray:
    weight = weight_of(node)
    assert weight is not None
    return as_rows(node, np.asarray(weight.values, np.float32))


def _gram_for(node: gs.Node, grams: dict[str, tuple[np.ndarray, int, np.ndarray]]) -> np.ndarray | None:
    entry = grams.get(node.inputs[0].name) if node.op in ("MatMul", "Gemm") else None
    if entry is None:
        return None
    cols = _rows(node).shape[1]
    return entry[0] if entry[0].shape[0] == cols else None


def _block_count(sparsity: float, begin: int, width: int, cols: int) -> int:
    """Weights to prune per row in columns ``begin:begin+width``: cumulative rounding, so the
    blocks add up to exactly ``round(sparsity * cols)`` per row."""
    end = begin + width
    return int(math.floor(sparsity * min(end, cols) + 0.5) - math.floor(sparsity * begin + 0.5))


def _relative_error(matrix: np.ndarray, pruned: np.ndarray, gram: np.ndarray | None) -> float:
    """Output error energy over output energy (weight error when there is no Hessian)."""
    if gram is None:
        return float(np.square(matrix - pruned).sum() / max(np.square(matrix).sum(), 1e-30))
    sqnr = output_error(matrix.astype(np.float64), pruned.astype(np.float64), gram)["output_sqnr_db"]
    return 0.0 if math.isinf(sqnr) else 10 ** (-sqnr / 10)


def _write_back(node: gs.Node, pruned: np.ndarray, pruned_nodes: set[str]) -> bool:
    """Store the pruned ``[rows, cols]`` matrix as the node's weight; True if it changed.

    The initializer is updated in place when every reader is being pruned the same way,
    else the node gets its own copy (a tied embedding left dense keeps its values).
    """
    weight = weight_of(node)
    assert weight is not None
    original = np.asarray(weight.values)
    values = _from_rows(node, pruned, original.shape).astype(original.dtype)
    if np.array_equal(values, original):
        return False
    readers = [n for n in weight.outputs if n is not node]
    position = 0 if node.op == "Gather" else 1
    if all(n.name in pruned_nodes and n.op == node.op for n in readers):
        weight.values = values
    else:
        node.inputs[position] = gs.Constant(f"{weight.name}.pruned", values)
    return True


def _from_rows(node: gs.Node, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        return np.ascontiguousarray(matrix.T)
    return matrix.reshape(shape)
