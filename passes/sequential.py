"""Sequential calibration: each stage of layers calibrated on the model compressed so far.

GPTQ's, SparseGPT's and Wanda's reference code compress a network block after block, each
block calibrated on the outputs of the blocks already compressed, so that every layer
compensates for the error of the layers before it. Here a *stage* is a set of layers
that do not feed each other (:func:`layer_stages`: in a transformer block, Q/K/V, the
attention output, the FFN's up/gate, its down projection).

Running the whole model once per stage would cost ``stages`` full calibration runs
(SmolLM2-135M: 120). :class:`SequentialStatistics` instead cuts the model into segments:
the segment of a stage is the nodes that compute its layers' inputs from values already
known (graph inputs, constants, and the tensors earlier segments produced for later
nodes, cached per sample). Each segment runs in its own small ONNX Runtime session on the
graph as it is *now* (the layers of earlier stages already rewritten), so every node runs
about once per sample over the whole pass. Cached tensors are dropped once every node
reading them has run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.errors import ExecutionError
from qcompile.ir import runtime
from qcompile.ir.model import Model

from .context import PassContext, token_rows

log = logging.getLogger(__name__)


def layer_stages(model: Model, nodes: list[gs.Node], shared: Callable[[gs.Node], object] | None = None
                 ) -> list[list[gs.Node]]:
    """``nodes`` grouped by how many of them lie upstream of their input: layers in one stage
    do not feed each other (a transformer block gives Q/K/V, attention output, FFN up, FFN down).

    Layers with the same ``shared(node)`` (one weight read by several layers: a tied embedding
    and LM head) all go to the stage of the last of them, whose statistics they are fitted with.
    """
    wanted = {n.name for n in nodes}
    depth: dict[str, int] = {}
    stage_of: dict[str, int] = {}
    for node in model.graph.toposort().nodes:
        level = max((depth.get(t.name, 0) for t in node.inputs if not isinstance(t, gs.Constant)), default=0)
        if node.name in wanted:
            stage_of[node.name] = level
            level += 1
        for tensor in node.outputs:
            depth[tensor.name] = level
    if shared is not None:
        last: dict[object, int] = {}
        for node in nodes:
            last[shared(node)] = max(last.get(shared(node), 0), stage_of[node.name])
        stage_of.update({node.name: last[shared(node)] for node in nodes})
    return [stage for stage in ([n for n in nodes if stage_of[n.name] == k] for k in sorted(set(stage_of.values())))
            if stage]


class SequentialStatistics:
    """:meth:`PassContext.statistics` for one stage after another (see the module docstring).

    Call :meth:`statistics` with each stage's tensors, in stage order, after rewriting the
    layers of the stages before. Needs real calibration data (``ctx.calib``).
    """

    def __init__(self, ctx: PassContext) -> None:
        assert ctx.calib is not None
        self.ctx = ctx
        self.feeds = list(ctx.calib.batches(1))
        self.cache: list[dict[str, np.ndarray]] = [{} for _ in self.feeds]
        self.executed: set[int] = set()  # ids of the nodes already run ...
        self._run: list[gs.Node] = []  # ... kept alive, so that no new node reuses an id
        self.segments = 0
        # a graph a segment cannot be cut from (sequence-typed values, ops whose segment ONNX
        # Runtime rejects) falls back to whole-model runs, which compute the same statistics
        self.whole_model = False

    def statistics(self, model: Model, *, gram_of: Iterable[str] = (), rows_of: Iterable[str] = ()
                   ) -> tuple[dict[str, tuple[np.ndarray, int, np.ndarray]], dict[str, np.ndarray]]:
        gram_names, row_names = list(dict.fromkeys(gram_of)), list(dict.fromkeys(rows_of))
        targets = list(dict.fromkeys([*gram_names, *row_names]))
        if not targets:
            return {}, {}
        if self.whole_model or _has_subgraphs(model.graph):  # (implicit inputs of If/Loop bodies)
            return self.ctx.statistics(model, gram_of=gram_names, rows_of=row_names)
        try:
            values = self._run_segment(model, targets)
        except Exception as exc:  # noqa: BLE001 - segments only save time: the whole model gives the same values
            log.info("sequential calibration: running the whole model per stage from here (%s: %s)",
                     type(exc).__name__, exc)
            self.whole_model = True
            self.cache = [{} for _ in self.feeds]
            return self.ctx.statistics(model, gram_of=gram_names, rows_of=row_names)
        parts = {name: [(rows, token_rows(feed, value) if self.ctx.skip_padding and name in gram_names else None)
                        for feed, value, rows in ((f, v, _as_rows(v)) for f, v in zip(self.feeds, values[name],
                                                                                      strict=True))]
                 for name in targets}
        return self.ctx.reduce(parts, gram_names, row_names)

    # -- segments ------------------------------------------------------------------------

    def _run_segment(self, model: Model, targets: list[str]) -> dict[str, list[np.ndarray]]:
        graph = model.graph
        tensors = graph.tensors()
        missing = [name for name in targets if name not in tensors]
        if missing:
            raise ExecutionError(f"sequential calibration: no tensor {missing[0]!r} in the model")
        graph_inputs = {t.name for t in graph.inputs}
        known = set(self.cache[0]) if self.cache else set()
        segment: list[gs.Node] = []
        members: set[int] = set()
        needed_inputs: dict[str, gs.Tensor] = {}
        seen: set[str] = set()
        stack = list(targets)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            tensor = tensors[name]
            if isinstance(tensor, gs.Constant) or not name:
                continue
            if name in known or name in graph_inputs:
                needed_inputs[name] = tensor
                continue
            producer = tensor.inputs[0] if tensor.inputs else None
            if producer is None:
                raise ExecutionError(f"sequential calibration: tensor {name!r} has no producer")
            if id(producer) not in members:
                members.add(id(producer))
                segment.append(producer)
                stack.extend(t.name for t in producer.inputs)
        order = {id(node): index for index, node in enumerate(graph.nodes)}
        segment.sort(key=lambda node: order[id(node)])
        in_segment = {id(n) for n in segment}
        # what later nodes will read: outputs of this segment consumed outside it (or asked for)
        wanted = [t.name for node in segment for t in node.outputs
                  if t.name and (t.name in targets or any(id(c) not in in_segment for c in t.outputs))]
        outputs = list(dict.fromkeys([*targets, *wanted]))
        direct = [name for name in outputs if name in needed_inputs]  # asked for a value already known
        fetched = [name for name in outputs if name not in needed_inputs]
        results: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        if fetched:
            session = runtime.make_session(self._segment_proto(model, tensors, segment, needed_inputs, fetched))
            feed_names = [i.name for i in session.get_inputs()]
            for index, feed in enumerate(self.feeds):
                known_values = {**feed, **self.cache[index]}
                try:
                    values = session.run(fetched, {name: known_values[name] for name in feed_names})
                except Exception as exc:  # ORT's own exception types
                    raise ExecutionError("ONNX Runtime failed on the calibration data "
                                         f"({self.ctx.calib.source if self.ctx.calib else '?'}): "
                                         f"{runtime.ort_message(exc)}") from None
                for name, value in zip(fetched, values, strict=True):
                    if not isinstance(value, np.ndarray):
                        raise TypeError(f"{name!r} is not a tensor")
                    results[name].append(value)
        for name in direct:
            results[name] = [{**feed, **cache}[name] for feed, cache in zip(self.feeds, self.cache, strict=True)]
        self.segments += 1
        self.executed.update(id(node) for node in segment)
        self._run.extend(segment)
        for index in range(len(self.feeds)):
            for name in wanted:
                self.cache[index][name] = results[name][index]
        self._drop_consumed(tensors)
        return results

    def _segment_proto(self, model: Model, tensors: dict[str, gs.Tensor], segment: list[gs.Node],
                       inputs: dict[str, gs.Tensor], outputs: list[str]) -> onnx.ModelProto:
        """The segment as a model of its own (the quantized ops' reference functions included)."""
        graph = gs.Graph(nodes=segment, inputs=list(inputs.values()), outputs=[tensors[n] for n in outputs],
                         opset=model.graph.opset, import_domains=list(model.graph.import_domains or []),
                         functions=model.graph.functions)
        proto = Model(graph, metadata=model.metadata).to_proto()
        sample = {**self.feeds[0], **self.cache[0]}
        del proto.graph.input[:]
        for name in inputs:
            value = np.asarray(sample[name])
            proto.graph.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), [f"{name}_{i}" for i in range(value.ndim)]))
        del proto.graph.output[:]
        proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
        del proto.graph.value_info[:]  # shapes inferred for the whole graph may not hold for a segment's inputs
        return proto

    def _drop_consumed(self, tensors: dict[str, gs.Tensor]) -> None:
        """Forget cached tensors that every reader has already read."""
        for name in list(self.cache[0]) if self.cache else []:
            tensor = tensors.get(name)
            if tensor is None or all(id(consumer) in self.executed for consumer in tensor.outputs):
                for cache in self.cache:
                    cache.pop(name, None)


def _as_rows(value: np.ndarray) -> np.ndarray:
    return value.reshape(-1, value.shape[-1]) if value.ndim else value.reshape(1, 1)


def _has_subgraphs(graph: gs.Graph) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and any(isinstance(x, gs.Graph) for x in v))
               for node in graph.nodes for v in node.attrs.values())
