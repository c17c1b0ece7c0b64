"""What a model holds, layer by layer: the data behind ``qcompile inspect``, reports and ``--explain``.

A *layer* is a node with a constant weight: a quantized node of the ``qcompile``
domain (``QMatMul``, ``QGather``, ``QConv``) or a float ``MatMul``/``Gemm``/``Conv``/
``Gather`` whose weight is an initializer. Shapes are given the way the IR's
quantized formats see a weight: ``[out, in]`` (reduction axis last) for matrix
layers, ``[vocab, dim]`` for embeddings, the kernel shape for convolutions, so that
the same layer reads the same before and after quantization.

Everything here returns JSON-serialisable dicts; nothing prints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir import qops
from qcompile.ir.formats import FORMATS
from qcompile.ir.model import Model

FLOAT_LAYER_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}  # op -> position of the weight
EMBEDDING_OPS = ("Gather", "QGather")
QUANT_MIN_SIZE = 1024  # quant's default min_size: smaller layers stay in float
OUTLIER_KURTOSIS = 10.0  # Pearson kurtosis (3 for a Gaussian) above which a layer is flagged
OUTLIER_MAX_STD = 12.0  # max |w - mean| / std above which a layer is flagged


def float_weight(node: gs.Node) -> gs.Constant | None:
    """The constant float weight of a MatMul/Gemm/Conv/Gather layer, or None."""
    position = FLOAT_LAYER_OPS.get(node.op)
    if position is None or node.domain not in ("", "ai.onnx", None) or len(node.inputs) <= position:
        return None
    weight = node.inputs[position]
    if not isinstance(weight, gs.Constant) or weight.values is None:
        return None
    ndim = len(weight.shape or ())
    wanted = ndim >= 3 if node.op == "Conv" else ndim == 2
    return weight if wanted else None


def weight_matrix(node: gs.Node, values: np.ndarray) -> np.ndarray:
    """A float layer's weight as the quantized formats see it (see the module docstring)."""
    if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        return values.T
    return values


def weight_values(node: gs.Node) -> np.ndarray | None:
    """The layer's weight as float: dequantized for quantized nodes; None if not a layer."""
    if qops.is_quantized(node):
        matrix = qops.read_weight(node).dequantize()
        if node.op == "QConv" and "weight_shape" in node.attrs:
            return matrix.reshape([int(d) for d in node.attrs["weight_shape"]])
        return matrix
    weight = float_weight(node)
    if weight is None:
        return None
    return weight_matrix(node, np.asarray(weight.values))


def weight_statistics(values: np.ndarray) -> dict[str, float]:
    """Sparsity (exact zeros), Pearson kurtosis and max |w - mean| / std of a weight."""
    flat = np.asarray(values, np.float64).reshape(-1)
    if flat.size == 0:
        return {"sparsity": 0.0, "kurtosis": float("nan"), "max_over_std": float("nan")}
    centred = flat - flat.mean()
    variance = float(np.mean(centred**2))
    if variance == 0.0:
        kurtosis, max_over_std = float("nan"), float("nan")
    else:
        kurtosis = float(np.mean(centred**4) / variance**2)
        max_over_std = float(np.abs(centred).max() / np.sqrt(variance))
    return {
        "sparsity": float(np.count_nonzero(flat == 0.0) / flat.size),
        "kurtosis": kurtosis,
        "max_over_std": max_over_std,
    }


def layer_table(model: Model) -> dict[str, Any]:
    """Per-layer rows and totals for ``qcompile inspect``.

    Each row: ``op``, ``shape``, ``params``, ``format`` (``int`` or the float dtype),
    ``bits``, ``group_size`` (None in float), ``sparsity``, ``bytes``, ``share`` (of every
    initializer byte), and for float layers ``kurtosis``, ``max_over_std``, ``outlier``
    and ``quantizable`` (what ``quant`` with its defaults would do: ``"yes"`` or why not).
    """
    total_bytes = model.constant_bytes()
    rows: dict[str, dict[str, Any]] = {}
    counted: set[str] = set()  # a weight shared by two layers counts once
    for node in model.graph.nodes:
        if qops.is_quantized(node):
            rows[node.name] = _quantized_row(node, counted)
        elif float_weight(node) is not None:
            rows[node.name] = _float_row(node, counted)
    for row in rows.values():
        row["share"] = row["bytes"] / total_bytes if total_bytes else 0.0
    layer_bytes = sum(row["bytes"] for row in rows.values())
    quantized = [row for row in rows.values() if row["format"] in FORMATS]
    return {
        "layers": rows,
        "totals": {
            "layers": len(rows),
            "quantized_layers": len(quantized),
            "params": sum(row["params"] for row in rows.values()),
            "layer_bytes": layer_bytes,
            "other_bytes": total_bytes - layer_bytes,
            "weight_bytes": total_bytes,
            "sizes": size_breakdown(model),
        },
        "outliers": sorted((name for name, row in rows.items() if row.get("outlier")),
                           key=lambda name: -rows[name]["kurtosis"]),
    }


def _quantized_row(node: gs.Node, counted: set[str]) -> dict[str, Any]:
    weight = qops.read_weight(node)
    shape = ([int(d) for d in node.attrs["weight_shape"]] if node.op == "QConv" and "weight_shape" in node.attrs
             else [weight.rows, weight.cols])
    names = [t.name for t in qops.weight_inputs(node)]
    row = {
        "op": node.op,
        "shape": shape,
        "params": int(np.prod(shape)),
        "bits": weight.bits,
        "group_size": weight.group_size,
        "sym": bool(node.attrs.get("sym", 0)),
        **qops.describe(node),
        "bytes": weight.nbytes if not counted.intersection(names) else 0,
    }
    counted.update(names)
    row.update(sparsity=weight_statistics(weight.dequantize())["sparsity"])
    return row


def _float_row(node: gs.Node, counted: set[str]) -> dict[str, Any]:
    weight = float_weight(node)
    assert weight is not None
    values = np.asarray(weight.values)
    matrix = weight_matrix(node, values)
    row: dict[str, Any] = {
        "op": node.op,
        "shape": list(matrix.shape),
        "params": int(values.size),
        "format": str(values.dtype),
        "bits": int(values.dtype.itemsize * 8),
        "group_size": None,
        "bytes": int(values.nbytes) if weight.name not in counted else 0,
    }
    counted.add(weight.name)
    stats = weight_statistics(values)
    row.update(stats)
    row["outlier"] = bool(stats["kurtosis"] > OUTLIER_KURTOSIS or stats["max_over_std"] > OUTLIER_MAX_STD)
    row["quantizable"] = _quantizable(node, values)
    return row


def float_layers(model: Model) -> dict[str, dict[str, Any]]:
    """The layers still in float: ``op``, ``shape`` (as in :func:`layer_table`), ``bytes``."""
    layers = {}
    for node in model.graph.nodes:
        weight = float_weight(node)
        if weight is not None:
            values = np.asarray(weight.values)
            layers[node.name] = {"op": node.op, "shape": list(weight_matrix(node, values).shape),
                                 "bytes": int(values.nbytes)}
    return layers


def _quantizable(node: gs.Node, values: np.ndarray) -> str:
    """What ``quant`` with its default options would do with this layer."""
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "no: Gemm with transA=1"
    if node.op == "Gather" and node.attrs.get("axis", 0) != 0:
        return "no: Gather on an axis other than 0"
    if values.dtype != np.float32:
        return f"no: weight dtype {values.dtype}"
    if values.size < QUANT_MIN_SIZE:
        return f"no: {values.size} weights < min_size={QUANT_MIN_SIZE}"
    if not np.isfinite(values).all():
        return "no: weight holds NaN or Inf"
    return "yes"


def size_breakdown(model: Model) -> dict[str, int]:
    """Initializer bytes by kind: packed weights, scales + zero points, embeddings, other float.

    ``embeddings`` are the tables of ``Gather``/``QGather`` layers (packed, scales and zero
    points included when quantized); ``packed`` (with a sparse weight's metadata) and
    ``scales_zero_points`` are those of the other quantized layers; ``other`` is every remaining initializer. They add up to
    :meth:`Model.constant_bytes`.
    """
    kinds: dict[str, str] = {}
    for node in model.graph.nodes:
        if qops.is_quantized(node):
            packed, *parameters = qops.weight_inputs(node)  # e.g. scales + zero points, or bcq alphas
            embedding = node.op in EMBEDDING_OPS
            kinds.setdefault(packed.name, "embeddings" if embedding else "packed")
            for tensor in parameters:
                kinds.setdefault(tensor.name, "embeddings" if embedding else "scales_zero_points")
            for tensor in qops.weight_inputs(node)[3:]:  # a sparse layout's bitmask / N:M positions
                kinds.setdefault(tensor.name, "embeddings" if embedding else "packed")
        elif node.op == "Gather" and float_weight(node) is not None:
            kinds.setdefault(node.inputs[0].name, "embeddings")
    sizes = {"packed": 0, "scales_zero_points": 0, "embeddings": 0, "other": 0}
    for name, tensor in model.tensors().items():
        if isinstance(tensor, gs.Constant):
            shape = tensor.shape or ()
            sizes[kinds.get(name, "other")] += int(np.prod(shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
    return sizes


def skipped_layers(passes: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every layer a pass left alone, with the reason, from the passes' JSON records."""
    return [
        {"pass": record.get("spec", record.get("name", "?")), "layer": layer, "reason": str(reason)}
        for record in passes
        for layer, reason in (record.get("stats", {}).get("skipped") or {}).items()
    ]


def final_layer_stats(passes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per layer, the stats of the last pass that rewrote it (``stats["layers"]``)."""
    merged: dict[str, dict[str, Any]] = {}
    for record in passes:
        for layer, stats in (record.get("stats", {}).get("layers") or {}).items():
            merged[layer] = {**merged.get(layer, {}), **stats, "pass": record.get("spec", record.get("name"))}
    return merged


def short_names(names: list[str]) -> dict[str, str]:
    """Readable labels for layer names: the common path prefix and a trailing op name dropped.

    ``/encoder/encoder/layer.0/attention/self/query/MatMul`` among its siblings becomes
    ``encoder/layer.0/attention/self/query``.
    """
    parts = {name: [p for p in name.split("/") if p] for name in names}
    if len(names) > 1:
        common = 0
        lists = list(parts.values())
        shortest = min(len(p) for p in lists)
        while common < shortest - 1 and len({tuple(p[: common + 1]) for p in lists}) == 1:
            common += 1
        parts = {name: p[common:] for name, p in parts.items()}
    labels = {}
    for name, pieces in parts.items():
        if len(pieces) > 1 and pieces[-1].split("_")[0] in (*FLOAT_LAYER_OPS, *qops.QUANTIZED_OPS):
            pieces = pieces[:-1]
        labels[name] = "/".join(pieces) or name
    if len(set(labels.values())) < len(labels):  # shortening made two names equal
        return {name: name for name in names}
    return labels
