"""Differences between two models: structural (nodes, initializers, quantized layers) and numerical.

Nodes are matched by name, then the remaining ones by their first output (a pass
that rebuilds a node usually keeps the value it produces; a model whose nodes have
no names still matches its canonical form). A matched node whose op type or domain
changed is *replaced*; one whose inputs or outputs changed is *rewired*. Changes
are grouped by layer: a node whose name extends another changed node's name
(``fc3/bias`` beside ``fc3``) belongs to that layer. An initializer that a matched
node now reads in place of another one of the same shape (``wq`` -> ``wq.smoothed``)
is reported as *replaced*, with the error between the two.

The numerical diff runs both models in ONNX Runtime on the same samples and compares
every model output and every intermediate float tensor that has the same name in
both (a quantized layer keeps its output's name, so this is the error per layer),
streaming: nothing but running sums is kept per tensor.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import UsageError
from qcompile.ir import qops, runtime
from qcompile.ir.model import Model
from qcompile.passes.calibration import CalibrationSet, model_inputs

from .inspection import float_weight, weight_matrix

log = logging.getLogger(__name__)

TENSORS_PER_RUN = 256  # intermediate tensors fetched per ONNX Runtime session


# ----------------------------------------------------------------------------------
# structural
# ----------------------------------------------------------------------------------


def structural_diff(before: Model, after: Model) -> dict[str, Any]:
    """Nodes added, removed, replaced, rewired; initializers; newly quantized layers."""
    pairs, removed, added = _match_nodes(before.graph.nodes, after.graph.nodes)
    changes = [c for c in (_node_change(old, new) for old, new in pairs) if c is not None]
    changes += [{"node": n.name, "change": "removed", "op_before": n.op, "op_after": None} for n in removed]
    changes += [{"node": n.name, "change": "added", "op_before": None, "op_after": n.op} for n in added]
    layers = _layer_names([c["node"] for c in changes])
    for change in changes:
        change["layer"] = layers[change["node"]]
    rank = {"replaced": 0, "rewired": 1, "attributes": 2, "added": 3, "removed": 4}
    layer_rank: dict[str, int] = {}
    for change in changes:
        layer_rank[change["layer"]] = min(layer_rank.get(change["layer"], 9), rank[change["change"]])
    changes.sort(key=lambda c: (layer_rank[c["layer"]], c["layer"], rank[c["change"]], c["node"]))
    initializers = _initializer_changes(before, after, pairs)
    return {
        "nodes": changes,
        "by_op": dict(sorted(Counter(_op_transition(c) for c in changes).items())),
        "initializers": initializers,
        "weight_bytes": {"before": before.constant_bytes(), "after": after.constant_bytes()},
        "quantized": _quantized_changes(before, after),
        "graph_inputs": _name_changes(before.graph.inputs, after.graph.inputs),
        "graph_outputs": _name_changes(before.graph.outputs, after.graph.outputs),
        "unchanged": not changes and not initializers,
    }


def _match_nodes(before: list[gs.Node], after: list[gs.Node]):
    by_name = {n.name: n for n in after if n.name}
    pairs, unmatched = [], []
    used: set[int] = set()
    for node in before:
        other = by_name.get(node.name) if node.name else None
        if other is not None and id(other) not in used:
            pairs.append((node, other))
            used.add(id(other))
        else:
            unmatched.append(node)
    by_output = {n.outputs[0].name: n for n in after if n.outputs and id(n) not in used}
    removed = []
    for node in unmatched:
        other = by_output.get(node.outputs[0].name) if node.outputs else None
        if other is not None and id(other) not in used:
            pairs.append((node, other))
            used.add(id(other))
        else:
            removed.append(node)
    added = [n for n in after if id(n) not in used]
    return pairs, removed, added


def _node_change(old: gs.Node, new: gs.Node) -> dict[str, Any] | None:
    change: dict[str, Any] = {"node": new.name or old.name, "op_before": old.op, "op_after": new.op}
    inputs = ([t.name for t in old.inputs], [t.name for t in new.inputs])
    outputs = ([t.name for t in old.outputs], [t.name for t in new.outputs])
    if (old.op, old.domain or "") != (new.op, new.domain or ""):
        change["change"] = "replaced"
    elif inputs[0] != inputs[1] or outputs[0] != outputs[1]:
        change["change"] = "rewired"
    elif _attr_text(old.attrs) != _attr_text(new.attrs):
        change["change"] = "attributes"
    else:
        return None
    if inputs[0] != inputs[1]:
        change["inputs"] = {"before": inputs[0], "after": inputs[1]}
    if outputs[0] != outputs[1]:
        change["outputs"] = {"before": outputs[0], "after": outputs[1]}
    if _attr_text(old.attrs) != _attr_text(new.attrs):
        change["attributes"] = {"before": _attr_text(old.attrs), "after": _attr_text(new.attrs)}
    return change


def _attr_text(attrs: dict) -> dict[str, str]:
    def text(value) -> str:
        if isinstance(value, gs.Tensor):
            return f"tensor {value.name}"
        if isinstance(value, np.ndarray):
            return str(value.tolist())
        return str(value)

    return {key: text(value) for key, value in sorted(attrs.items())}


def _op_transition(change: dict[str, Any]) -> str:
    if change["change"] == "added":
        return f"+ {change['op_after']}"
    if change["change"] == "removed":
        return f"- {change['op_before']}"
    if change["change"] == "replaced":
        return f"{change['op_before']} -> {change['op_after']}"
    return f"{change['op_after']} ({change['change']})"


def _layer_names(nodes: list[str]) -> dict[str, str]:
    """Each changed node's layer: the longest other changed node name its name extends."""
    names = set(nodes)
    layers = {}
    for name in nodes:
        pieces = name.split("/")
        layer = name
        for cut in range(len(pieces) - 1, 0, -1):
            prefix = "/".join(pieces[:cut])
            if prefix in names:
                layer = prefix
                break
        layers[name] = layer
    return layers


def _name_changes(before: list[gs.Tensor], after: list[gs.Tensor]) -> dict[str, list[str]]:
    old, new = [t.name for t in before], [t.name for t in after]
    return {"added": [n for n in new if n not in old], "removed": [n for n in old if n not in new]}


def _initializers(model: Model) -> dict[str, gs.Constant]:
    return {name: t for name, t in model.tensors().items() if isinstance(t, gs.Constant)}


def _initializer_changes(before: Model, after: Model, pairs) -> list[dict[str, Any]]:
    old, new = _initializers(before), _initializers(after)
    changes = []
    renamed = _renamed_initializers(old, new, pairs)
    for old_name, new_name in renamed.items():
        entry = {"name": new_name, "change": "replaced", "was": old_name, **_describe(new[new_name]),
                 "before": _describe(old[old_name])}
        entry["error"] = _rounded(runtime.error_metrics(old[old_name].values, new[new_name].values))
        changes.append(entry)
    paired = set(renamed) | set(renamed.values())
    for name in sorted((old.keys() | new.keys()) - paired):
        if name not in new:
            changes.append({"name": name, "change": "removed", **_describe(old[name])})
        elif name not in old:
            changes.append({"name": name, "change": "added", **_describe(new[name])})
        else:
            a, b = np.asarray(old[name].values), np.asarray(new[name].values)
            if a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True):
                continue
            entry = {"name": name, "change": "changed", **_describe(new[name]), "before": _describe(old[name])}
            if a.shape == b.shape and a.dtype.kind == "f" and b.dtype.kind == "f":
                entry["error"] = _rounded(runtime.error_metrics(a, b))
            changes.append(entry)
    return sorted(changes, key=lambda c: (-c["bytes"], c["name"]))


def _renamed_initializers(old: dict[str, gs.Constant], new: dict[str, gs.Constant], pairs) -> dict[str, str]:
    """Initializers a pass replaced by new ones of the same shape (float -> float), found
    at the same input position of matched nodes: ``{old name: new name}``."""
    renamed: dict[str, str] = {}
    taken: set[str] = set()
    for old_node, new_node in pairs:
        for a, b in zip(old_node.inputs, new_node.inputs, strict=False):
            if a.name == b.name or a.name not in old or b.name not in new or a.name in new or b.name in old:
                continue
            if a.name in renamed or b.name in taken:
                continue
            va, vb = np.asarray(old[a.name].values), np.asarray(new[b.name].values)
            if va.shape == vb.shape and va.dtype.kind == "f" and vb.dtype.kind == "f":
                renamed[a.name] = b.name
                taken.add(b.name)
    return renamed


def _describe(tensor: gs.Constant) -> dict[str, Any]:
    values = np.asarray(tensor.values)
    info: dict[str, Any] = {"shape": list(values.shape), "dtype": str(values.dtype), "bytes": int(values.nbytes)}
    if values.size and values.dtype.kind in "fiub":
        flat = values.reshape(-1).astype(np.float64)
        info["stats"] = _rounded({
            "min": float(flat.min()), "max": float(flat.max()),
            "mean": float(flat.mean()), "std": float(flat.std()),
            "zeros": float(np.count_nonzero(flat == 0) / flat.size),
        })
    return info


def _quantized_changes(before: Model, after: Model) -> list[dict[str, Any]]:
    """Quantized layers of ``after`` that are new or stored differently than in ``before``."""
    old_nodes = {n.name: n for n in before.graph.nodes}
    result = []
    for node in after.quantized_nodes():
        weight = qops.read_weight(node)
        entry: dict[str, Any] = {
            "node": node.name, "op": node.op, "bits": weight.bits, "group_size": weight.group_size,
            **qops.describe(node),
            "shape": [weight.rows, weight.cols], "bytes": weight.nbytes,
        }
        old = old_nodes.get(node.name)
        if old is not None and qops.is_quantized(old):
            previous = qops.read_weight(old)
            if qops.same_weight(old, node):
                continue
            entry["was"] = f"{old.op} {old.attrs.get('format', 'int')}{previous.bits} g{previous.group_size}"
            entry["weight_sqnr_db"] = _weight_sqnr(previous.dequantize(), weight)
        elif old is not None:
            entry["was"] = old.op
            source = float_weight(old)
            if source is not None:
                entry["bytes_before"] = int(np.asarray(source.values).nbytes)
                matrix = weight_matrix(old, np.asarray(source.values))
                if old.op == "Gemm":  # quant folds alpha into the weight
                    matrix = matrix * float(old.attrs.get("alpha", 1.0))
                entry["weight_sqnr_db"] = _weight_sqnr(matrix.reshape(matrix.shape[0], -1), weight)
        result.append(entry)
    return result


def _weight_sqnr(reference: np.ndarray, weight) -> float | None:
    recon = weight.dequantize()
    if reference.shape != recon.shape:
        return None
    return _round(runtime.error_metrics(reference, recon)["sqnr_db"])


# ----------------------------------------------------------------------------------
# numerical
# ----------------------------------------------------------------------------------


@dataclass
class _Sums:
    """Running sums from which cosine, SQNR and max-abs error follow."""

    dot: float = 0.0
    ref_sq: float = 0.0
    act_sq: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0
    elements: int = 0
    mismatch: bool = False

    def add(self, reference: np.ndarray, actual: np.ndarray) -> None:
        if reference.shape != actual.shape:
            self.mismatch = True
            return
        ref = reference.astype(np.float64).reshape(-1)
        act = actual.astype(np.float64).reshape(-1)
        delta = ref - act
        self.dot += float(ref @ act)
        self.ref_sq += float(ref @ ref)
        self.act_sq += float(act @ act)
        self.noise += float(delta @ delta)
        self.max_abs = max(self.max_abs, float(np.abs(delta).max(initial=0.0)))
        self.elements += ref.size

    def metrics(self) -> dict[str, Any]:
        if self.mismatch:
            return {"cosine": None, "sqnr_db": None, "max_abs": None, "note": "shapes differ"}
        denom = math.sqrt(self.ref_sq * self.act_sq)
        cosine = self.dot / denom if denom > 0 else (1.0 if self.noise == 0 else 0.0)
        sqnr = math.inf if self.noise == 0 else 10.0 * math.log10(max(self.ref_sq, 1e-30) / self.noise)
        return {"cosine": _round(cosine, 6), "sqnr_db": _round(sqnr), "max_abs": float(f"{self.max_abs:.6g}")}


def numerical_diff(before: Model, after: Model, samples: CalibrationSet) -> dict[str, Any]:
    """Per model output and per intermediate float tensor present in both: error of ``after``.

    Entries are sorted worst first (lowest SQNR). ``samples`` are run one at a time.
    """
    inputs_a = {t.name for t in model_inputs(before)}
    inputs_b = {t.name for t in model_inputs(after)}
    if inputs_a != inputs_b:
        raise UsageError(f"the models have different inputs ({', '.join(sorted(inputs_a))} vs "
                         f"{', '.join(sorted(inputs_b))}): no numerical diff")
    outputs = [t.name for t in before.graph.outputs if t.name in {o.name for o in after.graph.outputs}]
    intermediates = _shared_tensors(before, after, set(outputs))
    sums: dict[str, _Sums] = {name: _Sums() for name in outputs + intermediates}
    chunks = [outputs] if outputs else []
    chunks += [intermediates[i : i + TENSORS_PER_RUN] for i in range(0, len(intermediates), TENSORS_PER_RUN)]
    for chunk in chunks:
        session_a = runtime.make_session(before, extra_outputs=chunk)
        session_b = runtime.make_session(after, extra_outputs=chunk)
        for feed in samples.batches(1):
            values_a = session_a.run(chunk, feed)
            values_b = session_b.run(chunk, feed)
            for name, a, b in zip(chunk, values_a, values_b, strict=True):
                a, b = np.asarray(a), np.asarray(b)
                if a.dtype.kind == "f" and b.dtype.kind == "f":
                    sums[name].add(a, b)
    def rows(names: list[str]) -> list[dict[str, Any]]:
        found = [{"tensor": name, **sums[name].metrics()} for name in names if sums[name].elements
                 or sums[name].mismatch]
        return sorted(found, key=_badness)

    return {
        "samples": samples.source,
        "synthetic": samples.synthetic,
        "n_samples": samples.n_samples,
        "outputs": rows(outputs),
        "tensors": rows(intermediates),
    }


def _shared_tensors(before: Model, after: Model, exclude: set[str]) -> list[str]:
    """Node outputs with the same name in both models that may be float, in ``before``'s order."""
    produced_after = {t.name: t for node in after.graph.nodes for t in node.outputs}
    names = []
    for node in before.graph.nodes:
        for tensor in node.outputs:
            other = produced_after.get(tensor.name)
            if other is None or not tensor.name or tensor.name in exclude:
                continue
            if all(_maybe_float(t) for t in (tensor, other)):
                names.append(tensor.name)
    return list(dict.fromkeys(names))


def _maybe_float(tensor: gs.Tensor) -> bool:
    if tensor.dtype is None:
        return True
    try:
        return np.dtype(tensor.dtype).kind == "f"
    except TypeError:
        return False


def _badness(row: dict[str, Any]) -> tuple:
    sqnr = row.get("sqnr_db")
    return (sqnr is not None, sqnr if sqnr is not None else 0.0, row["tensor"])


def _round(value: float | None, digits: int = 2) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return round(value, digits)


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {key: float(f"{value:.6g}") if math.isfinite(value) else value for key, value in metrics.items()}
