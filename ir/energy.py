"""Energy per inference of a model's linear layers, from operation counts (45 nm unit costs).

ShiftAddLLM's estimate: count the arithmetic each linear layer needs per token and price it
with Horowitz's 45 nm figures. A ``bcq`` layer runs as the lookup-table computation of
:mod:`qcompile.ir.lut` (FP16 activations):

* block-wise alphas (``col_group`` a multiple of 8), per token: tables ``K/8 * 256`` FP16
  adds (shared by all rows); look-ups ``N * bits * K/8``; accumulating them ``N * bits * K/8``
  FP16 adds; per alpha group ``terms`` shifts and ``terms`` adds (``N * bits * K/col_group``
  groups);
* column-wise alphas (``col_group=1``): the activations are shifted first, per row group and
  plane (``K * terms`` shifts, ``K * (terms-1)`` adds), then tables for each (row group,
  plane), look-ups and accumulation as above.

A ``bcq_outliers`` layer adds, per stored correction, ``terms`` shifts and ``terms`` FP16 adds.

A look-up is one 8-bit table read (0.37 pJ) standing for the 8 multiply-adds of its block.
Float MatMul layers cost ``K * N`` FP32 multiply-adds; ``int`` layers ``K * N`` FP16
multiply-adds (dequantize then multiply). Attention's activation-activation products and
the other ops are the same in every variant and left out: this is the linear layers' energy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import qops
from .bcq import BCQWeight
from .bcq_outliers import BCQOutlierWeight
from .model import Model

PJ = {"fp32_mul": 3.7, "fp32_add": 0.9, "fp16_mul": 0.9, "fp16_add": 0.4, "int16_shift": 0.057, "lut8": 0.37}


@dataclass
class Operations:
    """Operation counts per token."""

    fp32_mul: float = 0.0
    fp32_add: float = 0.0
    fp16_mul: float = 0.0
    fp16_add: float = 0.0
    int16_shift: float = 0.0
    lut8: float = 0.0

    def __add__(self, other: Operations) -> Operations:
        return Operations(**{k: getattr(self, k) + getattr(other, k) for k in PJ})

    def picojoules(self) -> float:
        return float(sum(getattr(self, k) * cost for k, cost in PJ.items()))


def dense_operations(rows: int, cols: int, precision: str = "fp32") -> Operations:
    """``cols * rows`` multiply-adds per token at ``precision`` (fp32 or fp16)."""
    macs = float(rows) * cols
    return Operations(**{f"{precision}_mul": macs, f"{precision}_add": macs})


def bcq_operations(weight: BCQWeight | BCQOutlierWeight) -> Operations:
    """The lookup-table computation's operations per token (see the module docstring)."""
    if isinstance(weight, BCQOutlierWeight):
        corrections = float(weight.nnz) * weight.outlier_values.shape[2]
        return bcq_operations(weight.dense) + Operations(fp16_add=corrections, int16_shift=corrections)
    rows, cols, bits, terms = weight.rows, weight.cols, weight.bits, weight.terms
    blocks = -(-cols // 8)
    lookups = float(rows) * bits * blocks
    if weight.col_group % 8 == 0:
        groups = float(rows) * bits * -(-cols // weight.col_group)
        return Operations(fp16_add=blocks * 256 + lookups + groups * terms, int16_shift=groups * terms, lut8=lookups)
    row_groups = -(-rows // weight.row_group)
    tables = float(row_groups) * bits
    return Operations(fp16_add=tables * (cols * (terms - 1) + blocks * 256) + lookups,
                      int16_shift=tables * cols * terms, lut8=lookups)


def _float_weight(node: gs.Node) -> tuple[int, int] | None:
    """(rows, cols) of a float MatMul/Gemm with a constant 2-D weight."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    shape = list(node.inputs[1].shape or ())
    if len(shape) != 2:
        return None
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return int(shape[0]), int(shape[1])
    return int(shape[1]), int(shape[0])


def model_energy(model: Model) -> dict:
    """Per token: pJ of the linear layers as they are, and of the same layers in FP32 / FP16."""
    actual, fp32, fp16 = Operations(), Operations(), Operations()
    for node in model.graph.nodes:
        if qops.is_quantized(node) and node.op == "QMatMul":
            weight = qops.read_weight(node)
            shape = (weight.rows, weight.cols)
            actual += bcq_operations(weight) if isinstance(weight, BCQWeight | BCQOutlierWeight) else dense_operations(*shape, "fp16")
        else:
            found = _float_weight(node)
            if found is None:
                continue
            shape = found
            actual += dense_operations(*shape)
        fp32 += dense_operations(*shape)
        fp16 += dense_operations(*shape, "fp16")
    pj, pj32, pj16 = actual.picojoules(), fp32.picojoules(), fp16.picojoules()
    return {"pj_per_token": pj, "fp32_pj_per_token": pj32, "fp16_pj_per_token": pj16,
            "ratio": pj / pj32 if pj32 else None, "ratio_fp16": pj / pj16 if pj16 else None,
            "operations": {k: float(np.round(getattr(actual, k))) for k in PJ}}
