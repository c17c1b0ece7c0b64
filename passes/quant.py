"""``quant``: weight-only uniform quantization to the ``int`` format.

Rewrites every layer with a constant weight into a quantized op of the ``qcompile``
domain (see :mod:`qcompile.ir.qops`):

* ``MatMul(X, B)``, B ``[K, N]`` constant              -> ``QMatMul``
* ``Gemm(A, B, C)`` with ``transA=0`` (either ``transB``) -> ``QMatMul`` (+ ``Add`` for C);
  ``alpha`` is folded into the weight and ``beta`` into C
* ``Conv(X, W, B)``, W constant                          -> ``QConv`` (rows = output filters)
* ``Gather(table, ids)``, axis 0, 2-D constant table     -> ``QGather`` (when ``embeddings``)

Method ``rtn``: round to nearest with a per-group search of the clipping range that
minimises the squared error, weighted by the inputs' energy per channel when activation
statistics exist, then a least-squares refinement of each scale. Method ``gptq``
(MatMul/Gemm; needs calibration data): the same group parameters, then GPTQ's
column-by-column error feedback (:mod:`qcompile.passes.gptq`); Conv and embeddings use
rtn. Lossy; stats report, per layer, the weight SQNR and the SQNR and cosine of the
layer's output over every calibration row (computed exactly from ``X^T X``). Layers whose weights
hold the same values (as ``[rows, cols]``) are quantized once and share the quantized initializers:
a tied embedding and LM head (``Gather`` on the table, ``MatMul`` on its transposed copy) become a
``QGather`` and a ``QMatMul`` reading the same packed bytes, quantized with the LM head's input
statistics. Stats also count the LLM patterns seen (SwiGLU MLPs, attention MatMuls between
activations, which have no weight and are left alone). A layer with at least ``sparse_min`` exact
zeros (after ``prune``) is stored sparse (:mod:`qcompile.passes.sparsequant`): only its non-zeros
are quantized, the zeros stay exactly zero (GPTQ included). The parts of a ``split`` layer are
quantized together into one ``cluster``-format op (:mod:`qcompile.passes.cluster_quant`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import UsageError
from qcompile.ir import qformat, qops
from qcompile.ir.formats import Weight
from qcompile.ir.model import Model
from qcompile.ir.qformat import quantize_int
from qcompile.ir.sparse import SparseWeight

from .actquant import activation_range, insert_qdq
from .base import Pass, PassResult, matches_any, option
from .cluster_quant import quantize_split
from .context import PassContext
from .gptq import gptq_quantize
from .layers import content_key, layer_matrix, layer_stats, rewrite, select_layers, table_keys
from .patterns import activation_matmuls, swiglus
from .plan import planned_bits, read_plan
from .sequential import layer_stages
from .sparsequant import quantize_sparse, zero_fraction
from .split import GROUPS_KEY, SplitGroup, resolve_groups, split_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quant(Pass):
    """Weight-only uniform quantization (format ``int``) of MatMul, Gemm, Conv and embeddings."""

    name: ClassVar[str] = "quant"
    summary: ClassVar[str] = "weight-only uniform quantization (int format), embeddings included"

    bits: int = option(4, "bits per weight; a preceding bits plan overrides it per layer", min=2, max=8)
    group_size: int = option(-1, "weights per scale along the reduction axis; 0 = one per channel; -1 = auto "
                             "(per channel for W8A8, which integer kernels need; else 32)",
                             choices=(-1, 0, 16, 32, 64, 128, 256))
    sym: str = option("auto", "symmetric weights (zero point fixed at 2^(bits-1)); auto = true for W8A8, else "
                      "false", choices=("auto", "true", "false"))
    act_bits: int = option(0, "static activation quantization of every quantized layer's input "
                           "(QDQ, per tensor, ranges from --calib); 0 = weight-only", choices=(0, 4, 6, 8))
    method: str = option("rtn", "rtn = round to nearest with a per-group range search; gptq = GPTQ error "
                         "feedback on MatMul/Gemm (needs --calib)", choices=("rtn", "gptq"))
    clip_search: int = option(20, "candidate clipping ranges per group (0 = plain min/max)", min=0, max=200)
    act_aware: bool = option(True, "weight the range search by the inputs' energy per channel (minimises "
                             "layer-output error; synthetic inputs stand in when there is no --calib)")
    damp: float = option(0.01, "gptq: Hessian damping, as a fraction of its mean diagonal", min=0.0, max=1.0)
    act_order: bool = option(True, "gptq: quantize columns with the largest input energy first")
    embeddings: bool = option(True, "quantize Gather embedding tables too")
    embedding_bits: int = option(-1, "bits of embedding tables and of an LM head tied to one; 0 = bits; -1 = auto "
                                 "(8 for a table tied to an LM head when bits < 4, else bits): every logit reads "
                                 "it, and small LMs lose the most there", choices=(-1, 0, 2, 3, 4, 5, 6, 7, 8))
    cluster_group_size: int = option(0, "split groups (cluster format): weights per grid along the reduction "
                                     "axis; 0 = one grid per row and cluster", choices=(0, 16, 32, 64, 128, 256))
    sequential: str = option("auto", "with --calib: quantize in stages of layers that do not feed each other, "
                             "each stage calibrated on the model quantized so far (how GPTQ's authors run it); "
                             "auto = true for method=gptq", choices=("auto", "true", "false"))
    skip: tuple[str, ...] = option((), "node-name glob patterns left in float, separated by |")
    min_size: int = option(1024, "layers with fewer weights stay in float", min=0)
    sparse_min: float = option(0.3, "layers with at least this fraction of exact zeros (e.g. after prune) are "
                               "stored sparse: only the non-zeros are quantized, zeros stay exactly zero; 1 = never",
                               min=0.0, max=1.0)

    def _table_bits(self, tied: bool) -> int:
        """Bits of an embedding table (``tied``: an LM head reads it too)."""
        if self.embedding_bits > 0:
            return self.embedding_bits
        if self.embedding_bits < 0 and tied and self.bits < 4:
            return 8
        return self.bits

    @property
    def integer_kernels(self) -> bool:
        """W8A8: the configuration integer GEMM kernels run directly."""
        return self.bits == 8 and self.act_bits == 8

    @property
    def effective_group_size(self) -> int:
        if self.group_size >= 0:
            return self.group_size
        return 0 if self.integer_kernels else 32

    @property
    def symmetric(self) -> bool:
        return self.sym == "true" or (self.sym == "auto" and self.integer_kernels)

    def needs_calibration(self) -> str | None:
        if self.method == "gptq":
            return "quant(method=gptq) needs calibration data"
        if self.act_bits:
            return "quant(act_bits) needs calibration data (static activation ranges)"
        return None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        reason = self.needs_calibration()
        if reason and ctx.calib is None:  # the manager checks first; direct callers get the same error
            raise UsageError(f"{reason}: add --calib FILE")
        groups, broken = resolve_groups(model)
        in_groups = {part.name for group in groups for part in group.parts}
        candidates, skipped = self._select(model, exclude=in_groups)
        skipped.update({name: f"split group quantized part by part: {why}" for name, why in broken.items()})
        skipped.update({g.name: f"excluded by skip pattern {matches_any(g.name, self.skip)!r}" for g in groups
                        if matches_any(g.name, self.skip)})
        groups = [g for g in groups if not matches_any(g.name, self.skip)]
        patterns = {"swiglu": len(swiglus(model.graph)),
                    "activation_matmuls_left_alone": len(activation_matmuls(model.graph))}
        keys = {node.name: content_key(layer_matrix(node)[0]) for node in candidates}
        sharing: dict[str, list[gs.Node]] = {}
        for node in candidates:
            sharing.setdefault(keys[node.name], []).append(node)
        plan = read_plan(model)
        tables, tied = table_keys(candidates, keys)
        bits_of = {n.name: planned_bits(plan, n.name, self._table_bits(keys[n.name] in tied) if keys[n.name] in tables
                                        else self.bits, 2, 8, self.name) for n in candidates}
        ctx.progress.start(f"{self.name}: layers", len(candidates) + len(groups))
        sequential = ctx.calib is not None and (self.sequential == "true" or (self.sequential == "auto"
                                                                             and self.method == "gptq"))
        stages = self._stages(model, candidates, groups, keys) if sequential else [(candidates, groups)]
        source = ctx.sequential() if sequential else ctx
        shared: dict[tuple, tuple[Weight, list[gs.Constant]]] = {}
        layers = {}
        activation_quantizers = {}
        calibrated = False
        for stage_candidates, stage_groups in stages:
            leaders = [*stage_candidates, *(group.parts[0] for group in stage_groups)]
            linear_inputs = [n.inputs[0].name for n in leaders if n.op in ("MatMul", "Gemm")]
            act_inputs = [n.inputs[0].name for n in leaders if n.op != "Gather"] if self.act_bits else []
            if sequential:
                grams, activations = source.statistics(model, gram_of=linear_inputs, rows_of=act_inputs)
            else:
                grams, activations = ctx.statistics(model, gram_of=linear_inputs, rows_of=act_inputs,
                                                    allow_synthetic=self.act_aware)
            # a shared weight is quantized with the statistics of the first member that has them
            # (for a tied embedding: the LM head's input; the embedding lookup has none)
            group_grams = {keys[n.name]: next((grams[m.inputs[0].name] for m in sharing[keys[n.name]]
                                               if m.op in ("MatMul", "Gemm") and m.inputs[0].name in grams), None)
                           for n in stage_candidates}
            shared.update(self._quantize_all(stage_candidates, bits_of, keys, grams, group_grams, ctx))
            stage_layers = {}
            for node in stage_candidates:
                key = keys[node.name]
                stage_layers[node.name] = self._rewrite(model, node, bits_of[node.name], shared, key,
                                                        grams.get(node.inputs[0].name), group_grams[key])
                ctx.progress.advance()
            for group in stage_groups:
                bits = planned_bits(plan, group.name, self.bits, 2, 8, self.name)
                stage_layers[group.name] = self._rewrite_group(model, group, bits, shared,
                                                               grams.get(group.parts[0].inputs[0].name))
                ctx.progress.advance()
            activation_quantizers.update(self._quantize_activations(model, [*stage_layers], activations))
            calibrated |= bool(grams)
            layers.update(stage_layers)
        if groups:  # the record only serves to merge the parts; they are merged now
            remaining = {k: v for k, v in split_groups(model).items() if k not in {g.name for g in groups}}
            if remaining:
                model.metadata[GROUPS_KEY] = json.dumps(remaining, sort_keys=True)
            else:
                model.metadata.pop(GROUPS_KEY, None)
        shared_groups = {members[0].name: [m.name for m in members] for members in sharing.values()
                         if len(members) > 1}
        patterns["tied_embeddings"] = sum(1 for members in sharing.values()
                                          if {m.op for m in members} >= {"Gather", "MatMul"}
                                          or {m.op for m in members} >= {"Gather", "Gemm"})
        if layers:
            model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {
            "layers": layers,
            "skipped": skipped,
            "quantized": len(layers),
            "weight_bytes": sum(w.nbytes for w, _ in shared.values()),
            "activation_statistics": "synthetic" if ctx.uses_synthetic and calibrated else
                                     ("calibration" if calibrated else "none"),
            "sequential": len(stages) if sequential else False,
            "activation_quantizers": activation_quantizers,
            "shared": shared_groups,
            "patterns": patterns,
        }
        return PassResult(bool(layers), stats)

    def _quantize_activations(self, model: Model, rewritten: list[str], activations: dict) -> dict:
        """One QDQ pair per distinct input of the layers just quantized (Q/K/V share theirs)."""
        names = set(rewritten)
        quantizers = {}
        tensors = model.tensors()
        for tensor_name, rows in activations.items():
            tensor = tensors[tensor_name]
            consumers = [n for n in tensor.outputs if n.name in names and qops.is_quantized(n)
                         and n.op != "QGather"]
            if not consumers:
                continue
            scale, zero_point = activation_range(rows, self.act_bits)
            insert_qdq(model, tensor, consumers, scale, zero_point, self.act_bits, self.name)
            quantizers[tensor_name] = {"bits": self.act_bits, "scale": scale, "zero_point": zero_point,
                                       "layers": [n.name for n in consumers]}
        return quantizers

    # -- selection ---------------------------------------------------------------------

    @staticmethod
    def _stages(model: Model, candidates: list[gs.Node], groups: list[SplitGroup], keys: dict[str, str]
                ) -> list[tuple[list[gs.Node], list[SplitGroup]]]:
        """Candidates and split groups (by their first part) in :func:`layer_stages`; layers sharing
        a weight go to the stage of the last of them."""
        leaders = {group.parts[0].name: group for group in groups}
        stages = layer_stages(model, [*candidates, *(group.parts[0] for group in groups)],
                              shared=lambda node: keys.get(node.name, node.name))
        return [([n for n in stage if n.name not in leaders], [leaders[n.name] for n in stage if n.name in leaders])
                for stage in stages]

    def _select(self, model: Model, exclude: set[str]) -> tuple[list[gs.Node], dict[str, str]]:
        return select_layers(model, skip=self.skip, embeddings=self.embeddings, min_size=self.min_size,
                             ignore=lambda node: node.name in exclude)

    # -- rewriting ---------------------------------------------------------------------

    def _quantize_all(self, candidates: list[gs.Node], bits_of: dict[str, int], keys: dict, grams: dict, group_grams: dict,
                      ctx: PassContext) -> dict[tuple, tuple[Weight, list[gs.Constant]]]:
        """Every distinct (weight, bits) quantized through ``ctx.executor``, as ``_rewrite`` would one by one.

        The float matrices are read lazily, one per work item, so a serial run holds one layer's
        float weight at a time (weights memory-mapped from disk are never read whole).
        """
        first: dict[tuple, tuple[gs.Node, int]] = {}
        for node in candidates:
            bits = bits_of[node.name]
            first.setdefault((keys[node.name], bits), (node, bits))

        prefixes: dict[tuple, str] = {}

        def items():
            for (key, bits), (node, _) in first.items():
                matrix, _, prefixes[(key, bits)] = layer_matrix(node)
                rows = group_grams[key] if group_grams[key] is not None else grams.get(node.inputs[0].name)
                yield matrix, rows[0] if rows is not None and rows[0].shape[0] == matrix.shape[1] else None, bits

        results = ctx.executor.map(partial(_quantize_item, self), items())
        shared = {}
        for (key, bits), quantized in zip(first, results, strict=True):
            prefix = prefixes[(key, bits)]
            name = prefix if bits == self.bits else f"{prefix}.b{bits}"
            shared[(key, bits)] = (quantized, qops.weight_constants(name, quantized))
        return shared

    def stored_bytes(self, kind: str, rows: int, cols: int, bits: int) -> int:
        """Bytes of the dense ``int`` weight this pass stores for a ``[rows, cols]`` matrix at ``bits``,
        without quantizing it (what a ``bits(max_mb=...)`` budget counts): packed codes over the padded
        groups, a float16 scale and a uint8 zero point per group (a layer whose scales float16 cannot
        hold keeps float32 ones, and a pruned layer stored sparse fewer codes)."""
        group = qformat.effective_group_size(cols, self.effective_group_size)
        groups = -(-cols // group)
        return rows * (groups * group * bits // 8 + groups * 3)

    def _quantize(self, matrix: np.ndarray, gram: np.ndarray | None, bits: int) -> Weight:
        if self.sparse_min < 1 and zero_fraction(matrix) >= self.sparse_min:
            return quantize_sparse(matrix, bits=bits, group_size=self.effective_group_size, sym=self.symmetric,
                                   clip_search=self.clip_search, hessian=gram if self.method == "gptq" else None,
                                   damp=self.damp, act_order=self.act_order)
        if self.method == "gptq" and gram is not None:
            return gptq_quantize(matrix, gram, bits=bits, group_size=self.effective_group_size,
                                 sym=self.symmetric,
                                 clip_search=self.clip_search, damp=self.damp, act_order=self.act_order)
        importance = np.diag(gram) if self.act_aware and gram is not None else None
        return quantize_int(matrix, bits, self.effective_group_size, sym=self.symmetric,
                            clip_search=self.clip_search,
                            importance=importance)

    def _rewrite(self, model: Model, node: gs.Node, bits: int, shared: dict, key: str, gram_rows: tuple | None,
                 group_gram_rows: tuple | None) -> dict:
        matrix, _, prefix = layer_matrix(node)
        gram = gram_rows[0] if gram_rows is not None and gram_rows[0].shape[0] == matrix.shape[1] else None
        if (key, bits) not in shared:  # a bits plan may give layers sharing a weight different widths
            rows = group_gram_rows if group_gram_rows is not None else gram_rows
            group_gram = rows[0] if rows is not None and rows[0].shape[0] == matrix.shape[1] else None
            quantized = self._quantize(matrix, group_gram, bits)
            name = prefix if bits == self.bits else f"{prefix}.b{bits}"
            shared[(key, bits)] = (quantized, qops.weight_constants(name, quantized))
        quantized, constants = shared[(key, bits)]
        rewrite(model, node, quantized, constants, self.name)
        stats = layer_stats(node.op, matrix, quantized, gram)
        if isinstance(quantized, SparseWeight):
            stats.update(sparse=quantized.pattern, sparsity=round(zero_fraction(matrix), 4))
        return stats
    def _rewrite_group(self, model: Model, group: SplitGroup, bits: int, shared: dict, gram_rows: tuple | None
                       ) -> dict:
        """One ``cluster``-format op for the parts of a split layer (see :mod:`.cluster_quant`)."""
        matrices = [layer_matrix(part)[0] for part in group.parts]
        matrix = np.sum(matrices, axis=0)
        nonzero = np.stack([m != 0 for m in matrices])
        ids = np.where(nonzero.any(axis=0), nonzero.argmax(axis=0), group.k // 2).astype(np.uint8)
        gram = gram_rows[0] if gram_rows is not None and gram_rows[0].shape[0] == matrix.shape[1] else None
        quantized = quantize_split(matrix, ids, k=group.k, bits=bits, group_size=self.cluster_group_size,
                                   gram=gram, gptq=self.method == "gptq", damp=self.damp,
                                   act_order=self.act_order, clip_search=self.clip_search)
        constants = qops.weight_constants(layer_matrix(group.parts[0])[2], quantized)
        shared[("split", group.name)] = (quantized, constants)
        template, output = group.parts[0], group.output
        for node in (*group.parts[1:], *group.sums):
            node.inputs.clear()
            node.outputs.clear()
        template.outputs = [output]
        template.name = group.name
        rewrite(model, template, quantized, constants, self.name)
        return {**layer_stats(template.op, matrix, quantized, gram), "split": group.k}


def _quantize_item(quant: Quant, item: tuple[np.ndarray, np.ndarray | None, int]) -> Weight:
    """One work item of :meth:`Quant._quantize_all` (module level: executors pickle it)."""
    matrix, gram, bits = item
    return quant._quantize(matrix, gram, bits)
