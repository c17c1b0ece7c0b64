"""``fold``: exact reparameterizations that make a model easier to quantize.

* **BatchNorm folding**: ``BatchNormalization`` after a ``Conv`` (or ``Gemm``/``MatMul``
  with a constant weight) whose output feeds nothing else is folded into that layer:
  ``W' = W * gamma / sigma``, ``b' = (b - mean) * gamma / sigma + beta``.
* **SmoothQuant** (Xiao et al., 2023): per input channel ``j`` of the linear layers
  that read one ``LayerNormalization`` or one decomposed RMSNorm (LLMs: ``Pow``,
  ``ReduceMean``, ``Add``, ``Sqrt``, ``Reciprocal``, ``Mul`` by gamma; see
  :mod:`qcompile.passes.patterns`), ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
  (over all those consumers; clamped to >= 1e-5). ``1/s`` is folded into the
  normalisation's gamma and beta and ``s`` into every consumer's weight rows, so the
  activation outliers move into the weights. With ``shift`` (OutlierTune / SQ-b), the
  channel centres ``z`` are first subtracted from beta and added back through every
  consumer's bias (``b' = b + z W``; RMSNorm has no beta to take the centre, so it is
  scaled only and stats say so). With ``pow2`` every scale is a power of two
  (LLM-FP4's pre-shifted exponent bias), so a folded scale is a shift.
  The same migration inside a **SwiGLU** MLP (``down(act(gate(x)) * up(x))``): the
  product is linear in ``up``'s output, so ``1/s`` goes into ``up``'s output columns and
  ``s`` into ``down``'s input rows (``swiglu``; the down projection's input is where LLM
  activation outliers are largest).
  Where the normalised output also feeds other nodes (the residual of a post-LN
  transformer such as BERT), ``compensate`` gives those readers the original values
  back through a ``Mul`` by ``s`` (exact, one elementwise op); without it such a
  producer is left alone and stats say why.

Exact: outputs are unchanged up to float round-off (checked numerically in tests and
with ``--verify``). Activation statistics come from calibration data, or synthetic
samples when there is none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir.model import Model, constant_bias_add

from .base import Pass, PassResult, option
from .context import PassContext
from .patterns import RMSNorm, SwiGLU, rmsnorms, swiglus

log = logging.getLogger(__name__)

LINEAR_OPS = ("MatMul", "Gemm")
NO_STATISTICS = "no activation statistics: synthetic inputs are not valid for this model; give --calib"


@dataclass(frozen=True)
class Fold(Pass):
    """BatchNorm folding and SmoothQuant / OutlierTune scale migration (exact)."""

    name: ClassVar[str] = "fold"
    summary: ClassVar[str] = "exact: fold BatchNorm into Conv/Gemm; SmoothQuant scales into LayerNorm + consumers"
    exact: ClassVar[bool] = True

    batchnorm: bool = option(True, "fold BatchNormalization into the preceding Conv/Gemm/MatMul")
    smooth: bool = option(True, "migrate activation outliers from LayerNormalization and RMSNorm into their consumers")
    alpha: float = option(0.5, "SmoothQuant migration strength (0 = none, 1 = all into the weights)",
                          min=0.0, max=1.0)
    shift: bool = option(False, "also centre each channel (OutlierTune), compensated in consumer biases")
    pow2: bool = option(False, "round every scale to a power of two (a fold becomes a shift)")
    swiglu: bool = option(True, "also migrate outliers of a SwiGLU MLP's product from down_proj into up_proj")
    compensate: bool = option(True, "when the normalised output also feeds other nodes (a residual), "
                              "undo the scale on those branches with a Mul (exact; one small op each)")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        stats: dict = {"batchnorm": [], "smoothed": {}, "skipped": {}, "matched": {}}
        changed = False
        if self.batchnorm:
            changed |= self._fold_batchnorms(model, stats)
        if self.smooth:
            changed |= self._smooth(model, ctx, stats)
        if self.smooth and self.swiglu:
            changed |= self._smooth_mlps(model, ctx, stats)
        if changed:
            model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(changed, stats)

    # -- BatchNorm ---------------------------------------------------------------------

    def _fold_batchnorms(self, model: Model, stats: dict) -> bool:
        changed = False
        for bn in [n for n in model.graph.nodes if n.op == "BatchNormalization"]:
            reason = _batchnorm_blocker(bn)
            if reason:
                stats["skipped"][bn.name] = reason
                continue
            layer = bn.inputs[0].inputs[0]
            gamma, beta, mean, var = (np.asarray(t.values, np.float64) for t in bn.inputs[1:5])
            factor = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
            weight = layer.inputs[1]
            values = np.asarray(weight.values, np.float64)
            if layer.op == "Conv":
                folded = values * factor.reshape(-1, *([1] * (values.ndim - 1)))
            elif layer.op == "Gemm" and layer.attrs.get("transB", 0):
                folded = values * factor[:, None]
            else:
                folded = values * factor[None, :]
            old_bias = _bias_of(model.graph, layer)
            bias = ((old_bias if old_bias is not None else 0.0) - mean) * factor + beta
            layer.inputs[1] = gs.Constant(f"{weight.name}.bn_folded", folded.astype(np.float32))
            layer.outputs = [bn.outputs[0]]
            bn.inputs.clear()
            bn.outputs.clear()
            _set_bias(model, layer, bias.astype(np.float32))
            model.mark(layer, self.name)
            stats["batchnorm"].append(f"{bn.name} -> {layer.name}")
            changed = True
        return changed

    # -- SmoothQuant -------------------------------------------------------------------

    def _smooth(self, model: Model, ctx: PassContext, stats: dict) -> bool:
        producers: list[tuple[gs.Node, RMSNorm | None]] = []
        tied = _tied_to_embedding(model.graph)
        layer_norms = [n for n in model.graph.nodes if n.op == "LayerNormalization"]
        rms_norms = rmsnorms(model.graph)
        stats["matched"] = {"LayerNormalization": len(layer_norms), "RMSNorm": len(rms_norms)}
        for norm in layer_norms:
            reason = _smooth_blocker(norm, model, self.compensate, tied)
            if reason:
                stats["skipped"][norm.name] = reason
            else:
                producers.append((norm, None))
        for rms in rms_norms:
            reason = _output_blocker(rms.scale, model, self.compensate, tied)
            if reason:
                stats["skipped"][rms.scale.name] = reason
            else:
                producers.append((rms.scale, rms))
        if not producers:
            return False
        outputs = [norm.outputs[0].name for norm, _ in producers]
        activations = ctx.capture(model, outputs, allow_synthetic=True)
        if not activations:  # synthetic inputs the model rejects (e.g. an LLM decode graph's)
            return _without_statistics(stats, [norm.name for norm, _ in producers])
        for norm, matched in producers:
            rows = activations[norm.outputs[0].name]
            self._smooth_one(model, norm, rows, stats, matched)
        stats["activation_statistics"] = "synthetic" if ctx.uses_synthetic else "calibration"
        return True

    def _smooth_one(self, model: Model, norm: gs.Node, rows: np.ndarray, stats: dict,
                    rms: RMSNorm | None = None) -> None:
        output = norm.outputs[0]
        tied = _tied_to_embedding(model.graph)
        consumers = [c for c in output.outputs if _foldable_consumer(c, output, tied) is None]
        others = [c for c in output.outputs if c not in consumers]
        centre = np.zeros(rows.shape[1])
        if self.shift and rms is None:
            centre = ((rows.max(axis=0) + rows.min(axis=0)) / 2).astype(np.float64)
        act_max = np.abs(rows - centre).max(axis=0).astype(np.float64)
        weight_max = np.max([np.abs(_input_rows(c)).max(axis=1) for c in consumers], axis=0)
        scales = np.power(np.maximum(act_max, 1e-5), self.alpha) / np.power(np.maximum(weight_max, 1e-5),
                                                                              1 - self.alpha)
        scales = np.clip(scales, 1e-5, None)
        if self.pow2:
            scales = np.exp2(np.round(np.log2(scales)))
        if rms is None:
            self._scale_layer_norm(norm, scales, centre, rows.shape[1])
        else:  # gamma only; a gamma shared by several norms (equal values) gets one copy each
            gamma = np.asarray(rms.gamma.values, np.float64)
            norm.inputs[rms.gamma_index] = gs.Constant(f"{norm.name}.gamma_smoothed",
                                                       (gamma / scales).astype(np.float32))
        if others:
            self._restore_for(model, norm, others, scales, centre)
        for consumer in consumers:
            weight = _input_rows(consumer)
            if self.shift and rms is None:
                old = _bias_of(model.graph, consumer)
                _set_bias(model, consumer, ((old if old is not None else 0.0) + centre @ weight).astype(np.float32))
            _set_input_rows(consumer, weight * scales[:, None])
            model.mark(consumer, self.name)
        model.mark(norm, self.name)
        record = {
            "kind": "RMSNorm" if rms is not None else "LayerNormalization",
            "consumers": [c.name for c in consumers],
            "compensated": [c.name for c in others],
            "max_scale": float(scales.max()),
            "min_scale": float(scales.min()),
            "activation_absmax_before": float(act_max.max()),
            "activation_absmax_after": float((act_max / scales).max()),
        }
        if self.shift and rms is not None:
            record["shift"] = "not applied: RMSNorm has no beta to take the centre"
        stats["smoothed"][norm.name] = record

    def _smooth_mlps(self, model: Model, ctx: PassContext, stats: dict) -> bool:
        """SmoothQuant between ``up`` and ``down`` of every SwiGLU MLP (exact: the product is linear in up)."""
        mlps = swiglus(model.graph)
        stats["matched"]["SwiGLU"] = len(mlps)
        chosen = []
        for mlp in mlps:
            reason = _mlp_blocker(mlp, model)
            if reason:
                stats["skipped"][mlp.down.name] = reason
            else:
                chosen.append(mlp)
        if not chosen:
            return False
        activations = ctx.capture(model, [m.down.inputs[0].name for m in chosen], allow_synthetic=True)
        if not activations:
            return _without_statistics(stats, [mlp.down.name for mlp in chosen])
        for mlp in chosen:
            rows = activations[mlp.down.inputs[0].name]
            act_max = np.abs(rows).max(axis=0).astype(np.float64)
            down_rows = _input_rows(mlp.down)
            up_rows = _input_rows(mlp.up)
            weight_max = np.abs(down_rows).max(axis=1)
            scales = np.clip(np.power(np.maximum(act_max, 1e-5), self.alpha)
                             / np.power(np.maximum(weight_max, 1e-5), 1 - self.alpha), 1e-5, None)
            if self.pow2:
                scales = np.exp2(np.round(np.log2(scales)))
            _set_input_rows(mlp.up, up_rows / scales[None, :])
            _set_input_rows(mlp.down, down_rows * scales[:, None])
            for node in (mlp.up, mlp.down):
                model.mark(node, self.name)
            stats["smoothed"][mlp.down.name] = {
                "kind": "SwiGLU",
                "consumers": [mlp.down.name],
                "compensated": [],
                "scaled_outputs_of": mlp.up.name,
                "max_scale": float(scales.max()),
                "min_scale": float(scales.min()),
                "activation_absmax_before": float(act_max.max()),
                "activation_absmax_after": float((act_max / scales).max()),
            }
        stats["activation_statistics"] = "synthetic" if ctx.uses_synthetic else "calibration"
        return True

    def _scale_layer_norm(self, norm: gs.Node, scales: np.ndarray, centre: np.ndarray, channels: int) -> None:
        """Divide LayerNormalization's gamma and (beta - centre) by the scales."""
        gamma, beta = norm.inputs[1], norm.inputs[2] if len(norm.inputs) > 2 else None
        norm.inputs[1] = gs.Constant(f"{gamma.name}.smoothed",
                                     (np.asarray(gamma.values, np.float64) / scales).astype(np.float32))
        beta_values = np.asarray(beta.values, np.float64) if beta is not None else np.zeros(channels)
        new_beta = ((beta_values - centre) / scales).astype(np.float32)
        if len(norm.inputs) > 2:
            norm.inputs[2] = gs.Constant(f"{norm.name}.beta_smoothed", new_beta)
        else:
            norm.inputs.append(gs.Constant(f"{norm.name}.beta_smoothed", new_beta))

    def _restore_for(self, model: Model, norm: gs.Node, readers: list[gs.Node], scales: np.ndarray,
                     centre: np.ndarray) -> None:
        """Give ``readers`` the original normalised output back: ``y * s (+ z)``."""
        output = norm.outputs[0]
        restored = gs.Variable(f"{output.name}/unsmoothed", output.dtype, output.shape)
        nodes = []
        scaled = restored if not self.shift else gs.Variable(f"{output.name}/rescaled", output.dtype, output.shape)
        nodes.append(gs.Node("Mul", f"{norm.name}/unsmooth", inputs=[
            output, gs.Constant(f"{norm.name}.unsmooth_scale", scales.astype(np.float32))], outputs=[scaled]))
        if self.shift:
            nodes.append(gs.Node("Add", f"{norm.name}/unshift", inputs=[
                scaled, gs.Constant(f"{norm.name}.unshift_centre", centre.astype(np.float32))], outputs=[restored]))
        model.splice(nodes, readers, output, restored, self.name)


# -- helpers -------------------------------------------------------------------------


def _without_statistics(stats: dict, names: list[str]) -> bool:
    """Record that ``names`` were not smoothed for want of activation statistics; nothing changed."""
    for name in names:
        stats["skipped"][name] = NO_STATISTICS
    stats["activation_statistics"] = "none"
    return False


def _constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def _batchnorm_blocker(bn: gs.Node) -> str | None:
    if len(bn.inputs) < 5 or not all(_constant(t) for t in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constants"
    if len(bn.outputs) > 1 and any(t.outputs for t in bn.outputs[1:]):
        return "training-mode BatchNormalization"
    producers = bn.inputs[0].inputs
    if len(producers) != 1:
        return "input is not produced by a layer"
    layer = producers[0]
    if layer.op not in ("Conv", *LINEAR_OPS) or len(layer.inputs) < 2 or not _constant(layer.inputs[1]):
        return f"preceded by {layer.op}, not a Conv/Gemm/MatMul with a constant weight"
    if len(bn.inputs[0].outputs) != 1:
        return "the layer's output also feeds other nodes"
    if layer.op == "Gemm" and (layer.attrs.get("transA", 0) or float(layer.attrs.get("beta", 1.0)) != 1.0):
        return "Gemm with transA or beta != 1"
    if layer.op == "MatMul" and len(layer.inputs[1].shape) != 2:
        return "MatMul with a batched weight"
    return None


def _tied_to_embedding(graph: gs.Graph) -> set[str]:
    """Names of linear layers whose weight equals an embedding table (a tied LM head).

    Scaling such a weight would untie it from the table, which ``quant`` stores once.
    """
    return set(tied_heads(graph))


def tied_heads(graph: gs.Graph) -> dict[str, gs.Constant]:
    """Linear layers whose weight equals an embedding table (tied LM heads): node name -> the table."""
    tables = [n.inputs[0] for n in graph.nodes
              if n.op == "Gather" and _constant(n.inputs[0]) and len(n.inputs[0].shape or ()) == 2]
    tied = {}
    for node in graph.nodes:
        if node.op not in LINEAR_OPS or len(node.inputs) < 2 or not _constant(node.inputs[1]):
            continue
        for table in tables:
            values = np.asarray(table.values)
            if tuple(node.inputs[1].shape or ()) in (values.shape, values.shape[::-1]) and \
                    np.array_equal(_input_rows(node).T, values):
                tied[node.name] = table
    return tied


def _foldable_consumer(consumer: gs.Node, output: gs.Tensor, tied: set[str] | None = None) -> str | None:
    """Why ``consumer`` cannot absorb a scale on its input ``output``, or None."""
    if consumer.op not in LINEAR_OPS or consumer.inputs[0] is not output:
        return f"its output also feeds {consumer.op} {consumer.name!r} (e.g. a residual): not foldable"
    if not _constant(consumer.inputs[1]) or len(consumer.inputs[1].shape) != 2:
        return f"consumer {consumer.name!r} has no constant 2-D weight"
    if tied and consumer.name in tied:
        return f"consumer {consumer.name!r} shares its weight with the embedding table (tied LM head)"
    if consumer.op == "Gemm" and (consumer.attrs.get("transA", 0) or float(consumer.attrs.get("alpha", 1.0)) != 1.0):
        return f"consumer {consumer.name!r} is a Gemm with transA or alpha != 1"
    return None


def _smooth_blocker(norm: gs.Node, model: Model, compensate: bool, tied: set[str] | None = None) -> str | None:
    if len(norm.inputs) < 2 or not _constant(norm.inputs[1]):
        return "gamma is not a constant"
    if len(norm.inputs) > 2 and not _constant(norm.inputs[2]):
        return "beta is not a constant"
    if norm.attrs.get("axis", -1) not in (-1, len(norm.inputs[0].shape or [0]) - 1):
        return "normalises over more than the last axis"
    return _output_blocker(norm, model, compensate, tied)


def _mlp_blocker(mlp: SwiGLU, model: Model) -> str | None:
    """Why a SwiGLU's up/down pair cannot take a scale, or None."""
    if model.provenance.get(mlp.down.name) == "fold":  # only this migration rewrites a down projection
        return "already smoothed by an earlier fold"
    up_out, product_out = mlp.up.outputs[0], mlp.product.outputs[0]
    if len(up_out.outputs) != 1 or up_out in model.graph.outputs:
        return f"{mlp.up.name!r}'s output has other readers than the gated product"
    if len(product_out.outputs) != 1 or product_out in model.graph.outputs:
        return "the gated product has other readers than the down projection"
    for layer in (mlp.up, mlp.down):
        if len(layer.inputs[1].shape or ()) != 2:
            return f"{layer.name!r} has no 2-D constant weight"
    if len(mlp.up.inputs[1].outputs) != 1 or len(mlp.down.inputs[1].outputs) != 1:
        return "the up or down weight is shared with another layer"
    return None


def _output_blocker(norm: gs.Node, model: Model, compensate: bool, tied: set[str] | None = None) -> str | None:
    """Why the normalised output of ``norm`` cannot be smoothed into its readers, or None."""
    if model.provenance.get(norm.name) == "fold":
        return "already smoothed by an earlier fold"
    output = norm.outputs[0]
    if output in model.graph.outputs:
        return "its output is a model output"
    reasons = [_foldable_consumer(consumer, output, tied) for consumer in output.outputs]
    if all(reasons):
        if len(reasons) == 1 and "tied" in str(reasons[0]):
            return str(reasons[0])
        return "no linear consumer with a constant weight to fold into" if reasons else "no consumers"
    if any(reasons) and not compensate:
        return next(r for r in reasons if r) + " (fold(compensate=true) handles it)"
    return None


def _input_rows(layer: gs.Node) -> np.ndarray:
    """The weight as ``[in_features, out_features]`` (row j multiplies input channel j)."""
    values = np.asarray(layer.inputs[1].values, np.float64)
    return values.T if layer.op == "Gemm" and layer.attrs.get("transB", 0) else values


def _set_input_rows(layer: gs.Node, rows: np.ndarray) -> None:
    values = rows.T if layer.op == "Gemm" and layer.attrs.get("transB", 0) else rows
    layer.inputs[1] = gs.Constant(f"{layer.inputs[1].name}.smoothed", values.astype(np.float32))


def _bias_of(graph: gs.Graph, layer: gs.Node) -> np.ndarray | None:
    """A layer's constant bias: Conv/Gemm input 2, or the constant of the Add after a MatMul."""
    if layer.op in ("Conv", "Gemm"):
        if len(layer.inputs) > 2 and _constant(layer.inputs[2]):
            return np.asarray(layer.inputs[2].values, np.float64).reshape(-1)
        return None
    found = constant_bias_add(graph, layer)
    return None if found is None else np.asarray(found[1].values, np.float64)


def _set_bias(model: Model, layer: gs.Node, bias: np.ndarray) -> None:
    if layer.op in ("Conv", "Gemm"):
        constant = gs.Constant(f"{layer.name}.bias_folded", bias)
        if len(layer.inputs) > 2:
            layer.inputs[2] = constant
        else:
            layer.inputs.append(constant)
        return
    found = constant_bias_add(model.graph, layer)
    if found is not None:
        add, constant = found
        add.inputs[add.inputs.index(constant)] = gs.Constant(f"{layer.name}.bias_folded", bias)
        return
    output = layer.outputs[0]
    hidden = gs.Variable(f"{output.name}/unbiased", output.dtype, output.shape)
    layer.outputs = [hidden]
    bias_node = gs.Node("Add", f"{layer.name}/bias", inputs=[hidden, gs.Constant(f"{layer.name}.bias", bias)],
                        outputs=[output])
    model.graph.nodes.append(bias_node)
    model.mark(bias_node, "fold")
