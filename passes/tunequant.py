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
from qcompile.ir.bcq import BCQWeight, decode_alphas
from qcompile.ir.bcq_outliers import BCQOutlierWeight
from qcompile.ir.qformat import QuantizedWeight, unpack_codes
from qcompile.ir.sparse import SparseWeight

from .base import matches_any
from .bcqfit import apot_codes

TRAINABLE_FORMATS = ("int", "bcq", "bcq_outliers")  # also inside sparse storage


@dataclass
class QuantScales:
    """One quantized weight (possibly read by several nodes: a tied table and LM head)."""

    name: str  # the stored parameter constant (scales or alpha codes)
    weight: QuantizedWeight | BCQWeight | BCQOutlierWeight | SparseWeight
    targets: list[tuple[str, gs.Node]]  # (decoded constant in the student, the quantized node it replaces)
    base: torch.Tensor = field(init=False)  # the stored parameters as float32
    delta: torch.nn.Parameter = field(init=False)
    _codes: torch.Tensor = field(init=False)  # int: centred codes [rows, groups, group]; bcq: signs [rows, bits, cols]
    _extra: torch.Tensor | None = field(init=False, default=None)  # bcq_outliers: the corrections [rows, cols]
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
            centred = codes.astype(np.float32) - weight.zero_points[..., None].astype(np.float32)
            self._codes = torch.from_numpy(centred)
            self.base = torch.from_numpy(np.asarray(weight.scales, np.float32))
        else:
            dense = weight.dense if isinstance(weight, BCQOutlierWeight) else weight
            self._codes = torch.from_numpy(dense.signs())
            self.base = torch.from_numpy(decode_alphas(dense.alphas).astype(np.float32))
            if isinstance(weight, BCQOutlierWeight):
                self._extra = torch.from_numpy(weight.dequantize() - dense.dequantize())
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
        inner = self._inner
        if isinstance(inner, QuantizedWeight):
            flat = (self._codes * values[..., None]).reshape(inner.rows, -1)
            return flat[:, : inner.cols]
        expanded = values[self._row_index][:, self._col_index].permute(0, 2, 1)  # [rows, bits, cols]
        matrix = (expanded * self._codes).sum(1)
        return matrix if self._extra is None else matrix + self._extra

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
