"""``shiftadd``: multiplication-less weights (ShiftAddLLM) in the ``bcq`` format.

You et al., "ShiftAddLLM: Accelerating Pretrained LLMs via Post-Training
Multiplication-Less Reparameterization" (NeurIPS 2024). Every weight becomes ``bits``
binary planes and alphas that are sums of at most ``apot_terms`` powers of two
(:mod:`qcompile.ir.bcq`), so ``W x`` is table look-ups, shifts and adds
(:mod:`qcompile.ir.lut`).

* MatMul / Gemm: BCQ fitted inside the GPTQ column walk (:func:`bcq_gptq`): each column
  (``layout=column``) or block of 8 columns (``layout=block``) is fitted after the errors of
  the columns before it were fed forward, alphas shared by ``group_size`` output rows.
  This is the paper's weight + output-activation objective.
  ``layout=row``: alphas per output row and ``table_group`` consecutive input columns
  instead (ShiftAddLLM's per-channel groups), each group fitted when the walk reaches it.
* Gather embedding tables and Conv: row-wise BCQ (alphas per row and ``table_group``
  columns), the only layout ``QGather`` can index. A table tied to an LM head (the same
  values in both) is fitted once, row-wise, inside the GPTQ walk on the head's Hessian, and
  both layers read the same bytes (SmolLM2: 28 M of its 134.5 M weights).

* Outliers (``outliers``, a fraction of each row; dense-and-sparse as in SqueezeLLM): the
  most salient weights are kept out of their group's fit and stored as sparse corrections
  that are themselves sums of ``outlier_terms`` powers of two (format ``bcq_outliers``,
  :mod:`qcompile.ir.bcq_outliers`), so the model stays multiplication-free.

Per-layer bits come from a ``bits`` plan when one precedes (:mod:`qcompile.passes.plan`).
Lossy; stats report per layer the weight SQNR and the exact output SQNR and cosine over
every calibration row. Needs calibration data (the layer Hessians ``X^T X``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import UsageError
from qcompile.ir import qops
from qcompile.ir.bcq import BCQWeight
from qcompile.ir.bcq_outliers import BCQOutlierWeight, column_dtype
from qcompile.ir.model import Model

from .base import Pass, PassResult, option
from .bcqfit import bcq_gptq, bcq_rowwise, outliers_per_row
from .context import PassContext
from .layers import content_key, layer_matrix, layer_stats, rewrite, select_layers, table_keys
from .plan import planned_bits, read_plan
from .sequential import layer_stages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShiftAdd(Pass):
    """Binary-coding quantization with power-of-two alphas (format ``bcq``), fitted inside GPTQ."""

    name: ClassVar[str] = "shiftadd"
    summary: ClassVar[str] = "multiplication-less weights: binary planes x power-of-two alphas (ShiftAddLLM)"
    requires_calibration: ClassVar[bool] = True

    bits: int = option(3, "binary planes per weight (bits); a preceding bits plan overrides it per layer",
                       min=1, max=4)
    apot_terms: int = option(3, "powers of two per alpha", min=1, max=4)
    layout: str = option("column", "column = alphas per input column (most accurate); block = 8 consecutive "
                         "input columns share them (the lookup-table kernel's layout); row = alphas per output "
                         "row and table_group input columns (ShiftAddLLM's per-channel groups)",
                         choices=("column", "block", "row"))
    group_size: int = option(128, "MatMul/Gemm: output rows sharing one alpha (0 = all rows)", min=0)
    table_group: int = option(128, "embedding tables, Conv and layout=row: columns sharing one alpha (row-wise layout)",
                              choices=(8, 16, 32, 64, 128, 256))
    rounds: int = option(5, "alternating least-squares rounds per group (alphas, APoT rounding, codes)",
                         min=0, max=200)
    outliers: float = option(0.015, "fraction of each row's weights kept out of the BCQ fit and stored as sparse "
                             "power-of-two corrections (format bcq_outliers; 0 = plain bcq)", min=0.0, max=0.25)
    outlier_terms: int = option(2, "powers of two per outlier correction", min=1, max=4)
    sequential: bool = option(False, "fit in stages of layers that do not feed each other, each stage calibrated "
                              "on the model fitted so far (GPTQ's sequential mode)")
    damp: float = option(0.01, "Hessian damping, as a fraction of its mean diagonal", min=0.0, max=1.0)
    act_order: bool = option(True, "walk the columns (blocks) with the largest input energy first")
    embeddings: bool = option(True, "quantize Gather embedding tables too")
    embedding_bits: int = option(-1, "planes of embedding tables and of an LM head tied to one; 0 = bits; -1 = auto "
                                 "(4 for a table tied to an LM head when bits < 4, else bits): every logit reads "
                                 "it, and small LMs lose the most there", min=-1, max=4)
    skip: tuple[str, ...] = option((), "node-name glob patterns left in float, separated by |")
    min_size: int = option(1024, "layers with fewer weights stay in float", min=0)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.calib is None:  # the manager checks first; direct callers get the same error
            raise UsageError("pass shiftadd needs calibration data: add --calib FILE")
        plan = read_plan(model)
        candidates, skipped = self._select(model)
        ctx.progress.start(f"{self.name}: layers", len(candidates))
        keys = {node.name: content_key(layer_matrix(node)[0]) for node in candidates}
        bits_of = self._bits_of(candidates, keys, plan)
        stages = layer_stages(model, candidates, shared=lambda node: keys[node.name]) if self.sequential \
            else [candidates]
        source = ctx.sequential() if self.sequential else ctx
        shared: dict[tuple, tuple[BCQWeight | BCQOutlierWeight, list[gs.Constant]]] = {}
        layers = {}
        for stage in stages:
            grams, _ = source.statistics(model, gram_of=[n.inputs[0].name for n in stage if n.op in ("MatMul", "Gemm")])
            shared.update(self._fit_all(stage, bits_of, grams, keys, ctx))
            for node in stage:
                layers[node.name] = self._rewrite(model, node, bits_of[node.name], shared, keys[node.name], grams)
                ctx.progress.advance()
        if candidates:
            model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        weights = [w for w, _ in shared.values()]
        params = sum(w.rows * w.cols for w in weights)
        stats = {
            "layers": layers,
            "skipped": skipped,
            "quantized": len(layers),
            "weight_bytes": sum(w.nbytes for w in weights),
            "bits_per_weight": round(8 * sum(w.nbytes for w in weights) / params, 3) if params else None,
            "outliers": sum(w.nnz for w in weights if isinstance(w, BCQOutlierWeight)),
            "plan": "model metadata" if plan is not None else None,
            "sequential": len(stages) if self.sequential else False,
        }
        return PassResult(bool(candidates), stats)

    # -- selection (as quant) ------------------------------------------------------------

    def _select(self, model: Model) -> tuple[list[gs.Node], dict[str, str]]:
        return select_layers(model, skip=self.skip, embeddings=self.embeddings, min_size=self.min_size)

    def _bits_of(self, candidates: list[gs.Node], keys: dict[str, str], plan) -> dict[str, int]:
        """Planes per layer: the plan's where it names the layer, else ``embedding_bits`` for tables
        (and the LM head tied to one), ``bits`` for the rest."""
        tables, tied = table_keys(candidates, keys)

        def default(node: gs.Node) -> int:
            key = keys[node.name]
            if key not in tables or self.embedding_bits == 0:
                return self.bits
            if self.embedding_bits > 0:
                return self.embedding_bits
            return max(self.bits, 4) if key in tied else self.bits

        return {n.name: planned_bits(plan, n.name, default(n), 1, 4, self.name) for n in candidates}

    # -- rewriting -----------------------------------------------------------------------

    def _fit_all(self, candidates: list[gs.Node], bits_of: dict[str, int], grams: dict, keys: dict[str, str], ctx: PassContext
                 ) -> dict[tuple, tuple[BCQWeight | BCQOutlierWeight, list[gs.Constant]]]:
        """Every distinct (weight, bits) fitted through ``ctx.executor`` (float weights read one per item).

        Layers holding the same values (a tied embedding and LM head) get one fit, which both read.
        """
        members: dict[tuple, list[gs.Node]] = {}
        for node in candidates:
            members.setdefault((keys[node.name], bits_of[node.name]), []).append(node)
        prefixes: dict[tuple, str] = {}

        def items():
            for (key, bits), nodes in members.items():
                matrix, _, prefixes[(key, bits)] = layer_matrix(nodes[0])
                gram = next((g for n in nodes if n.op in ("MatMul", "Gemm")
                             and (g := _gram_for(grams, n, matrix)) is not None), None)
                yield layer_kind(nodes), matrix, bits, gram

        fitted = ctx.executor.map(partial(_fit_item, self), items())
        return {(key, bits): (weight, qops.weight_constants(
                    prefixes[(key, bits)] if bits == self.bits else f"{prefixes[(key, bits)]}.b{bits}", weight))
                for (key, bits), weight in zip(members, fitted, strict=True)}

    def fit(self, kind: str, matrix: np.ndarray, bits: int, gram: np.ndarray | None) -> BCQWeight | BCQOutlierWeight:
        """The ``bcq`` (``bcq_outliers``) weight of a matrix ``[rows, cols]`` read by layers of ``kind``:
        ``linear`` (MatMul/Gemm), ``tied`` (an embedding table an LM head reads too: row-wise alphas,
        which ``QGather`` needs, fitted in the GPTQ walk on the head's Hessian) or ``table``."""
        if kind == "linear" or (kind == "tied" and gram is not None):
            hessian = gram if gram is not None else np.eye(matrix.shape[1])
            row_wise = kind != "linear" or self.layout == "row"
            layout, group = ("row", self.table_group) if row_wise else (self.layout, self.group_size)
            return bcq_gptq(matrix, hessian, bits, terms=self.apot_terms, layout=layout,
                            group_size=group, rounds=self.rounds, damp=self.damp,
                            act_order=self.act_order, outliers=self.outliers, outlier_terms=self.outlier_terms)
        return bcq_rowwise(matrix, bits, terms=self.apot_terms, col_group=self.table_group, rounds=self.rounds,
                           outliers=self.outliers, outlier_terms=self.outlier_terms)

    def stored_bytes(self, kind: str, rows: int, cols: int, bits: int) -> int:
        """Bytes of the weight :meth:`fit` stores for a ``[rows, cols]`` matrix of ``kind`` at ``bits``
        planes, without fitting it (what a ``bits(max_mb=...)`` budget counts): packed planes, one
        byte per alpha term and group, and ``outliers`` corrections of a column index and
        ``outlier_terms`` bytes each."""
        blocks = -(-cols // 8)
        if kind == "linear" and self.layout != "row":
            row_group = min(self.group_size, rows) if self.group_size > 0 else rows
            groups = -(-rows // row_group) * (blocks if self.layout == "block" else cols)
        else:  # row-wise alphas
            groups = rows * -(-cols // min(self.table_group, cols))
        corrections = rows * outliers_per_row(self.outliers, cols)
        column = np.dtype(column_dtype(cols)).itemsize
        return rows * bits * blocks + groups * bits * self.apot_terms + corrections * (column + self.outlier_terms)

    def _rewrite(self, model: Model, node: gs.Node, bits: int, shared: dict, key: str, grams: dict) -> dict:
        matrix, _, _ = layer_matrix(node)
        gram = _gram_for(grams, node, matrix)
        fitted, constants = shared[(key, bits)]
        rewrite(model, node, fitted, constants, self.name)
        stats = layer_stats(node.op, matrix, fitted, gram)
        stats.update(layout="row" if fitted.row_group == 1 and fitted.col_group > 1 else self.layout,
                     apot_terms=self.apot_terms)
        if isinstance(fitted, BCQOutlierWeight):
            stats.update(outliers=fitted.nnz, outlier_bytes=int(fitted.outlier_cols.nbytes + fitted.outlier_values.nbytes))
        return stats


def layer_kind(nodes: list[gs.Node]) -> str:
    """How :meth:`ShiftAdd.fit` treats a weight read by ``nodes``: ``linear``, ``tied`` or ``table``."""
    ops = {n.op for n in nodes}
    if ops <= {"MatMul", "Gemm"}:
        return "linear"
    return "tied" if "Gather" in ops and ops & {"MatMul", "Gemm"} and "Conv" not in ops else "table"


def _gram_for(grams: dict, node: gs.Node, matrix: np.ndarray) -> np.ndarray | None:
    rows = grams.get(node.inputs[0].name)
    return rows[0] if rows is not None and rows[0].shape[0] == matrix.shape[1] else None


def _fit_item(shiftadd: ShiftAdd, item: tuple[str, np.ndarray, int, np.ndarray | None]
              ) -> BCQWeight | BCQOutlierWeight:
    """One work item of :meth:`ShiftAdd._fit_all` (module level: executors pickle it)."""
    kind, matrix, bits, gram = item
    return shiftadd.fit(kind, matrix, bits, gram)
