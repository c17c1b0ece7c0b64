"""The trainable part of quantized layers for ``tune``: their continuous parameters, codes fixed.

A quantized weight is discrete codes times continuous parameters: ``int`` stores
``(code - zero_point) * scale`` per group, ``bcq`` (``shiftadd``) ``sum_i alpha_i * b_i``
with power-of-two alphas. Distillation can move the continuous parameters while the codes
stay as the quantizer chose them (scale-only fine-tuning, as PEQA; OmniQuant learns the
same quantities layer by layer). Each parameter is trained as a relative change
``p * (1 + delta)`` (one learning rate fits every layer's magnitudes), and stored again in
its format when training ends: ``int`` scales in their dtype (float16 on disk), ``bcq``
alphas rounded to sums of as many powers of two as before, so the model stays
multiplication-less. ``bcq_outliers`` corrections stay as they are. Sparse storage
(``prune`` then ``quant``) trains the scales of its compact inner weight; the pruned
positions stay exactly zero. ``cluster`` weights are left frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
import torch

from qcompile.ir import qops
from qcompile.ir.bcq import BCQWeight, decode_alphas, unpack_planes
from qcompile.ir.bcq_outliers import BCQOutlierWeight
from qcompile.ir.qformat import QuantizedWeight, unpack_codes
from qcompile.ir.sparse import SparseWeight

from .base import matches_any
from .bcqfit import apot_codes

TRAINABLE_FORMATS = ("int", "bcq", "bcq_outliers")  # also inside sparse storage


class _PlaneSum(torch.autograd.Function):
    """``W[r, c] = sum_b values[r // row_group, c // col_group, b] * planes[r, b, c]``.

    ``planes`` are small integers (``bcq`` signs as int8, ``int`` centred codes as int16), and
    no ``[rows, bits, cols]`` float tensor is ever built or kept for the backward: each plane
    is widened alone, and the gradient is reduced into its groups one plane at a time."""

    @staticmethod
    def forward(ctx, values, planes, row_index, col_index):  # type: ignore[override]
        ctx.save_for_backward(planes, row_index, col_index)
        ctx.value_shape = values.shape
        matrix = values.new_zeros(planes.shape[0], planes.shape[2])
        for plane in range(planes.shape[1]):
            alpha = values[:, :, plane].index_select(0, row_index).index_select(1, col_index)
            matrix.addcmul_(alpha, planes[:, plane].to(values.dtype))
        return matrix

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        planes, row_index, col_index = ctx.saved_tensors
        row_groups, col_groups, bits = ctx.value_shape
        grad_values = grad.new_zeros(ctx.value_shape)
        for plane in range(bits):
            weighted = grad * planes[:, plane].to(grad.dtype)
            by_col_group = grad.new_zeros(grad.shape[0], col_groups).index_add_(1, col_index, weighted)
            grad_values[:, :, plane] = grad.new_zeros(row_groups, col_groups).index_add_(0, row_index, by_col_group)
        return grad_values, None, None, None


@dataclass
class QuantScales:
    """One quantized weight (possibly read by several nodes: a tied table and LM head)."""

    name: str  # the stored parameter constant (scales or alpha codes)
    weight: QuantizedWeight | BCQWeight | BCQOutlierWeight | SparseWeight
    targets: list[tuple[str, gs.Node]]  # (decoded constant in the student, the quantized node it replaces)
    base: torch.Tensor = field(init=False)  # the stored parameters as float32
    delta: torch.nn.Parameter = field(init=False)
    _planes: torch.Tensor = field(init=False)  # [rows, planes, cols]: bcq signs (int8), int centred codes (int16)
    _row_index: torch.Tensor = field(init=False)  # each row's parameter group
    _col_index: torch.Tensor = field(init=False)  # each column's parameter group
    _extra: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, default=None)  # bcq_outliers: (flat index, value)
    _scatter: torch.Tensor | None = field(init=False, default=None)  # sparse: dense flat index of each stored value
    _stored: torch.Tensor | None = field(init=False, default=None)  # sparse: which compact slots hold a value

    def __post_init__(self) -> None:
        weight = self.weight
        if isinstance(weight, SparseWeight):
            placement = weight.placement
            rows, slots = np.nonzero(placement.valid)
            self._scatter = torch.from_numpy(rows * weight.cols + placement.positions[rows, slots])
            self._stored = torch.from_numpy(placement.valid)
            weight = weight.inner
        self._inner = weight
        if isinstance(weight, QuantizedWeight):
            codes = unpack_codes(weight.packed, weight.bits).reshape(weight.rows, weight.n_groups, -1)
            centred = codes.astype(np.int16) - weight.zero_points[..., None].astype(np.int16)
            self._planes = torch.from_numpy(np.ascontiguousarray(centred.reshape(weight.rows, 1, -1)[:, :, : weight.cols]))
            self.base = torch.from_numpy(np.asarray(weight.scales, np.float32))
            self._row_index = torch.arange(weight.rows)
            self._col_index = torch.arange(weight.cols) // weight.group_size
        else:
            dense = weight.dense if isinstance(weight, BCQOutlierWeight) else weight
            self._planes = torch.from_numpy(unpack_planes(dense.planes, dense.cols).astype(np.int8) * 2 - 1)
            self.base = torch.from_numpy(decode_alphas(dense.alphas).astype(np.float32))
            if isinstance(weight, BCQOutlierWeight):
                corrections = (weight.dequantize() - dense.dequantize()).ravel()
                where = np.flatnonzero(corrections)
                self._extra = torch.from_numpy(where), torch.from_numpy(corrections[where])
            self._row_index = torch.arange(dense.rows) // dense.row_group
            self._col_index = torch.arange(dense.cols) // dense.col_group
        self.delta = torch.nn.Parameter(torch.zeros_like(self.base))

    @property
    def params(self) -> int:
        return int(self.base.numel())

    def matrix(self) -> torch.Tensor:
        """The float weight ``[rows, cols]`` for the current parameters (differentiable)."""
        inner = self._inner_matrix()
        if self._scatter is None or self._stored is None:
            return inner
        width = self._stored.shape[1]
        dense = torch.zeros(self.weight.rows * self.weight.cols, dtype=inner.dtype)
        dense = dense.index_put((self._scatter,), inner[:, :width][self._stored])
        return dense.reshape(self.weight.rows, self.weight.cols)

    def _inner_matrix(self) -> torch.Tensor:
        values = self.base * (1.0 + self.delta)
        if isinstance(self._inner, QuantizedWeight):
            values = values[..., None]  # one plane: [rows, groups, 1]
        matrix = _PlaneSum.apply(values, self._planes, self._row_index, self._col_index)
        if self._extra is None:
            return matrix
        where, corrections = self._extra
        return matrix.flatten().index_add(0, where, corrections).view_as(matrix)

    def overrides(self) -> dict[str, torch.Tensor]:
        """The student's decoded constants for the current parameters."""
        matrix = self.matrix()
        return {name: qops.float_operand(node, matrix) for name, node in self.targets}

    def stored(self) -> np.ndarray:
        """The parameters as the format stores them: scales in their dtype, alphas as APoT codes."""
        values = (self.base * (1.0 + self.delta)).detach().double().numpy()
        if isinstance(self._inner, QuantizedWeight):
            return values.astype(self._inner.scales.dtype)
        return apot_codes(values, self._inner.terms)

    def round_to_stored(self) -> None:
        """Set ``delta`` so the parameters are exactly what :meth:`stored` keeps."""
        stored = self.stored()
        values = stored.astype(np.float32) if isinstance(self._inner, QuantizedWeight) else decode_alphas(stored)
        base = self.base.numpy()
        with torch.no_grad():
            self.delta.copy_(torch.from_numpy(np.where(base != 0, values / np.where(base != 0, base, 1) - 1, 0)
                                              .astype(np.float32)))

    def change(self) -> float:
        """Mean relative change of the parameters."""
        return float(self.delta.detach().abs().mean())


def quant_scales(model, student_model, skip: tuple[str, ...] = ()) -> tuple[list[QuantScales], dict[str, str]]:
    """The trainable quantized weights of ``model`` (by their stored parameter constant), the
    student's decoded constants each one feeds, and the quantized nodes left frozen (with why).
    Weights read by a node matching ``skip`` are left out.

    ``student_model`` is ``model`` after :func:`qcompile.ir.qops.decode_to_float` (node names kept).
    """
    student_nodes = {n.name: n for n in student_model.graph.nodes}
    groups: dict[tuple[str, ...], list[gs.Node]] = {}
    frozen: dict[str, str] = {}
    for node in model.quantized_nodes():
        inputs = qops.weight_inputs(node)
        decoded = student_nodes.get(node.name)
        if decoded is None or decoded.op not in ("MatMul", "Gather", "Conv"):
            frozen[node.name] = "its weight is computed at run time"
        elif qops.node_format(node).name.split(".")[0] not in TRAINABLE_FORMATS:
            frozen[node.name] = f"format {qops.node_format(node).name} has no trainable scales"
        else:
            groups.setdefault(tuple(t.name for t in inputs), []).append(node)
    scales = []
    for key, nodes in groups.items():
        if any(matches_any(node.name, skip) for node in nodes):
            continue
        targets = []
        for node in nodes:
            decoded = student_nodes[node.name]
            constant = decoded.inputs[0] if decoded.op == "Gather" else decoded.inputs[1]
            targets.append((constant.name, node))
        scales.append(QuantScales(key[1], qops.read_weight(nodes[0]), targets))
    return scales, frozen
