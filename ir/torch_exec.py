"""A differentiable executor: an IR graph evaluated with torch ops.

Passes that train (``tune``) need gradients of the model's outputs with respect to some
of its constants. :class:`TorchGraph` evaluates the onnx-graphsurgeon graph node by node
with torch operations, the chosen constants as ``torch.nn.Parameter`` and every other
constant as a plain tensor, so ``loss.backward()`` reaches the weights without converting
the model to another framework. Shape arithmetic (Shape, Gather, Concat, Reshape, ...) is
evaluated on the fly, so dynamic batch and sequence sizes work as in ONNX Runtime.

Semantics follow the ONNX operator specification for opset 13 and later (older opsets
where an attribute moved to an input: both forms are read). An op it does not implement
raises one :class:`~qcompile.errors.UsageError` naming the op before anything runs.
Outputs agree with ONNX Runtime within float round-off (tests: MiniLM, the digits CNN, a
tiny Llama and the test models).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F  # noqa: N812

from qcompile.errors import ExecutionError, UsageError

from .model import Model

Tensor = torch.Tensor
Kernel = Callable[[gs.Node, list[Any]], list[Tensor]]

_TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


class TorchGraph(torch.nn.Module):
    """``model``'s graph as a torch module: ``forward(feeds) -> {output name: tensor}``.

    ``trainable``: names of float constants held as parameters (``self.weights[name]``,
    looked up with :meth:`parameter`); the model itself is never modified (see
    :meth:`trained_values` to read the values back).
    """

    def __init__(self, model: Model, trainable: Iterable[str] = ()) -> None:
        super().__init__()
        graph = model.graph.toposort()
        self.opset = int(graph.opset)
        self.nodes = list(graph.nodes)
        unknown = sorted({_op_name(n) for n in self.nodes if n.domain not in ("", "ai.onnx", None) or n.op not in KERNELS})
        if unknown:
            raise UsageError(f"the torch executor does not implement op {', '.join(unknown)}")
        self.input_names = [t.name for t in graph.inputs if not isinstance(t, gs.Constant)]
        self.output_names = [t.name for t in graph.outputs]
        wanted = set(trainable)
        self.weights = torch.nn.ParameterDict()
        self._keys: dict[str, str] = {}
        self._constants: dict[str, Tensor] = {}
        for name, tensor in graph.tensors().items():
            if not isinstance(tensor, gs.Constant):
                continue
            values = torch.from_numpy(np.array(tensor.values, copy=True))
            if name in wanted:
                if not values.is_floating_point():
                    raise UsageError(f"constant {name!r} is not float: it cannot be trained")
                key = f"p{len(self._keys)}"
                self._keys[name] = key
                self.weights[key] = torch.nn.Parameter(values)
            else:
                self._constants[name] = values
        missing = sorted(wanted - set(self._keys))
        if missing:
            raise UsageError(f"no constant named {missing[0]!r} in the model")
        self._last_use = _last_uses(self.nodes, self.output_names)

    def parameter(self, name: str) -> torch.nn.Parameter:
        """The parameter holding constant ``name``."""
        return self.weights[self._keys[name]]

    @property
    def trainable_names(self) -> list[str]:
        return list(self._keys)

    def trained_values(self) -> dict[str, np.ndarray]:
        """Current values of the trainable constants, as NumPy arrays."""
        return {name: self.weights[key].detach().cpu().numpy().copy() for name, key in self._keys.items()}

    def forward(self, feeds: Mapping[str, Any], extra_outputs: Iterable[str] = (),  # type: ignore[override]
                overrides: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Outputs (and ``extra_outputs``) for ``feeds``. ``overrides``: values for constants,
        computed by the caller (e.g. a quantized weight decoded from trainable scales, so the
        gradient flows to them); they replace the constants for this call only."""
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise UsageError(f"missing model input {missing[0]!r}")
        env: dict[str, Tensor] = {name: _as_tensor(value) for name, value in feeds.items()}
        for name, value in (overrides or {}).items():
            if name not in self._constants and name not in self._keys:
                raise UsageError(f"no constant named {name!r} in the model")
            env[name] = value
        keep = set(self.output_names) | set(extra_outputs)
        for index, node in enumerate(self.nodes):
            inputs = [None if not t.name else self._value(t, env) for t in node.inputs]
            try:
                results = (_softmax(node, inputs, self.opset) if node.op == "Softmax"
                           else KERNELS[node.op](node, inputs))
            except (RuntimeError, IndexError, ValueError, TypeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ExecutionError(f"torch executor failed at {node.op} node {node.name!r}: {first}") from None
            for tensor, value in zip(node.outputs, results, strict=False):
                if tensor.name:
                    env[tensor.name] = value
            for tensor in node.inputs:  # free intermediates no later node reads
                if tensor.name in env and tensor.name not in keep and self._last_use.get(tensor.name) == index:
                    del env[tensor.name]
        return {name: env[name] for name in [*self.output_names, *extra_outputs]}

    def _value(self, tensor: gs.Tensor, env: dict[str, Tensor]) -> Tensor:
        if tensor.name in env:
            return env[tensor.name]
        if tensor.name in self._keys:
            return self.weights[self._keys[tensor.name]]
        if tensor.name in self._constants:
            return self._constants[tensor.name]
        raise UsageError(f"tensor {tensor.name!r} is read before it is computed")


def _op_name(node: gs.Node) -> str:
    return node.op if node.domain in ("", "ai.onnx", None) else f"{node.domain}.{node.op}"


def _last_uses(nodes: list[gs.Node], outputs: list[str]) -> dict[str, int]:
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for tensor in node.inputs:
            last[tensor.name] = index
    for name in outputs:
        last.pop(name, None)
    return last


def _as_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(value))


# -- helpers -------------------------------------------------------------------------------


def _ints(value: Tensor | None) -> list[int]:
    return [] if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _axes(node: gs.Node, inputs: list[Any], position: int) -> list[int] | None:
    """Axes from the input at ``position`` (opset >= 13/18) or the ``axes`` attribute."""
    if len(inputs) > position and inputs[position] is not None:
        return _ints(inputs[position])
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _unary(function: Callable[[Tensor], Tensor]) -> Kernel:
    return lambda node, inputs: [function(inputs[0])]


def _binary(function: Callable[[Tensor, Tensor], Tensor]) -> Kernel:
    return lambda node, inputs: [function(inputs[0], inputs[1])]


def _variadic(function: Callable[[Tensor, Tensor], Tensor]) -> Kernel:
    def kernel(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
        result = inputs[0]
        for value in inputs[1:]:
            result = function(result, value)
        return [result]

    return kernel


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return torch.pow(a, b.to(a.dtype))
    return torch.pow(a, b).to(a.dtype)


def _mod(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    a, b = inputs
    return [torch.fmod(a, b) if node.attrs.get("fmod", 0) else torch.remainder(a, b)]


# -- tensor manipulation -------------------------------------------------------------------


def _reshape(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data, shape = inputs[0], _ints(inputs[1])
    if not node.attrs.get("allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [data.reshape(shape)]


def _transpose(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    perm = node.attrs.get("perm") or list(reversed(range(data.dim())))
    return [data.permute(*perm)]


def _unsqueeze(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    axes = _axes(node, inputs, 1) or []
    rank = data.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        data = data.unsqueeze(axis)
    return [data]


def _squeeze(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    axes = _axes(node, inputs, 1)
    if axes is None:
        return [data.squeeze()]
    for axis in sorted((a % data.dim() for a in axes), reverse=True):
        data = data.squeeze(axis)
    return [data]


def _flatten(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    axis = int(node.attrs.get("axis", 1)) % (data.dim() + 1) if data.dim() else 0
    outer = math.prod(data.shape[:axis])
    return [data.reshape(outer, -1) if data.numel() else data.reshape(outer, math.prod(data.shape[axis:]))]


def _concat(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    values = [v for v in inputs if v is not None]
    return [torch.cat(values, dim=int(node.attrs["axis"]))]


def _split(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    axis = int(node.attrs.get("axis", 0))
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else list(node.attrs.get("split", []))
    if not sizes:
        parts = len(node.outputs)
        chunk = -(-data.shape[axis] // parts)
        return list(torch.split(data, chunk, dim=axis))
    return list(torch.split(data, sizes, dim=axis))


def _expand(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data, shape = inputs[0], _ints(inputs[1])
    return [data.expand(torch.broadcast_shapes(tuple(data.shape), tuple(shape)))]


def _shape(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    dims = list(inputs[0].shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


def _size(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64)]


def _slice(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    if len(inputs) > 1:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    else:  # opset < 10: attributes
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= data.dim()
        begin, stop, stride = slice(start, end, step).indices(data.shape[axis])
        if stride > 0:
            data = data[(slice(None),) * axis + (slice(begin, stop, stride),)]
        else:
            index = torch.arange(begin, stop, stride, dtype=torch.int64)
            data = data.index_select(axis, index)
    return [data]


def _gather(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data, indices = inputs
    axis = int(node.attrs.get("axis", 0)) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices).to(torch.int64)
    picked = data.index_select(axis, indices.reshape(-1))
    return [picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))]


def _gather_elements(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data, indices = inputs
    axis = int(node.attrs.get("axis", 0)) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices).to(torch.int64)
    return [torch.gather(data, axis, indices)]


def _gather_nd(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data, indices = inputs
    batch_dims = int(node.attrs.get("batch_dims", 0))
    batch_shape = list(data.shape[:batch_dims])
    batch = math.prod(batch_shape)
    flat_data = data.reshape((batch, *data.shape[batch_dims:]))
    flat_indices = indices.reshape(batch, -1, indices.shape[-1]).to(torch.int64)
    depth = indices.shape[-1]
    sizes = torch.tensor(flat_data.shape[1 : 1 + depth], dtype=torch.int64)
    flat_indices = torch.where(flat_indices < 0, flat_indices + sizes, flat_indices)
    rows = torch.arange(batch).unsqueeze(1).expand(batch, flat_indices.shape[1])
    picked = flat_data[(rows, *flat_indices.unbind(-1))]
    return [picked.reshape((*batch_shape, *indices.shape[batch_dims:-1], *data.shape[batch_dims + depth :]))]


def _where(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    condition, a, b = inputs
    return [torch.where(condition.to(torch.bool), a, b)]


def _cast(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    to = int(node.attrs["to"])
    if to not in _TORCH_DTYPES:
        raise UsageError(f"the torch executor does not implement Cast to {onnx.TensorProto.DataType.Name(to)}")
    return [inputs[0].to(_TORCH_DTYPES[to])]


def _constant(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        array = np.asarray(value.values if isinstance(value, gs.Constant) else value)
    elif "value_float" in attrs:
        array = np.array(attrs["value_float"], np.float32)
    elif "value_floats" in attrs:
        array = np.array(attrs["value_floats"], np.float32)
    elif "value_int" in attrs:
        array = np.array(attrs["value_int"], np.int64)
    elif "value_ints" in attrs:
        array = np.array(attrs["value_ints"], np.int64)
    else:
        raise UsageError(f"the torch executor does not implement Constant {node.name!r} with {sorted(attrs)}")
    return [torch.from_numpy(np.array(array, copy=True))]


def _constant_of_shape(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    value = node.attrs.get("value")
    fill = (torch.from_numpy(np.array(value.values if isinstance(value, gs.Constant) else value).reshape(-1))
            if value is not None else torch.zeros(1, dtype=torch.float32))
    return [fill.expand(_ints(inputs[0])).clone() if _ints(inputs[0]) else fill.reshape(()).clone()]


def _range(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    start, limit, delta = (v.reshape(()) for v in inputs)
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _trilu(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    offset = int(inputs[1].item()) if len(inputs) > 1 and inputs[1] is not None else 0
    upper = node.attrs.get("upper", 1)
    return [torch.triu(inputs[0], offset) if upper else torch.tril(inputs[0], offset)]


def _cumsum(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data, axis = inputs[0], int(inputs[1].item())
    if node.attrs.get("reverse", 0):
        data = data.flip(axis)
    result = torch.cumsum(data, dim=axis)
    if node.attrs.get("exclusive", 0):
        result = result - data
    return [result.flip(axis) if node.attrs.get("reverse", 0) else result]


# -- math ----------------------------------------------------------------------------------


def _matmul(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    return [torch.matmul(inputs[0], inputs[1])]


def _gemm(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    a, b = inputs[0], inputs[1]
    if node.attrs.get("transA", 0):
        a = a.t()
    if node.attrs.get("transB", 0):
        b = b.t()
    result = float(node.attrs.get("alpha", 1.0)) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        result = result + float(node.attrs.get("beta", 1.0)) * inputs[2]
    return [result]


def _softmax(node: gs.Node, inputs: list[Any], opset: int) -> list[Tensor]:
    data = inputs[0]
    if opset >= 13:
        return [torch.softmax(data, dim=int(node.attrs.get("axis", -1)))]
    axis = int(node.attrs.get("axis", 1)) % data.dim()  # older opsets: softmax over the flattened tail
    flat = data.reshape(math.prod(data.shape[:axis]), -1)
    return [torch.softmax(flat, dim=1).reshape(data.shape)]


def _layer_norm(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = int(node.attrs.get("axis", -1)) % data.dim()
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    dims = tuple(range(axis, data.dim()))
    mean = data.mean(dim=dims, keepdim=True)
    centered = data - mean
    inv_std = torch.rsqrt(centered.square().mean(dim=dims, keepdim=True) + epsilon)
    result = centered * inv_std * scale
    if bias is not None:
        result = result + bias
    return [result, mean, inv_std]


def _batch_norm(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    if node.attrs.get("training_mode", 0):
        raise UsageError(f"BatchNormalization {node.name!r} in training mode is not supported by the torch executor")
    data, scale, bias, mean, var = inputs[:5]
    shape = [1, -1] + [1] * (data.dim() - 2)
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    normalized = (data - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + epsilon)
    return [normalized * scale.reshape(shape) + bias.reshape(shape)]


def _reduce(function: Callable[..., Tensor]) -> Kernel:
    def kernel(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
        data = inputs[0]
        axes = _axes(node, inputs, 1)
        keepdims = bool(node.attrs.get("keepdims", 1))
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                return [data]
            axes = list(range(data.dim()))
        return [function(data, dim=tuple(a % max(data.dim(), 1) for a in axes), keepdim=keepdims)]

    return kernel


def _amax(data: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.amax(data, dim=dim, keepdim=keepdim)


def _amin(data: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.amin(data, dim=dim, keepdim=keepdim)


def _clip(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else node.attrs.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else node.attrs.get("max")
    if low is not None:
        data = torch.maximum(data, torch.as_tensor(low, dtype=data.dtype))
    if high is not None:
        data = torch.minimum(data, torch.as_tensor(high, dtype=data.dtype))
    return [data]


def _gelu(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    return [F.gelu(inputs[0], approximate="tanh" if node.attrs.get("approximate", "none") == "tanh" else "none")]


# -- convolution and pooling ---------------------------------------------------------------


def _padding(node: gs.Node, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]
             ) -> list[int]:
    """ONNX ``pads`` ([begin..., end...]) with ``auto_pad`` resolved."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    rank = len(spatial)
    if auto_pad in ("NOTSET", ""):
        return list(node.attrs.get("pads", [0] * 2 * rank))
    if auto_pad == "VALID":
        return [0] * 2 * rank
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(large if auto_pad == "SAME_LOWER" else small)
        ends.append(small if auto_pad == "SAME_LOWER" else large)
    return begins + ends


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] -> F.pad's last-axis-first [b_n, e_n, ..., b_1, e_1]."""
    rank = len(pads) // 2
    result: list[int] = []
    for axis in reversed(range(rank)):
        result += [pads[axis], pads[axis + rank]]
    return result


def _conv(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    rank = data.dim() - 2
    kernel = list(weight.shape[2:])
    strides = list(node.attrs.get("strides", [1] * rank))
    dilations = list(node.attrs.get("dilations", [1] * rank))
    pads = _padding(node, list(data.shape[2:]), kernel, strides, dilations)
    function = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(rank)
    if function is None:
        raise UsageError(f"the torch executor does not implement Conv {node.name!r} with {rank} spatial axes")
    if any(pads):
        data = F.pad(data, _torch_pad(pads))
    return [function(data, weight, bias, stride=strides, dilation=dilations, groups=int(node.attrs.get("group", 1)))]


def _max_pool(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    rank = data.dim() - 2
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * rank))
    dilations = list(node.attrs.get("dilations", [1] * rank))
    pads = _padding(node, list(data.shape[2:]), kernel, strides, dilations)
    function = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
    if any(pads):
        data = F.pad(data, _torch_pad(pads), value=float("-inf"))
    if len(node.outputs) > 1 and node.outputs[1].name:
        raise UsageError(f"the torch executor does not implement MaxPool {node.name!r} with an Indices output")
    return [function(data, kernel, strides, 0, dilations, ceil_mode=bool(node.attrs.get("ceil_mode", 0)))]


def _average_pool(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    rank = data.dim() - 2
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * rank))
    pads = _padding(node, list(data.shape[2:]), kernel, strides, [1] * rank)
    symmetric = pads[:rank] == pads[rank:] and all(p <= k // 2 for p, k in zip(pads[:rank], kernel, strict=True))
    if not symmetric:
        raise UsageError(f"the torch executor does not implement AveragePool {node.name!r} with asymmetric pads")
    function = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
    return [function(data, kernel, strides, pads[:rank], ceil_mode=bool(node.attrs.get("ceil_mode", 0)),
                     count_include_pad=bool(node.attrs.get("count_include_pad", 0)))]


def _global_average_pool(node: gs.Node, inputs: list[Any]) -> list[Tensor]:
    data = inputs[0]
    return [data.mean(dim=tuple(range(2, data.dim())), keepdim=True)]


KERNELS: dict[str, Kernel] = {
    # elementwise
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(_pow),
    "Mod": _mod,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not),
    "Where": _where,
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Erf": _unary(torch.erf),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Softplus": _unary(F.softplus),
    "LeakyRelu": lambda node, inputs: [F.leaky_relu(inputs[0], float(node.attrs.get("alpha", 0.01)))],
    "Gelu": _gelu,
    "Clip": _clip,
    "Identity": _unary(lambda x: x),
    "Dropout": lambda node, inputs: [inputs[0]],
    "Cast": _cast,
    # shapes and indexing
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Shape": _shape,
    "Size": _size,
    "Range": _range,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Concat": _concat,
    "Split": _split,
    "Expand": _expand,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "Trilu": _trilu,
    "CumSum": _cumsum,
    # linear algebra and normalisation
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Softmax": lambda node, inputs: _softmax(node, inputs, 13),  # the opset is applied in TorchGraph.forward
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(_amax),
    "ReduceMin": _reduce(_amin),
    # convolution
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
}
