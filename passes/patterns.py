"""Graph patterns of decoder-only LLMs, as exported from PyTorch, that passes act on.

* **RMSNorm** in its decomposed form: ``x * 1/sqrt(mean(x^2) + eps) * gamma`` as
  ``Pow(x, 2) -> ReduceMean(last axis) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .)
  -> Mul(gamma, .)`` (``Div(1, .)`` or ``Div(x, sqrt)`` also match); gamma only, no beta.
  ``fold`` smooths it like a LayerNormalization.
* **SwiGLU**: ``down(act(gate(x)) * up(x))``: two MatMuls with constant weights read
  the same input, a ``Mul`` multiplies (an activation of) one by the other, and a
  third MatMul consumes the product.
* **Attention MatMuls**: ``MatMul`` between two activations (Q·K^T, P·V): no constant
  weight, left alone by the weight passes.

Matchers return what they found; the passes put counts in their stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class RMSNorm:
    """A matched RMSNorm: ``scale`` applies gamma (``scale.inputs[gamma_index]``) and yields the output."""

    scale: gs.Node
    gamma_index: int
    source: gs.Tensor  # the normalised input x

    @property
    def gamma(self) -> gs.Constant:
        tensor = self.scale.inputs[self.gamma_index]
        assert isinstance(tensor, gs.Constant)
        return tensor

    @property
    def output(self) -> gs.Tensor:
        return self.scale.outputs[0]


@dataclass(frozen=True)
class SwiGLU:
    """A matched gated MLP: ``gate`` and ``up`` read one input, ``down`` reads ``product``."""

    gate: gs.Node
    up: gs.Node
    down: gs.Node
    product: gs.Node


def _producer(tensor: gs.Tensor, op: str | tuple[str, ...]) -> gs.Node | None:
    ops = (op,) if isinstance(op, str) else op
    if len(tensor.inputs) != 1 or tensor.inputs[0].op not in ops:
        return None
    return tensor.inputs[0]


def _scalar(tensor: gs.Tensor) -> float | None:
    if not isinstance(tensor, gs.Constant) or np.asarray(tensor.values).size != 1:
        return None
    return float(np.asarray(tensor.values).reshape(-1)[0])


def _other(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    return node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]


def _reduces_last_axis(node: gs.Node) -> bool:
    if not node.attrs.get("keepdims", 1):
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = np.asarray(node.inputs[1].values).reshape(-1).tolist()
    if axes is None or len(axes) != 1:
        return False
    rank = len(node.inputs[0].shape or [])
    return int(axes[0]) == -1 or (rank > 0 and int(axes[0]) == rank - 1)


def _rms_of(inverse: gs.Tensor) -> gs.Tensor | None:
    """``x`` when ``inverse`` is ``1/sqrt(mean(x^2) + eps)``, else None."""
    reciprocal = _producer(inverse, ("Reciprocal", "Div"))
    if reciprocal is None:
        return None
    if reciprocal.op == "Div":
        if _scalar(reciprocal.inputs[0]) != 1.0:
            return None
        root = reciprocal.inputs[1]
    else:
        root = reciprocal.inputs[0]
    return _mean_square_of(root)


def _mean_square_of(root: gs.Tensor) -> gs.Tensor | None:
    """``x`` when ``root`` is ``sqrt(mean(x^2) + eps)``, else None."""
    sqrt = _producer(root, "Sqrt")
    add = _producer(sqrt.inputs[0], "Add") if sqrt is not None else None
    if add is None:
        return None
    mean_out = next((t for t in add.inputs if _producer(t, "ReduceMean") is not None), None)
    if mean_out is None or _scalar(_other(add, mean_out)) is None:
        return None
    mean = _producer(mean_out, "ReduceMean")
    assert mean is not None
    power = _producer(mean.inputs[0], "Pow") if _reduces_last_axis(mean) else None
    if power is None or _scalar(power.inputs[1]) != 2.0:
        return None
    return power.inputs[0]


def _normalised_source(tensor: gs.Tensor) -> gs.Tensor | None:
    """``x`` when ``tensor`` is ``x * 1/rms(x)`` or ``x / rms(x)``, else None."""
    node = _producer(tensor, ("Mul", "Div"))
    if node is None or len(node.inputs) != 2:
        return None
    if node.op == "Div":
        source = _mean_square_of(node.inputs[1])
        return source if source is node.inputs[0] else None
    for candidate, inverse in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        if _rms_of(inverse) is candidate:
            return candidate
    return None


def match_rmsnorm(node: gs.Node) -> RMSNorm | None:
    """``node`` as the gamma ``Mul`` of a decomposed RMSNorm, or None."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    for gamma_index in (0, 1):
        gamma = node.inputs[gamma_index]
        if not isinstance(gamma, gs.Constant) or len(gamma.shape or ()) != 1:
            continue
        source = _normalised_source(node.inputs[1 - gamma_index])
        if source is not None:
            return RMSNorm(node, gamma_index, source)
    return None


def rmsnorms(graph: gs.Graph) -> list[RMSNorm]:
    """Every decomposed RMSNorm of ``graph``, in node order."""
    return [m for m in (match_rmsnorm(n) for n in graph.nodes) if m is not None]


def _constant_matmul(node: gs.Node) -> bool:
    return node.op == "MatMul" and len(node.inputs) == 2 and isinstance(node.inputs[1], gs.Constant)


def _through_activation(tensor: gs.Tensor) -> gs.Node | None:
    """The constant-weight MatMul whose output (through a unary activation or x*sigmoid(x)) is ``tensor``."""
    producer = _producer(tensor, ("MatMul", "Mul", "Sigmoid", "Relu", "Gelu", "Tanh", "Erf"))
    if producer is None:
        return None
    if _constant_matmul(producer):
        return producer
    if producer.op == "Mul":  # SiLU decomposed: x * sigmoid(x)
        for a, b in ((producer.inputs[0], producer.inputs[1]), (producer.inputs[1], producer.inputs[0])):
            sigmoid = _producer(b, "Sigmoid")
            if sigmoid is not None and sigmoid.inputs[0] is a:
                inner = _producer(a, "MatMul")
                return inner if inner is not None and _constant_matmul(inner) else None
        return None
    inner = _producer(producer.inputs[0], "MatMul")
    return inner if inner is not None and _constant_matmul(inner) else None


def swiglus(graph: gs.Graph) -> list[SwiGLU]:
    """Every gated MLP ``down(act(gate(x)) * up(x))`` of ``graph``."""
    found = []
    for down in graph.nodes:
        if not _constant_matmul(down):
            continue
        product = _producer(down.inputs[0], "Mul")
        if product is None or len(product.inputs) != 2:
            continue
        for gated, linear in ((product.inputs[0], product.inputs[1]), (product.inputs[1], product.inputs[0])):
            up = _producer(linear, "MatMul")
            gate = _through_activation(gated)
            if up is None or gate is None or not _constant_matmul(up) or gate is up:
                continue
            if gate.inputs[0] is up.inputs[0]:
                found.append(SwiGLU(gate, up, down, product))
                break
    return found


def activation_matmuls(graph: gs.Graph) -> list[gs.Node]:
    """MatMuls between two computed tensors (attention scores and context): no weight to rewrite."""
    return [n for n in graph.nodes if n.op == "MatMul" and len(n.inputs) == 2
            and not any(isinstance(t, gs.Constant) for t in n.inputs)]
