"""Layers with constant weights, as the weight-rewriting passes (quant, shiftadd, prune) see them.

A layer's weight is handled as a matrix ``[rows, cols]`` with the reduction axis last
(:func:`as_rows`); a quantized replacement is one ``qcompile`` op of any weight format
(:func:`replacement`), plus an ``Add`` where a Gemm had a bias.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir import qops
from qcompile.ir.formats import Weight
from qcompile.ir.model import Model, constant_bias_add
from qcompile.ir.runtime import error_metrics

from .base import matches_any

# Initializers named so are the online rotations of the ``rotate`` pass: exact ``Q``/``Qᵀ``
# products that keep the function unchanged, which no weight pass may touch.
ROTATION_PREFIX = "qcompile.rotation."


def weight_of(node: gs.Node) -> gs.Constant | None:
    """The constant weight of a quantizable node, or None (also for the rotate pass's online rotations)."""
    position = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}.get(node.op)
    if position is None or node.domain not in ("", "ai.onnx", None) or len(node.inputs) <= position:
        return None
    weight = node.inputs[position]
    if not isinstance(weight, gs.Constant) or weight.name.startswith(ROTATION_PREFIX):
        return None
    ndim = len(weight.shape or ())
    if node.op == "Conv":
        return weight if ndim >= 3 else None
    return weight if ndim == 2 else None


def select_layers(model: Model, *, skip: tuple[str, ...], embeddings: bool, min_size: int,
                  ignore: Callable[[gs.Node], bool] = lambda node: False
                  ) -> tuple[list[gs.Node], dict[str, str]]:
    """The layers with a constant weight a weight pass rewrites, and why each other one is left alone.

    ``ignore``: layers neither chosen nor reported (e.g. handled another way).
    """
    chosen, skipped = [], {}
    for node in model.graph.nodes:
        weight = weight_of(node)
        if weight is None or ignore(node):
            continue
        pattern = matches_any(node.name, skip)
        if pattern:
            reason: str | None = f"excluded by skip pattern {pattern!r}"
        elif node.op == "Gather" and not embeddings:
            reason = "embeddings=false"
        else:
            reason = unsupported_reason(node, weight, min_size)
        if reason:
            skipped[node.name] = reason
        else:
            chosen.append(node)
    return chosen, skipped


def unsupported_reason(node: gs.Node, weight: gs.Constant, min_size: int) -> str | None:
    """Why a layer with a constant weight cannot be rewritten (None when it can)."""
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
    if values.size < min_size:
        return f"{values.size} weights < min_size={min_size}"
    if not np.isfinite(values).all():
        return "weight holds NaN or Inf"
    return None


def layer_matrix(node: gs.Node) -> tuple[np.ndarray, tuple[str, str], str]:
    """The layer's weight as ``[rows, cols]`` (Gemm's alpha applied), a key identifying it, and
    the name prefix for its quantized initializers.

    Layers of the same kind reading the same weight get the same key: quantize it once and share.
    """
    weight = weight_of(node)
    assert weight is not None, f"{node.name} has no constant weight"
    matrix = as_rows(node, np.asarray(weight.values, np.float32))
    key = (weight.name, node.op if node.op != "Gemm" else f"Gemm{node.attrs.get('transB', 0)}")
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    if alpha != 1.0:
        return matrix * alpha, (f"{weight.name}*{alpha}", key[1]), f"{weight.name}.alpha"
    return matrix, key, weight.name


def content_key(matrix: np.ndarray) -> str:
    """Identity of a weight by value: shape and a BLAKE2b digest of its float32 ``[rows, cols]`` bytes
    (a tied embedding and LM head hold the same values in two initializers, one transposed)."""
    data = np.ascontiguousarray(matrix, np.float32)
    digest = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
    return f"{data.shape[0]}x{data.shape[1]}:{digest}"


def table_keys(candidates: list[gs.Node], keys: dict[str, str]) -> tuple[set[str], set[str]]:
    """Content keys (``keys``: node name -> :func:`content_key`) of the embedding tables among
    ``candidates`` (read by a Gather) and, of those, the ones an LM head (MatMul/Gemm) reads too."""
    tables = {keys[n.name] for n in candidates if n.op == "Gather"}
    tied = {keys[n.name] for n in candidates if n.op in ("MatMul", "Gemm") and keys[n.name] in tables}
    return tables, tied


def correct_bias(model: Model, node: gs.Node, original: np.ndarray, new: np.ndarray, mean: np.ndarray) -> float | None:
    """Move the mean output error of a lossy weight change into the layer's bias.

    With ``x``'s calibration mean ``mean``, the output error ``(W - W') x`` averages
    ``(W - W') mean``; adding that to the bias leaves only its zero-mean part (the bias
    correction of Nagel et al., "Data-Free Quantization", 2019). ``original``/``new`` are the
    node's weight as ``[rows, cols]`` (:func:`as_rows`; Gemm's alpha is applied here). Works for MatMul + ``Add`` of a constant bias
    and Gemm with a constant ``C``; returns the norm of the shift, or None (no bias to use).
    """
    if node.op not in ("MatMul", "Gemm") or mean.shape != (original.shape[1],):
        return None
    shift = (original.astype(np.float64) - new.astype(np.float64)) @ mean
    if node.op == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        beta = float(node.attrs.get("beta", 1.0))
        if not isinstance(bias, gs.Constant) or tuple(bias.shape) != (original.shape[0],) or beta == 0.0:
            return None
        alpha = float(node.attrs.get("alpha", 1.0))
        node.inputs[2] = gs.Constant(f"{bias.name}.corrected", (bias.values + shift * alpha / beta).astype(bias.dtype))
        return float(np.linalg.norm(shift))
    found = constant_bias_add(model.graph, node, original.shape[0])
    if found is None:
        return None
    add, bias = found
    corrected = gs.Constant(f"{bias.name}.corrected", (bias.values + shift).astype(np.float32))
    add.inputs[add.inputs.index(bias)] = corrected
    return float(np.linalg.norm(shift))


def rewrite(model: Model, node: gs.Node, quantized: Weight, constants: list[gs.Constant], pass_name: str) -> None:
    """Replace float ``node`` in place by its quantized equivalent, marked as made by ``pass_name``."""
    new_nodes = replacement(node, quantized, constants)
    index = model.graph.nodes.index(node)
    node.inputs.clear()
    node.outputs.clear()
    model.graph.nodes[index : index + 1] = new_nodes
    for new in new_nodes:
        model.mark(new, pass_name)


def as_rows(node: gs.Node, values: np.ndarray) -> np.ndarray:
    """The weight as ``[rows, cols]`` with the reduction axis last."""
    if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        return np.ascontiguousarray(values.T)
    if node.op == "Conv":
        return values.reshape(values.shape[0], -1)
    return values


def replacement(node: gs.Node, quantized: Weight, constants: list[gs.Constant]) -> list[gs.Node]:
    """The ``qcompile`` nodes computing what float ``node`` did, from a quantized weight."""
    attrs = qops.format_attributes(quantized)
    output = node.outputs[0]
    if node.op == "Gather":
        return [gs.Node("QGather", node.name, attrs, qops.layer_inputs("QGather", node.inputs[1], constants), [output],
                        domain=qops.DOMAIN)]
    if node.op == "Conv":
        weight = node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else gs.Constant(
            f"{weight.name}.zero_bias", np.zeros(weight.shape[0], np.float32))
        conv_attrs = {k: v for k, v in node.attrs.items() if k in qops.CONV_ATTRIBUTES}
        attrs.update(conv_attrs, weight_shape=list(weight.shape))
        return [gs.Node("QConv", node.name, attrs, qops.layer_inputs("QConv", node.inputs[0], constants, bias), [output],
                        domain=qops.DOMAIN)]
    has_bias = node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name
    matmul_out = gs.Variable(f"{output.name}/matmul", output.dtype, output.shape) if has_bias else output
    nodes = [gs.Node("QMatMul", node.name, attrs, qops.layer_inputs("QMatMul", node.inputs[0], constants), [matmul_out],
                     domain=qops.DOMAIN)]
    if has_bias:
        nodes.append(gs.Node("Add", f"{node.name}/bias", inputs=[matmul_out, scaled_bias(node)], outputs=[output]))
    return nodes


def scaled_bias(node: gs.Node) -> gs.Tensor:
    bias, beta = node.inputs[2], float(node.attrs.get("beta", 1.0))
    if beta == 1.0:
        return bias
    return gs.Constant(f"{bias.name}.beta", (np.asarray(bias.values) * beta).astype(bias.dtype))


MAX_OUTPUT_STATS_FLOPS = 4e10  # per layer: about 2-4 s on this 2-core machine


def layer_stats(op: str, matrix: np.ndarray, quantized: Weight, gram: np.ndarray | None) -> dict:
    """Per-layer stats of a lossy rewrite: weight SQNR, and output SQNR/cosine when ``gram`` is known."""
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
        stats.update(output_error(matrix.astype(np.float64), recon.astype(np.float64), gram))
    return stats


def output_error(weight: np.ndarray, recon: np.ndarray, gram: np.ndarray) -> dict:
    """SQNR and cosine of the layer output ``X W^T`` over all calibration rows, from ``X^T X``.

    Costs ``2 rows cols^2`` multiply-adds: past :data:`MAX_OUTPUT_STATS_FLOPS` the statistics are
    taken over evenly spaced output channels (``output_channels_sampled`` says how many), so a
    25088-wide layer (VGG's first classifier layer: 4096 x 25088, a minute per product) reports
    in seconds.
    """
    rows, cols = weight.shape
    step = -(-2 * rows * cols * cols // int(MAX_OUTPUT_STATS_FLOPS))
    if step > 1:
        weight, recon = weight[::step], recon[::step]
    weight_gram = weight @ gram
    recon_gram = recon @ gram
    signal = float((weight_gram * weight).sum())
    cross = float((weight_gram * recon).sum())
    recon_energy = float((recon_gram * recon).sum())
    noise = max(signal - 2 * cross + recon_energy, 0.0)
    cosine = cross / np.sqrt(max(signal * recon_energy, 1e-300))
    sqnr = float("inf") if noise <= 0 else 10 * np.log10(max(signal, 1e-300) / noise)
    stats = {"output_sqnr_db": round(sqnr, 2), "output_cosine": round(cosine, 6)}
    if step > 1:
        stats["output_channels_sampled"] = int(weight.shape[0])
    return stats
