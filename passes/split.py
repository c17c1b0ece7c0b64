"""``split``: exact outlier splitting before quantization.

* ``method=kmeans`` (SplitQuant, 2025): the values of each MatMul/Gemm weight (each
  output filter of a Conv) are clustered by 1-D k-means (``k`` = 3: low outliers, the
  bulk, high outliers); the layer becomes ``k`` layers on the masked parts
  ``W_i = W * [W in cluster i]``, which share the input and whose outputs are added.
  The parts sum to ``W`` exactly. ``quant`` then recognises the group and stores it as
  one ``cluster``-format op (:mod:`qcompile.ir.cluster`): one code per weight on its
  cluster's own, much narrower grid, plus a cluster id (1.6 bits for k=3), instead of
  ``k`` mostly-zero matrices.
* ``method=ocs`` (Outlier Channel Splitting, 2019): the ``ceil(expand_ratio * K)`` input
  channels with the largest weight magnitude are halved and duplicated (picked one at
  a time, so a channel may be split again), and the input is widened to match with
  ``Concat(X, Gather(X, channels, axis=-1))``. MatMul/Gemm only.

Layers whose outlier ratio ``max|W| / std(W)`` is below ``min_outlier_ratio`` are left
alone; stats give every layer's ratio and what was done. Biases stay on the first part
(biases are never quantized, so clustering them would change nothing). Exact: outputs
are unchanged up to float round-off, checked with ONNX Runtime in tests and by
``--verify``. Running it twice changes nothing the second time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir.model import Model

from .base import Pass, PassResult, matches_any, option
from .context import PassContext
from .layers import as_rows, unsupported_reason, weight_of

log = logging.getLogger(__name__)

GROUPS_KEY = "qcompile.split"  # model metadata: JSON {layer: {"parts": [...], "sums": [...], "k": k}}
SPLIT_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class Split(Pass):
    """SplitQuant k-means splitting or Outlier Channel Splitting of weights (exact)."""

    name: ClassVar[str] = "split"
    summary: ClassVar[str] = "exact: split weights into k-means value clusters (SplitQuant) or split outlier channels (OCS)"
    exact: ClassVar[bool] = True

    method: str = option("kmeans", "kmeans = SplitQuant value clusters; ocs = outlier channel splitting",
                         choices=("kmeans", "ocs"))
    k: int = option(3, "kmeans: clusters per weight (3 = low outliers, bulk, high outliers)", min=2, max=4)
    expand_ratio: float = option(0.02, "ocs: input channels added, as a fraction of K", min=0.0, max=1.0)
    min_outlier_ratio: float = option(0.0, "leave layers alone whose max|W| / std(W) is below this "
                                      "(0 = split every layer)", min=0.0)
    skip: tuple[str, ...] = option((), "node-name glob patterns left alone, separated by |")
    min_size: int = option(1024, "layers with fewer weights are left alone", min=0)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        groups = split_groups(model)
        layers: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        for node in [n for n in model.graph.nodes if n.op in SPLIT_OPS and weight_of(n) is not None]:
            reason = self._skip_reason(model, node, groups)
            if reason:
                skipped[node.name] = reason
                continue
            values = np.asarray(weight_of(node).values, np.float32)  # type: ignore[union-attr]
            ratio = outlier_ratio(values)
            if ratio < self.min_outlier_ratio:
                skipped[node.name] = f"outlier ratio {ratio:.1f} < min_outlier_ratio={self.min_outlier_ratio}"
                continue
            if self.method == "kmeans":
                layers[node.name] = self._split_kmeans(model, node, groups, ctx)
            else:
                layers[node.name] = self._split_channels(model, node)
            layers[node.name]["outlier_ratio"] = round(ratio, 2)
        if layers:
            model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
            if groups:
                model.metadata[GROUPS_KEY] = json.dumps(groups, sort_keys=True)
        return PassResult(bool(layers), {"method": self.method, "layers": layers, "skipped": skipped,
                                         "split": len(layers)})

    def _skip_reason(self, model: Model, node: gs.Node, groups: dict) -> str | None:
        pattern = matches_any(node.name, self.skip)
        if pattern:
            return f"excluded by skip pattern {pattern!r}"
        if model.provenance.get(node.name) == self.name or any(node.name in g["parts"] for g in groups.values()):
            return "already split"
        weight = weight_of(node)
        assert weight is not None
        if self.method == "ocs":
            if node.op == "Conv":
                return "ocs splits MatMul/Gemm input channels only"
        return unsupported_reason(node, weight, self.min_size)

    # -- SplitQuant --------------------------------------------------------------------

    def _split_kmeans(self, model: Model, node: gs.Node, groups: dict, ctx: PassContext) -> dict:
        weight = weight_of(node)
        assert weight is not None
        values = np.asarray(weight.values, np.float32)
        rows = as_rows(node, values)
        per_row = node.op == "Conv"  # SplitQuant clusters each Conv filter on its own
        thresholds = kmeans_thresholds(rows, self.k, per_row, ctx.rng(node.name))
        ids = cluster_ids(rows, thresholds)
        output = node.outputs[0]
        parts, sums, partial = [], [], None
        for cluster in range(self.k):
            mask = ids == cluster
            part_rows = np.where(mask, rows, 0.0).astype(np.float32)
            part = node.copy()  # same op and attributes, inputs/outputs replaced below
            part.name = f"{node.name}/split{cluster}"
            part_out = gs.Variable(f"{output.name}/split{cluster}", output.dtype, output.shape)
            part.inputs = [node.inputs[0], gs.Constant(f"{weight.name}.split{cluster}", _from_rows(node, part_rows,
                                                                                                  values.shape))]
            if cluster == 0 and len(node.inputs) > 2:
                part.inputs.append(node.inputs[2])  # the bias stays on the first part
            part.outputs = [part_out]
            parts.append(part)
            if partial is None:
                partial = part_out
                continue
            last = cluster == self.k - 1
            total = output if last else gs.Variable(f"{output.name}/split_sum{cluster}", output.dtype, output.shape)
            sums.append(gs.Node("Add", f"{node.name}/split_sum{cluster}", inputs=[partial, part_out], outputs=[total]))
            partial = total
        index = model.graph.nodes.index(node)
        node.inputs.clear()
        node.outputs.clear()
        model.graph.nodes[index : index + 1] = [*parts, *sums]
        for new in (*parts, *sums):
            model.mark(new, self.name)
        groups[node.name] = {"parts": [p.name for p in parts], "sums": [s.name for s in sums], "k": self.k}
        fractions = [float((ids == c).mean()) for c in range(self.k)]
        span = float(rows.max() - rows.min())
        widest = max(_cluster_span(rows, ids, c) for c in range(self.k))
        return {"op": node.op, "shape": list(rows.shape), "fractions": [round(f, 4) for f in fractions],
                "range_gain": round(span / widest, 2) if widest > 0 else 1.0}

    # -- OCS ---------------------------------------------------------------------------

    def _split_channels(self, model: Model, node: gs.Node) -> dict:
        weight = weight_of(node)
        assert weight is not None
        values = np.asarray(weight.values, np.float32)
        transposed = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        by_channel = (values.T if transposed else values).astype(np.float64)  # [K, N]: row j meets channel j
        n_split = int(np.ceil(self.expand_ratio * by_channel.shape[0]))
        before = float(np.abs(by_channel).max())
        channels: list[int] = []
        magnitude = np.abs(by_channel).max(axis=1)
        rows = list(by_channel)
        for _ in range(n_split):
            j = int(np.argmax(magnitude))
            rows[j] = rows[j] / 2
            rows.append(rows[j].copy())
            source = j if j < by_channel.shape[0] else channels[j - by_channel.shape[0]]
            channels.append(source)
            magnitude[j] /= 2
            magnitude = np.append(magnitude, magnitude[j])
        widened = np.stack(rows).astype(np.float32)
        x = node.inputs[0]
        picked = gs.Variable(f"{x.name}/{node.name}/ocs_channels", x.dtype)
        wide = gs.Variable(f"{x.name}/{node.name}/ocs", x.dtype)
        gather = gs.Node("Gather", f"{node.name}/ocs_gather", {"axis": -1},
                         [x, gs.Constant(f"{node.name}.ocs_channels", np.array(channels, np.int64))], [picked])
        concat = gs.Node("Concat", f"{node.name}/ocs_concat", {"axis": -1}, [x, picked], [wide])
        node.inputs[0] = wide
        node.inputs[1] = gs.Constant(f"{weight.name}.ocs", np.ascontiguousarray(widened.T if transposed else widened))
        model.graph.nodes.extend([gather, concat])
        for new in (gather, concat, node):
            model.mark(new, self.name)
        return {"op": node.op, "channels_added": n_split, "channels": sorted(set(channels)),
                "absmax_before": before, "absmax_after": float(np.abs(widened).max())}


def split_groups(model: Model) -> dict[str, dict]:
    """The split groups recorded in the model (layer name -> parts and sums)."""
    text = model.metadata.get(GROUPS_KEY)
    return json.loads(text) if text else {}


def outlier_ratio(values: np.ndarray) -> float:
    std = float(values.std())
    return float(np.abs(values).max()) / std if std > 0 else 0.0


def kmeans_thresholds(rows: np.ndarray, k: int, per_row: bool, rng: np.random.Generator,
                      iterations: int = 50, max_samples: int = 1 << 18) -> np.ndarray:
    """Cluster boundaries ``[rows or 1, k-1]``: midpoints of sorted 1-D k-means centroids.

    Lloyd's iterations from quantile seeds; a per-layer fit uses at most
    ``max_samples`` values (a seeded sample), which pins the centroids down to well
    within the data's resolution.
    """
    samples = rows if per_row else rows.reshape(1, -1)
    if not per_row and samples.shape[1] > max_samples:
        samples = rng.choice(samples[0], max_samples, replace=False)[None, :]
    samples = samples.astype(np.float64)
    centroids = np.quantile(samples, (np.arange(k) + 0.5) / k, axis=1).T  # [R, k]
    for _ in range(iterations):
        bounds = (centroids[:, 1:] + centroids[:, :-1]) / 2
        assign = (samples[:, :, None] > bounds[:, None, :]).sum(-1)
        onehot = assign[:, :, None] == np.arange(k)
        counts = onehot.sum(1)
        sums = (onehot * samples[:, :, None]).sum(1)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        updated = np.sort(updated, axis=1)
        if np.allclose(updated, centroids, rtol=0, atol=1e-12):
            break
        centroids = updated
    return (centroids[:, 1:] + centroids[:, :-1]) / 2


def cluster_ids(rows: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Cluster of every weight: the number of boundaries it lies above."""
    return (rows[:, :, None] > thresholds[:, None, :]).sum(-1).astype(np.uint8)


def _cluster_span(rows: np.ndarray, ids: np.ndarray, cluster: int) -> float:
    members = rows[ids == cluster]
    return float(members.max() - members.min()) if members.size else 0.0


def _from_rows(node: gs.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`qcompile.passes.layers.as_rows`."""
    if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        return np.ascontiguousarray(rows.T)
    return rows.reshape(shape)


@dataclass
class SplitGroup:
    """The parts of one split layer as they stand in the graph, and the Adds summing them."""

    name: str
    parts: list[gs.Node]
    sums: list[gs.Node]
    k: int

    @property
    def output(self) -> gs.Tensor:
        return self.sums[-1].outputs[0]


def resolve_groups(model: Model) -> tuple[list[SplitGroup], dict[str, str]]:
    """The recorded split groups still intact in the graph, and why the others are not.

    A later pass may have changed a part (e.g. ``fold`` scaled its weight, which keeps
    the group intact) or rewired it (then its parts are quantized one by one).
    """
    nodes = {node.name: node for node in model.graph.nodes}
    intact, broken = [], {}
    for name, record in split_groups(model).items():
        parts = [nodes.get(part) for part in record["parts"]]
        sums = [nodes.get(total) for total in record["sums"]]
        reason = _group_problem(parts, sums)
        if reason:
            broken[name] = reason
        else:
            intact.append(SplitGroup(name, parts, sums, int(record["k"])))  # type: ignore[arg-type]
    return intact, broken


def _group_problem(parts: list[gs.Node | None], sums: list[gs.Node | None]) -> str | None:
    if any(p is None for p in parts) or any(s is None for s in sums) or len(sums) != len(parts) - 1:
        return "some parts are no longer in the graph"
    first = parts[0]
    assert first is not None
    if any(p.op != first.op or weight_of(p) is None or p.inputs[0] is not first.inputs[0]  # type: ignore[union-attr]
           for p in parts):
        return "the parts no longer share one input and a constant weight"
    partial = first.outputs[0]
    for part, total in zip(parts[1:], sums, strict=True):
        assert part is not None and total is not None
        if total.op != "Add" or {id(t) for t in total.inputs} != {id(partial), id(part.outputs[0])}:
            return "the parts' outputs are no longer summed directly"
        if len(partial.outputs) != 1 or len(part.outputs[0].outputs) != 1:
            return "a part's output is also read elsewhere"
        partial = total.outputs[0]
    return None
