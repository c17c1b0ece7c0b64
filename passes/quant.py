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
layer's output over every calibration row (computed exactly from ``X^T X``). A weight shared by several
layers of the same kind is quantized once and shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import UsageError
from qcompile.ir import qops
from qcompile.ir.model import Model
from qcompile.ir.qformat import QuantizedWeight, quantize_int
from qcompile.ir.runtime import error_metrics

from .actquant import activation_range, insert_qdq
from .base import Pass, PassResult, matches_any, option
from .context import PassContext
from .gptq import gptq_quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quant(Pass):
    """Weight-only uniform quantization (format ``int``) of MatMul, Gemm, Conv and embeddings."""

    name: ClassVar[str] = "quant"
    summary: ClassVar[str] = "weight-only uniform quantization (int format), embeddings included"

    bits: int = option(4, "bits per weight", min=2, max=8)
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
    skip: tuple[str, ...] = option((), "node-name glob patterns left in float, separated by |")
    min_size: int = option(1024, "layers with fewer weights stay in float", min=0)

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
        candidates, skipped = self._select(model)
        linear_inputs = [n.inputs[0].name for n in candidates if n.op in ("MatMul", "Gemm")]
        act_inputs = [n.inputs[0].name for n in candidates if n.op != "Gather"] if self.act_bits else []
        grams, activations = ctx.statistics(model, gram_of=linear_inputs, rows_of=act_inputs,
                                            allow_synthetic=self.act_aware)
        ctx.progress.start(f"{self.name}: layers", len(candidates))
        shared: dict[tuple[str, str], tuple[QuantizedWeight, list[gs.Constant]]] = {}
        layers = {}
        for node in candidates:
            layers[node.name] = self._rewrite(model, node, shared, grams.get(node.inputs[0].name))
            ctx.progress.advance()
        activation_quantizers = self._quantize_activations(model, candidates, activations)
        if candidates:
            model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {
            "layers": layers,
            "skipped": skipped,
            "quantized": len(layers),
            "weight_bytes": sum(w.nbytes for w, _ in shared.values()),
            "activation_statistics": "synthetic" if ctx.uses_synthetic and grams else
                                     ("calibration" if grams else "none"),
            "activation_quantizers": activation_quantizers,
        }
        return PassResult(bool(candidates), stats)

    def _quantize_activations(self, model: Model, rewritten: list[gs.Node], activations: dict) -> dict:
        """One QDQ pair per distinct input of the layers just quantized (Q/K/V share theirs)."""
        names = {node.name for node in rewritten}
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

    def _select(self, model: Model) -> tuple[list[gs.Node], dict[str, str]]:
        chosen, skipped = [], {}
        for node in model.graph.nodes:
            weight = _weight_of(node)
            if weight is None:
                continue
            reason = self._skip_reason(node, weight)
            if reason:
                skipped[node.name] = reason
            else:
                chosen.append(node)
        return chosen, skipped

    def _skip_reason(self, node: gs.Node, weight: gs.Constant) -> str | None:
        pattern = matches_any(node.name, self.skip)
        if pattern:
            return f"excluded by skip pattern {pattern!r}"
        if node.op == "Gather" and not self.embeddings:
            return "embeddings=false"
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "Gemm with transA=1 is not supported"
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name and not isinstance(
            node.inputs[2], gs.Constant
        ) and float(node.attrs.get("beta", 1.0)) != 1.0:
            return "Gemm with beta != 1 and a computed C"
        if node.op == "Gather" and node.attrs.get("axis", 0) != 0:
            return "Gather on an axis other than 0"
        values = np.asarray(weight.values)
        if values.dtype != np.float32:
            return f"weight dtype {values.dtype} (only float32 weights are quantized)"
        if values.size < self.min_size:
            return f"{values.size} weights < min_size={self.min_size}"
        if not np.isfinite(values).all():
            return "weight holds NaN or Inf"
        return None

    # -- rewriting ---------------------------------------------------------------------

    def _quantize(self, matrix: np.ndarray, gram: np.ndarray | None) -> QuantizedWeight:
        if self.method == "gptq" and gram is not None:
            return gptq_quantize(matrix, gram, bits=self.bits, group_size=self.effective_group_size,
                                 sym=self.symmetric,
                                 clip_search=self.clip_search, damp=self.damp, act_order=self.act_order)
        importance = np.diag(gram) if self.act_aware and gram is not None else None
        return quantize_int(matrix, self.bits, self.effective_group_size, sym=self.symmetric,
                            clip_search=self.clip_search,
                            importance=importance)

    def _rewrite(self, model: Model, node: gs.Node, shared: dict, gram_rows: tuple | None) -> dict:
        weight = _weight_of(node)
        assert weight is not None  # chosen by _select
        matrix = _as_rows(node, np.asarray(weight.values, np.float32))
        key = (weight.name, node.op if node.op != "Gemm" else f"Gemm{node.attrs.get('transB', 0)}")
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        if alpha != 1.0:
            matrix = matrix * alpha
            key = (f"{weight.name}*{alpha}", key[1])
        gram = gram_rows[0] if gram_rows is not None and gram_rows[0].shape[0] == matrix.shape[1] else None
        if key not in shared:
            quantized = self._quantize(matrix, gram)
            prefix = weight.name if alpha == 1.0 else f"{weight.name}.alpha"
            shared[key] = (quantized, qops.weight_constants(prefix, quantized))
        quantized, constants = shared[key]
        new_nodes = _replacement(node, quantized, constants)
        index = model.graph.nodes.index(node)
        node.inputs.clear()
        node.outputs.clear()
        model.graph.nodes[index : index + 1] = new_nodes
        for new in new_nodes:
            model.mark(new, self.name)
        return _layer_stats(node.op, matrix, quantized, gram)


def _weight_of(node: gs.Node) -> gs.Constant | None:
    """The constant weight of a quantizable node, or None."""
    position = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}.get(node.op)
    if position is None or node.domain not in ("", "ai.onnx", None) or len(node.inputs) <= position:
        return None
    weight = node.inputs[position]
    if not isinstance(weight, gs.Constant):
        return None
    ndim = len(weight.shape or ())
    if node.op == "Conv":
        return weight if ndim >= 3 else None
    return weight if ndim == 2 else None


def _as_rows(node: gs.Node, values: np.ndarray) -> np.ndarray:
    """The weight as ``[rows, cols]`` with the reduction axis last."""
    if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        return np.ascontiguousarray(values.T)
    if node.op == "Conv":
        return values.reshape(values.shape[0], -1)
    return values


def _replacement(node: gs.Node, quantized: QuantizedWeight, constants: list[gs.Constant]) -> list[gs.Node]:
    packed, scales, zero_points = constants
    attrs = qops.format_attributes(quantized)
    output = node.outputs[0]
    if node.op == "Gather":
        return [gs.Node("QGather", node.name, attrs, [packed, node.inputs[1], scales, zero_points], [output],
                        domain=qops.DOMAIN)]
    if node.op == "Conv":
        weight = node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else gs.Constant(
            f"{weight.name}.zero_bias", np.zeros(weight.shape[0], np.float32))
        conv_attrs = {k: v for k, v in node.attrs.items() if k in qops.CONV_ATTRIBUTES}
        attrs.update(conv_attrs, weight_shape=list(weight.shape))
        return [gs.Node("QConv", node.name, attrs, [node.inputs[0], packed, scales, zero_points, bias], [output],
                        domain=qops.DOMAIN)]
    has_bias = node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name
    matmul_out = gs.Variable(f"{output.name}/matmul", output.dtype, output.shape) if has_bias else output
    nodes = [gs.Node("QMatMul", node.name, attrs, [node.inputs[0], packed, scales, zero_points], [matmul_out],
                     domain=qops.DOMAIN)]
    if has_bias:
        nodes.append(gs.Node("Add", f"{node.name}/bias", inputs=[matmul_out, _scaled_bias(node)], outputs=[output]))
    return nodes


def _scaled_bias(node: gs.Node) -> gs.Tensor:
    bias, beta = node.inputs[2], float(node.attrs.get("beta", 1.0))
    if beta == 1.0:
        return bias
    return gs.Constant(f"{bias.name}.beta", (np.asarray(bias.values) * beta).astype(bias.dtype))


def _layer_stats(op: str, matrix: np.ndarray, quantized: QuantizedWeight, gram: np.ndarray | None) -> dict:
    recon = quantized.dequantize()
    stats = {
        "op": op,
        "shape": list(matrix.shape),
        "bits": quantized.bits,
        "group_size": quantized.group_size,
        "bytes": quantized.nbytes,
        "weight_sqnr_db": round(error_metrics(matrix, recon)["sqnr_db"], 2),
    }
    if gram is not None:
        stats.update(_output_error(matrix.astype(np.float64), recon.astype(np.float64), gram))
    return stats


def _output_error(weight: np.ndarray, recon: np.ndarray, gram: np.ndarray) -> dict:
    """SQNR and cosine of the layer output ``X W^T`` over all calibration rows, from ``X^T X``."""
    weight_gram = weight @ gram
    recon_gram = recon @ gram
    signal = float((weight_gram * weight).sum())
    cross = float((weight_gram * recon).sum())
    recon_energy = float((recon_gram * recon).sum())
    noise = max(signal - 2 * cross + recon_energy, 0.0)
    cosine = cross / np.sqrt(max(signal * recon_energy, 1e-300))
    sqnr = float("inf") if noise <= 0 else 10 * np.log10(max(signal, 1e-300) / noise)
    return {"output_sqnr_db": round(sqnr, 2), "output_cosine": round(cosine, 6)}
