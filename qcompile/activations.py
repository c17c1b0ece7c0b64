"""Activation sparsity of feed-forward layers on calibration data (``qcompile inspect --calib``).

Sparsing Law (Luo et al., 2024) measures how sparse a model's FFN activations are
with CETT, the "cumulative errors of tail truncation": for the activation ``a`` entering
the down projection ``W`` (rows ``W_i`` per neuron), neuron ``i``'s importance is
``|a_i| * ||W_i||``; dropping the neurons below a threshold ``eps`` leaves the error
``||sum_{dropped} a_i W_i|| / ||sum_i a_i W_i||``. Per layer, ``eps`` is chosen by binary
search so that the mean CETT over the calibration tokens is ``cett`` (0.2 in the paper),
and the sparsity is the fraction of (token, neuron) pairs below it: the share of
the down projection a sparse kernel could skip. The exact-zero fraction is reported too
(high for ReLU, near zero for GELU/SiLU).

An FFN is found as a MatMul/Gemm (float or quantized) with a constant weight whose input
is produced by ReLU, GELU (``Gelu`` or the ``Erf``/``Tanh`` form exporters emit) or SiLU
(``x * Sigmoid(x)``, SwiGLU included).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.inspection import float_weight, weight_values
from qcompile.ir import qops
from qcompile.ir.model import Model
from qcompile.passes.calibration import CalibrationSet
from qcompile.passes.context import PassContext

DIRECT = {"Relu": "relu", "Gelu": "gelu", "FastGelu": "gelu", "BiasGelu": "gelu", "QuickGelu": "gelu"}
MAX_ROWS = 512  # calibration tokens per layer in the CETT search
SEARCH_STEPS = 30


def activation_kind(tensor: gs.Tensor, depth: int = 4) -> str | None:
    """``relu``/``gelu``/``silu`` when ``tensor`` is an activation's output, else None."""
    if len(tensor.inputs) != 1:
        return None
    producer = tensor.inputs[0]
    if producer.op in DIRECT:
        return DIRECT[producer.op]
    if producer.op != "Mul":
        return None
    ancestors = _ancestors(producer, depth)
    if "Erf" in ancestors or "Tanh" in ancestors:
        return "gelu"
    if "Sigmoid" in ancestors:
        return "silu"
    return None


def _ancestors(node: gs.Node, depth: int) -> set[str]:
    seen: set[str] = set()
    frontier = [node]
    for _ in range(depth):
        frontier = [p for n in frontier for t in n.inputs for p in t.inputs]
        seen.update(p.op for p in frontier)
    return seen


def ffn_layers(model: Model) -> dict[str, tuple[gs.Node, str]]:
    """Down projections: layer name -> (node, activation kind)."""
    found = {}
    for node in model.graph.nodes:
        is_matrix = node.op in ("MatMul", "Gemm") and float_weight(node) is not None
        if not (is_matrix or (qops.is_quantized(node) and node.op == "QMatMul")):
            continue
        kind = activation_kind(node.inputs[0])
        if kind:
            found[node.name] = (node, kind)
    return found


def activation_sparsity(model: Model, samples: CalibrationSet, *, cett: float = 0.2) -> dict[str, dict[str, Any]]:
    """Per FFN down projection: activation kind, width, exact-zero fraction and CETT sparsity."""
    layers = ffn_layers(model)
    if not layers:
        return {}
    context = PassContext(calib=samples, max_capture_rows=MAX_ROWS)
    rows = context.capture(model, [node.inputs[0].name for node, _ in layers.values()])
    report = {}
    for name, (node, kind) in layers.items():
        activations = rows[node.inputs[0].name].astype(np.float64)
        down = _down_rows(node)  # [neurons, out]
        if down is None or down.shape[0] != activations.shape[1]:
            continue
        report[name] = {
            "activation": kind,
            "tensor": node.inputs[0].name,
            "width": int(activations.shape[1]),
            "tokens": int(activations.shape[0]),
            "zero_fraction": round(float(np.mean(activations == 0)), 4),
            "cett": cett,
            "cett_sparsity": round(cett_sparsity(activations, down, cett), 4),
        }
    return report


def _down_rows(node: gs.Node) -> np.ndarray | None:
    """The down projection as ``[neurons, outputs]`` (one row per input channel)."""
    values = weight_values(node)  # [out, in] for matrix layers (see inspection.weight_matrix)
    return None if values is None else np.asarray(values, np.float64).T


def cett_sparsity(activations: np.ndarray, down: np.ndarray, cett: float) -> float:
    """Fraction of ``activations`` ``[tokens, neurons]`` whose importance ``|a_i| ||W_i||`` is
    below the threshold giving a mean truncation error of ``cett`` (binary search)."""
    importance = np.abs(activations) * np.linalg.norm(down, axis=1)[None, :]
    full = activations @ down
    full_norm = np.maximum(np.linalg.norm(full, axis=1), 1e-30)

    def error(threshold: float) -> float:
        dropped = np.where(importance < threshold, activations, 0.0)
        return float(np.mean(np.linalg.norm(dropped @ down, axis=1) / full_norm))

    low, high = 0.0, float(importance.max()) + 1e-30
    for _ in range(SEARCH_STEPS):
        middle = 0.5 * (low + high)
        if error(middle) <= cett:
            low = middle
        else:
            high = middle
    return float(np.mean(importance < low))
