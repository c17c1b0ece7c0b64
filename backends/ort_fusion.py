"""Decoder-layer fusions for the ONNX Runtime backend: fewer, larger kernels per decode step.

At batch 1 a decode step of a small LLM is dominated by ONNX Runtime's per-op overhead:
SmolLM2-135M's exported graph runs ~1700 kernels per token, of which only 121 are the
quantized GEMVs. ONNX Runtime's own optimizer does not fuse the ``torch.export`` form of
these patterns, so the backend rewrites them into ONNX Runtime's fused CPU kernels:

* **Residual + RMSNorm**: ``s = a + b; s * 1/sqrt(mean(s^2) + eps) * gamma`` (``Add``,
  ``Pow``, ``ReduceMean``, ``Add``, ``Sqrt``, ``Reciprocal``, ``Mul``, ``Mul``) →
  ``com.microsoft.SkipSimplifiedLayerNormalization``, whose fourth output is the sum
  ``s`` the residual stream keeps reading.
* **Attention** with rotary embedding, KV-cache concat and the grouped-query repeat
  (``Reshape``/``Transpose`` of Q, K, V, rotate-half rotary, ``Concat`` with the past,
  ``Unsqueeze``/``Expand``/``Reshape`` repeat, ``Q.K^T``, scale, mask ``Add``,
  ``Softmax``, ``P.V``, ``Transpose``/``Reshape`` back) →
  ``com.microsoft.GroupQueryAttention`` with ``causal=0`` and the graph's own additive
  mask as ``attention_bias`` (so padding and causality are exactly the graph's), rotary
  done in the kernel (``do_rotary=1``) from a cos/sin table whose rows at this step's
  positions are the graph's own cos/sin values. The ``present.*`` outputs and the
  ``past_key_values.*`` inputs keep their names and ``[batch, kv_heads, seq, head_dim]``
  layout: the KV-cache interface is unchanged. Q, K and V split from one merged
  projection go in packed (the ``Split`` disappears).

Every rewrite is exact up to float rounding (the kernels compute the same formula in a
different order); a pattern that differs in any checked detail is left as it is and the
reason is counted. :func:`fuse` returns what was fused and what was not.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

MSFT_DOMAIN = "com.microsoft"


def fuse(graph: gs.Graph) -> dict:
    """Fuse RMSNorms, residual adds and attention blocks of ``graph`` in place.

    Returns ``{"fused": {"rmsnorm": n, "attention": n}, "skipped": {reason: n}}`` (``rmsnorm``
    counts residual Add + RMSNorm pairs).
    """
    skipped: Counter[str] = Counter()
    attention = _fuse_attention(graph, skipped)
    rmsnorm = _fuse_rmsnorms(graph, skipped)
    if rmsnorm or attention:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    fused = {"rmsnorm": rmsnorm, "attention": attention}
    return {"fused": fused, "skipped": dict(sorted(skipped.items()))}


def summary(result: dict) -> str:
    """``"rmsnorm 60, attention 30"`` (only the kinds that matched)."""
    return ", ".join(f"{kind} {count}" for kind, count in result["fused"].items() if count)


# --- small graph helpers -------------------------------------------------------------------------

def _producer(tensor: gs.Tensor, op: str | None = None) -> gs.Node | None:
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    return node if op is None or node.op == op else None


def _single_consumer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if len(tensor.outputs) != 1 or tensor.outputs[0].op != op:
        return None
    return tensor.outputs[0]


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = _producer(tensor, "Constant")
    if node is not None and "value" in node.attrs:
        return np.asarray(node.attrs["value"].values)
    return None


def _scalar(tensor: gs.Tensor) -> float | None:
    value = _constant(tensor)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor | None:
    """The other input of a binary ``node`` one of whose inputs is ``tensor``."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is tensor:
        return node.inputs[1]
    return node.inputs[0] if node.inputs[1] is tensor else None


def _is_last_axis(node: gs.Node) -> bool:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = _constant(node.inputs[1])
    return axes is not None and list(np.asarray(axes).reshape(-1)) == [-1] and node.attrs.get("keepdims", 1) == 1


def _detach(node: gs.Node) -> None:
    node.inputs.clear()
    node.outputs.clear()


# --- RMSNorm -------------------------------------------------------------------------------------

def _fuse_rmsnorms(graph: gs.Graph, skipped: Counter) -> int:
    """Each decomposed RMSNorm whose input is a residual ``Add`` → ``SkipSimplifiedLayerNormalization``.

    The sum stays available as the kernel's fourth output for the residual stream. An
    RMSNorm of anything else (the first layer's, of the embedding) stays decomposed:
    ``SimplifiedLayerNormalization`` is registered by ONNX Runtime in the ONNX domain,
    where the ONNX checker rejects it.
    """
    count = 0
    for mean in [n for n in graph.nodes if n.op == "ReduceMean"]:
        match = _match_rmsnorm(mean)
        if match is None:
            continue
        x, epsilon, gamma, output, nodes = match
        add = _residual_add(x)
        if add is None:
            skipped["rmsnorm: input is not a residual Add of two activations"] += 1
            continue
        total, (first, second) = add.outputs[0], list(add.inputs)
        for node in [*nodes, add]:
            _detach(node)
        graph.nodes.append(gs.Node("SkipSimplifiedLayerNormalization", f"{mean.name}/skip_rmsnorm",
                                   {"epsilon": epsilon}, [first, second, gamma],
                                   [output, gs.Variable.empty(), gs.Variable.empty(), total], domain=MSFT_DOMAIN))
        count += 1
    return count


def _residual_add(x: gs.Tensor) -> gs.Node | None:
    """The ``Add`` producing ``x`` if it adds two activations of the same shape (a residual)."""
    add = _producer(x, "Add")
    if add is None or any(isinstance(t, gs.Constant) or _constant(t) is not None for t in add.inputs):
        return None
    shapes = [getattr(t, "shape", None) for t in add.inputs]
    if not all(shapes) or shapes[0] != shapes[1] or len(shapes[0]) != 3:
        return None  # the kernel takes [batch, seq, hidden] inputs, and no broadcast
    return add


def _match_rmsnorm(mean: gs.Node):
    """``(x, epsilon, gamma, output, nodes)`` of the decomposed RMSNorm around ``mean``, or None."""
    square = _producer(mean.inputs[0], "Pow")
    if square is None or _scalar(square.inputs[1]) != 2.0 or len(square.outputs[0].outputs) != 1 \
            or not _is_last_axis(mean):
        return None
    x = square.inputs[0]
    add = _single_consumer(mean.outputs[0], "Add")
    epsilon = _scalar(_other_input(add, mean.outputs[0])) if add is not None else None
    sqrt = _single_consumer(add.outputs[0], "Sqrt") if add is not None else None
    reciprocal = _single_consumer(sqrt.outputs[0], "Reciprocal") if sqrt is not None else None
    scale = _single_consumer(reciprocal.outputs[0], "Mul") if reciprocal is not None else None
    if scale is None or epsilon is None or _other_input(scale, reciprocal.outputs[0]) is not x:
        return None
    nodes = [square, mean, add, sqrt, reciprocal, scale]
    gamma_mul = _single_consumer(scale.outputs[0], "Mul")
    gamma_tensor = _other_input(gamma_mul, scale.outputs[0]) if gamma_mul is not None else None
    gamma = _constant(gamma_tensor) if gamma_tensor is not None else None
    if gamma is not None and gamma.ndim == 1 and gamma.dtype == np.float32:
        return x, epsilon, gamma_tensor, gamma_mul.outputs[0], [*nodes, gamma_mul]
    width = getattr(x, "shape", None)
    if not width or not isinstance(width[-1], int):
        return None  # no gamma and no known width: a scale of ones cannot be sized
    ones = gs.Constant(f"{mean.name}.rmsnorm_ones", np.ones(width[-1], np.float32))
    return x, epsilon, ones, scale.outputs[0], nodes


# --- attention -----------------------------------------------------------------------------------

@dataclass
class _Attention:
    """The tensors a ``GroupQueryAttention`` takes over from one matched attention block."""

    query: gs.Tensor  # [batch, seq, heads * head_dim], before Reshape/Transpose/rotary
    key: gs.Tensor  # [batch, seq, kv_heads * head_dim]
    value: gs.Tensor
    past_key: gs.Tensor  # graph inputs [batch, kv_heads, past, head_dim]
    past_value: gs.Tensor
    present_key: gs.Tensor  # the Concat outputs [batch, kv_heads, past + seq, head_dim]
    present_value: gs.Tensor
    cos: gs.Tensor  # [1, seq, head_dim]: the graph's rotary cos/sin at this step's positions
    sin: gs.Tensor
    bias: gs.Tensor  # additive mask [batch | 1, 1, seq, past + seq]
    scale: float
    output: gs.Tensor  # [batch, seq, heads * head_dim], after the heads are merged back
    heads: int
    kv_heads: int
    head_dim: int


def _fuse_attention(graph: gs.Graph, skipped: Counter) -> int:
    count = 0
    shared: dict[str, dict[str, gs.Tensor]] = {}
    inferred: list[dict[str, list]] = []

    def shapes() -> dict[str, list]:  # inferred once, and only for a graph with a KV-cache attention block
        if not inferred:
            inferred.append(_static_shapes(graph))
        return inferred[0]

    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        match = _match_attention(softmax, shapes)
        if isinstance(match, str):
            if match:
                skipped[f"attention: {match}"] += 1
            continue
        _rewrite_attention(graph, match, shared, f"{softmax.name}/gqa")
        count += 1
    return count


def _static_shapes(graph: gs.Graph) -> dict[str, list]:
    """Inferred shapes of the graph's tensors (ONNX shape inference, on the structure only)."""
    import onnx

    model = gs.export_onnx(graph.copy(), do_type_check=False)
    for tensor in model.graph.initializer:  # the values are not needed: keep the copy small
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - shape inference failing only means fewer fusions
        log.debug("shape inference for attention fusion failed: %s", exc)
        return {}
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in info.type.tensor_type.shape.dim]
    return shapes


def _match_attention(softmax: gs.Node, inferred_shapes: Callable[[], dict[str, list]]) -> _Attention | str:
    """The attention block around ``softmax``, or why it is not the supported form ('' = not attention)."""
    if softmax.attrs.get("axis", -1) not in (-1, 3):
        return ""
    add = _producer(softmax.inputs[0], "Add")
    if add is None:
        return "no additive mask before Softmax"
    scaled = next((t for t in add.inputs if _producer(t, "Mul") is not None), None)
    bias = _other_input(add, scaled) if scaled is not None else None
    scale_mul = _producer(scaled, "Mul") if scaled is not None else None
    scores = next((t for t in scale_mul.inputs if _producer(t, "MatMul") is not None), None) if scale_mul else None
    scale = _scalar(_other_input(scale_mul, scores)) if scores is not None else None
    if scores is None or scale is None or bias is None or _constant(bias) is not None:
        return "Softmax input is not (Q.K^T) * scale + mask"
    qk = _producer(scores, "MatMul")
    transpose_k = _producer(qk.inputs[1], "Transpose")
    if transpose_k is None or list(transpose_k.attrs.get("perm", [])) != [0, 1, 3, 2]:
        return "K is not transposed for Q.K^T"
    pv = _single_consumer(softmax.outputs[0], "MatMul")
    merge = _single_consumer(pv.outputs[0], "Transpose") if pv is not None and pv.inputs[0] is softmax.outputs[0] \
        else None
    reshape_out = _single_consumer(merge.outputs[0], "Reshape") if merge is not None else None
    if reshape_out is None or list(merge.attrs.get("perm", [])) != [0, 2, 1, 3]:
        return "P.V is not merged back by Transpose + Reshape"
    key_cache, value_cache = _cache_of(transpose_k.inputs[0]), _cache_of(pv.inputs[1])
    if key_cache is None or value_cache is None:
        return "K/V are not a Concat with a past_key_values input"
    (past_key, key4, present_key), (past_value, value4, present_value) = key_cache, value_cache
    shapes = inferred_shapes()
    past_shape = shapes.get(past_key.name) or []
    if len(past_shape) != 4 or not all(isinstance(d, int) and d for d in (past_shape[1], past_shape[3])):
        return "past key without a static head count and size"
    kv_heads, head_dim = past_shape[1], past_shape[3]
    query_rot, key_rot = _match_rotary(qk.inputs[0], head_dim), _match_rotary(key4, head_dim)
    value3d = _split_heads(value4)
    if query_rot is None or key_rot is None or value3d is None:
        return "Q/K are not rotate-half rotary of split heads, or V is not split heads"
    (query3d, cos, sin), (key3d, key_cos, key_sin) = query_rot, key_rot
    if key_cos is not cos or key_sin is not sin or (shapes.get(cos.name) or [None])[0] != 1 \
            or (shapes.get(sin.name) or [None])[0] != 1:
        return "rotary cos/sin differ between Q and K or per batch entry"
    width = (shapes.get(query3d.name) or [None])[-1]
    if not isinstance(width, int) or width % head_dim or (width // head_dim) % kv_heads:
        return "query width unknown or not a multiple of the KV heads"
    return _Attention(query3d, key3d, value3d, past_key, past_value, present_key, present_value, cos, sin,
                      bias, scale, reshape_out.outputs[0], width // head_dim, kv_heads, head_dim)


def _cache_of(repeated: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor] | None:
    """``(past, new, present)`` behind K or V as attention reads it (after an optional GQA repeat)."""
    present = repeated
    reshape = _producer(repeated, "Reshape")
    if reshape is not None:  # repeat_kv: Unsqueeze(axis 2) -> Expand -> Reshape
        expand = _producer(reshape.inputs[0], "Expand")
        unsqueeze = _producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
        axes = _constant(unsqueeze.inputs[1]) if unsqueeze is not None and len(unsqueeze.inputs) > 1 else None
        if axes is None or list(axes.reshape(-1)) != [2]:
            return None
        present = unsqueeze.inputs[0]
    concat = _producer(present, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attrs.get("axis") not in (2, -2):
        return None
    past, new = concat.inputs
    if not isinstance(past, gs.Variable) or past.inputs:  # must be a graph input
        return None
    return past, new, present


def _split_heads(tensor: gs.Tensor) -> gs.Tensor | None:
    """``x3d`` if ``tensor`` is ``Transpose(Reshape(x3d), perm=[0, 2, 1, 3])``."""
    transpose = _producer(tensor, "Transpose")
    reshape = _producer(transpose.inputs[0], "Reshape") if transpose is not None else None
    if reshape is None or list(transpose.attrs.get("perm", [])) != [0, 2, 1, 3]:
        return None
    return reshape.inputs[0]


def _match_rotary(tensor: gs.Tensor, head_dim: int) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor] | None:
    """``(x3d, cos, sin)`` if ``tensor = x * cos + rotate_half(x) * sin`` on split heads of ``x3d``.

    ``rotate_half(x) = Concat(-x[..., half:], x[..., :half])``; cos/sin enter as
    ``Unsqueeze(cos, axis 1)`` and cover the whole head (full rotary).
    """
    add = _producer(tensor, "Add")
    if add is None:
        return None
    products = [_producer(t, "Mul") for t in add.inputs]
    if any(p is None for p in products):
        return None
    for cos_mul, sin_mul in (products, products[::-1]):
        for x in cos_mul.inputs:
            x3d = _split_heads(x)
            cos = _unsqueezed_1(_other_input(cos_mul, x))
            rotated = next((t for t in sin_mul.inputs if _is_rotate_half(t, x, head_dim)), None)
            sin = _unsqueezed_1(_other_input(sin_mul, rotated)) if rotated is not None else None
            if x3d is not None and cos is not None and sin is not None:
                return x3d, cos, sin
    return None


def _unsqueezed_1(tensor: gs.Tensor | None) -> gs.Tensor | None:
    node = _producer(tensor, "Unsqueeze") if tensor is not None else None
    axes = _constant(node.inputs[1]) if node is not None and len(node.inputs) > 1 else None
    return node.inputs[0] if axes is not None and list(axes.reshape(-1)) == [1] else None


def _is_rotate_half(tensor: gs.Tensor, x: gs.Tensor, head_dim: int) -> bool:
    concat = _producer(tensor, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attrs.get("axis") not in (-1, 3):
        return False
    neg = _producer(concat.inputs[0], "Neg")
    second, first = (_producer(neg.inputs[0], "Slice") if neg is not None else None,
                     _producer(concat.inputs[1], "Slice"))
    half = head_dim // 2
    return second is not None and first is not None and \
        _slice_of(second, x, head_dim) == (half, head_dim) and _slice_of(first, x, head_dim) == (0, half)


def _slice_of(node: gs.Node, x: gs.Tensor, head_dim: int) -> tuple[int, int] | None:
    """``(start, end)`` of a last-axis, step-1 ``Slice`` of ``x`` (ends past the head clamped to it)."""
    if node.inputs[0] is not x or len(node.inputs) < 4:
        return None
    values = [_constant(t) for t in node.inputs[1:]]
    if any(v is None or v.size != 1 for v in values):
        return None
    start, end, axis = (int(v.reshape(-1)[0]) for v in values[:3])
    step = int(values[3].reshape(-1)[0]) if len(values) > 3 else 1
    if axis not in (-1, 3) or step != 1 or start < 0:
        return None
    return start, min(end, head_dim)


def _rewrite_attention(graph: gs.Graph, match: _Attention, shared: dict[str, dict[str, gs.Tensor]],
                       name: str) -> None:
    helpers = _step_tensors(graph, match, shared)
    for tensor in (match.output, match.present_key, match.present_value):
        for producer in list(tensor.inputs):
            producer.outputs.clear()
    packed = _packed_qkv(match)
    qkv = [packed, gs.Variable.empty(), gs.Variable.empty()] if packed is not None else \
        [match.query, match.key, match.value]
    inputs = [*qkv, match.past_key, match.past_value, helpers["seqlens_k"],
              helpers["total_sequence_length"], helpers["cos_cache"], helpers["sin_cache"], helpers["position_ids"],
              match.bias]
    attrs = {"num_heads": match.heads, "kv_num_heads": match.kv_heads, "scale": match.scale, "do_rotary": 1,
             "rotary_interleaved": 0, "causal": 0, "local_window_size": -1}
    graph.nodes.append(gs.Node("GroupQueryAttention", name, attrs, inputs,
                               [match.output, match.present_key, match.present_value], domain=MSFT_DOMAIN))


def _packed_qkv(match: _Attention) -> gs.Tensor | None:
    """The merged Q/K/V projection output, when Q, K, V are the three parts of one last-axis ``Split``
    (the backend merges projections that read the same input): GroupQueryAttention then
    takes it packed, and the ``Split`` goes away."""
    split = _producer(match.query, "Split")
    if split is None or list(split.outputs) != [match.query, match.key, match.value] or len(split.inputs) != 2:
        return None
    sizes = _constant(split.inputs[1])
    expected = [match.heads * match.head_dim, match.kv_heads * match.head_dim, match.kv_heads * match.head_dim]
    if sizes is None or list(sizes.reshape(-1)) != expected or split.attrs.get("axis") not in (-1, 2):
        return None
    if any(len(part.outputs) != 1 for part in split.outputs):  # only the head reshapes read the parts
        return None
    return split.inputs[0]


def _step_tensors(graph: gs.Graph, match: _Attention, shared: dict[str, dict[str, gs.Tensor]]
                  ) -> dict[str, gs.Tensor]:
    """Per-step inputs of GroupQueryAttention, built once per (mask, cos, sin) and shared by every layer.

    ``total = mask.shape[-1]`` (past + new tokens), ``new = cos.shape[1]``; ``seqlens_k = total - 1`` for every
    batch entry (every cached position is attended to unless the mask says otherwise, so
    ``causal=0`` and the mask decide exactly as the graph did); the rotary tables hold
    zeros at rows ``[0, past)`` and the graph's own cos/sin (first half of the head) at
    rows ``[past, total)``, and the positions of this step's tokens are ``past + s``.
    """
    key = f"{match.bias.name}|{match.cos.name}|{match.sin.name}"
    if key in shared:
        return shared[key]
    prefix = f"{match.bias.name}.gqa"
    nodes: list[gs.Node] = []

    def op(kind: str, inputs: list, dtype=np.int64, **attrs) -> gs.Variable:
        out = gs.Variable(f"{prefix}.{len(nodes)}_{kind.lower()}", dtype)
        nodes.append(gs.Node(kind, f"{prefix}/{len(nodes)}_{kind.lower()}", attrs, inputs, [out]))
        return out

    constants: dict[str, gs.Constant] = {}

    def const(label: str, value: np.ndarray) -> gs.Constant:
        return constants.setdefault(label, gs.Constant(f"{prefix}.{label}", value))

    total = op("Shape", [match.bias], start=-1)  # [1]
    batch = op("Shape", [match.past_key], start=0, end=1)  # every layer's cache has the graph's batch
    length = op("Shape", [match.cos], start=1, end=2)
    past = op("Sub", [total, length])
    last = op("Sub", [total, const("one", np.array([1], np.int64))])
    seqlens = op("Cast", [op("Expand", [last, batch])], np.int32, to=6)
    total_scalar = op("Cast", [op("Squeeze", [total])], np.int32, to=6)
    steps = op("Range", [op("Squeeze", [past]), op("Squeeze", [total]), const("step", np.array(1, np.int64))])
    positions = op("Expand", [op("Unsqueeze", [steps, const("axis0", np.array([0], np.int64))]),
                              op("Concat", [batch, length], axis=0)])
    half = match.head_dim // 2
    zeros_shape = op("Concat", [past, const("half", np.array([half], np.int64))], axis=0)
    zeros = op("ConstantOfShape", [zeros_shape], np.float32, value=gs.Constant(f"{prefix}.zero", np.zeros(1, np.float32)))
    tables = {}
    for role, source in (("cos_cache", match.cos), ("sin_cache", match.sin)):
        rows = op("Slice", [op("Squeeze", [source, const("axis0", np.array([0], np.int64))], np.float32),
                            const("zero_start", np.array([0], np.int64)), const("half_end", np.array([half], np.int64)),
                            const("last_axis", np.array([-1], np.int64))], np.float32)
        tables[role] = op("Concat", [zeros, rows], np.float32, axis=0)
    graph.nodes.extend(nodes)
    result = {"seqlens_k": seqlens, "total_sequence_length": total_scalar, "position_ids": positions, **tables}
    shared[key] = result
    return result
