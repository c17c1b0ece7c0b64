"""ONNX IR -> Relax, with every ``qcompile`` quantized op lowered by us.

The Relax ONNX importer converts the standard ops. It has no hook for custom domains,
so :class:`QuantizedImporter` subclasses it and intercepts the three quantized op
types (``QMatMul``, ``QGather``, ``QConv``) where the importer dispatches a node:
instead of their reference functions (which would decode every weight to float), a
quantized node becomes a ``call_tir`` of one of our kernels
(:mod:`qcompile.backends.tvm_kernels`) that reads the packed bytes directly.
Intercepting inside the importer, rather than importing a float graph and
substituting afterwards, keeps one pass over the graph and no placeholder
bookkeeping; the importer's ``_convert_operator`` / ``_check_for_unsupported_ops``
/ ``_parse_graph_initializers`` are the (private but stable) seams used.

The packed weights, scales and zero points become parameters of ``main`` (after the
model inputs), never Relax constants: constants would be folded (a ``QConv`` filter
would be decoded to float at build time) and embedded in the library. They are
saved beside the library as the artifact's packed params.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from qcompile.errors import UnsupportedModelError
from qcompile.ir import mapped, qops
from qcompile.ir.canonicalize import _set_input_shapes, fold_constants, infer_shapes
from qcompile.ir.model import Model

from . import tvm_bcq, tvm_sparse
from . import tvm_kernels as kernels

log = logging.getLogger(__name__)


@dataclass
class ImportResult:
    """The Relax module and what the runtime needs beside it."""

    module: tvm.IRModule
    params: dict[str, np.ndarray]  # name -> array, in the order of ``main``'s trailing parameters
    input_names: list[str]
    input_shapes: dict[str, list[int]]
    output_names: list[str]
    kernels: dict[str, str] = field(default_factory=dict)  # quantized node -> kernel description


SUPPORTED_FORMATS = ("int", "bcq", "bcq_outliers")
SPARSE_FORMATS = ("int.nm", "int.bitmask")  # QMatMul only (tvm_sparse)


@dataclass
class _Layer:
    node_name: str
    op: str
    format: str
    weight: Any  # QuantizedWeight (int) or BCQWeight (bcq)
    param_names: list[str]  # the format's weight inputs, in its order (qcompile.ir.formats)
    layout: Any = None  # kernels.CpuLayout / tvm_bcq.BcqCpuLayout for CPU QMatMul
    gpu_arrays: list[np.ndarray] | None = None  # GPU QMatMul weights split for dlight's GEMV rule
    # bcq_outliers: the corrections (int32 columns, float32 values, [rows, k]) after the kernel arrays
    # of the dense bcq part (``weight``)
    corrections: tuple[np.ndarray, np.ndarray] | None = None
    decoded: np.ndarray | None = None  # a bitmask weight on GPUs: float32 [cols, rows] (no kernel there)
    # a QGather of a table tied to a QMatMul: the node whose kernel arrays it reads (it stores none)
    reads: str | None = None

    def kernel_arrays(self) -> list[np.ndarray]:
        """What the kernel takes (and the artifact stores): the format's arrays, re-laid out."""
        if self.reads is not None:
            return []
        return [*self._dense_arrays(), *(self.corrections or ())]

    def _dense_arrays(self) -> list[np.ndarray]:
        if self.decoded is not None:
            return [self.decoded]
        if self.gpu_arrays is not None:
            return self.gpu_arrays
        if isinstance(self.layout, (tvm_sparse.SparseCpuLayout, tvm_sparse.BitmaskRowLayout)):
            return self.layout.arrays()
        if self.format == "bcq":
            return self.layout.arrays() if self.layout is not None else [self.weight.planes, self.weight.alphas]
        if self.layout is not None:
            return [self.layout.packed, self.layout.scales, self.layout.zero_points]
        return [self.weight.packed, self.weight.scales, self.weight.zero_points]

    def param_name(self, index: int) -> str:
        names = self.param_names
        if self.corrections is not None:  # the last two inputs name the last two arrays
            dense = len(self.kernel_arrays()) - 2
            if index >= dense:
                return names[-2 + index - dense]
            names = names[:-2]
        return names[index] if index < len(names) else f"{names[0]}.{index}"


def _quantized_layers(model: Model, cpu: bool, int8_activations: bool = False,
                      row_gemv: frozenset[str] | set[str] = frozenset()) -> dict[str, _Layer]:
    """The quantized nodes as the kernels take them; ``row_gemv``: nodes seen with GEMV rows,
    laid out for their GEMV kernel: bitmask ones for the one-row-per-task GEMV (see
    :meth:`QuantizedImporter._qmatmul_sparse`), ``bcq`` ones for the int8-activation kernel
    when ``int8_activations``."""
    layers: dict[str, _Layer] = {}
    for node in model.quantized_nodes():
        fmt = str(node.attrs.get("format", "int"))
        if node.attrs.get("sparse"):
            layers[node.name] = _sparse_layer(node, cpu, node.name in row_gemv)
            continue
        if fmt not in SUPPORTED_FORMATS:
            name = qops.format_name(node)
            raise UnsupportedModelError(f"backend tvm: {node.name}: format {name!r} is not supported yet "
                                        f"(supported: {', '.join(SUPPORTED_FORMATS)}; use --backend ort)")
        weight = qops.read_weight(node)
        names = [tensor.name for tensor in qops.weight_inputs(node)]
        corrections = None
        if fmt == "bcq_outliers":  # the bcq kernels, then the sparse corrections
            if not cpu:
                raise UnsupportedModelError(f"backend tvm: {node.name}: format 'bcq_outliers' has no GPU kernel yet "
                                            "(use --backend ort, or shiftadd(outliers=0) for TVM on CUDA)")
            corrections = (weight.outlier_cols.astype(np.int32), weight.corrections())
            weight, fmt = weight.dense, "bcq"
        layout: Any = None
        if cpu and node.op == "QMatMul":
            if fmt == "bcq":  # int8 activations for GEMV rows only (the lanes GEMM measured faster)
                vnni = int8_activations and node.name in row_gemv and tvm_bcq.vnni_eligible(weight)
                layout = tvm_bcq.vnni_layout(weight) if vnni else tvm_bcq.cpu_layout(weight)
            else:
                vnni = int8_activations and kernels.vnni_eligible(weight)
                layout = kernels.vnni_layout(weight) if vnni else kernels.cpu_layout(weight)
        gpu_arrays = None
        if not cpu and node.op == "QMatMul":
            if fmt == "bcq":
                gpu_arrays = tvm_bcq.gpu_arrays(weight)
            elif weight.bits == 3:
                gpu_arrays = [*kernels.split3_planes(weight), weight.scales, weight.zero_points]
        layers[node.name] = _Layer(node.name, node.op, fmt, weight, names, layout, gpu_arrays, corrections)
    _share_tied_tables(layers)
    return layers


def _share_tied_tables(layers: dict[str, _Layer]) -> None:
    """A QGather reading the same stored weight as a dense ``int`` or ``bcq`` QMatMul (a tied
    embedding / LM head) reads that layer's kernel arrays: in its CPU layout
    (``qgather_layout_te``, ``qgather_lanes_te``; bcq corrections included) or, on GPUs, the
    packed arrays both kernels take as stored. Without this the artifact held the table twice
    (SmolLM2 at 4 bits: 15 MB of a 90 MB build)."""
    def readable(layout) -> bool:
        return (layout is None or isinstance(layout, (kernels.CpuLayout, tvm_bcq.BcqCpuLayout))
                or (isinstance(layout, tvm_bcq.BcqVnniLayout) and layout.per_row))

    matmuls = {tuple(layer.param_names): layer for layer in layers.values()
               if layer.op == "QMatMul" and layer.format in ("int", "bcq") and layer.decoded is None
               and layer.gpu_arrays is None and (layer.corrections is None or layer.format == "bcq")
               and readable(layer.layout)}
    for layer in layers.values():
        source = matmuls.get(tuple(layer.param_names))
        if layer.op == "QGather" and source is not None and layer.format == source.format:
            layer.reads, layer.layout = source.node_name, source.layout


def _sparse_layer(node: gs.Node, cpu: bool, row_gemv: bool) -> _Layer:
    """A sparse ``int`` QMatMul: the kernels of :mod:`tvm_sparse` over the compact storage (a
    bitmask weight on GPUs: decoded to float, no kernel there)."""
    name = qops.format_name(node)
    weight = qops.read_weight(node)
    reason = None if node.op == "QMatMul" else f"{node.op} (only QMatMul)"
    reason = reason or (None if name in SPARSE_FORMATS else f"format {name!r}")
    reason = reason or tvm_sparse.unsupported_reason(weight)
    if reason:
        raise UnsupportedModelError(f"backend tvm: {node.name}: sparse {reason} is not supported yet "
                                    "(use --backend ort)")
    names = [tensor.name for tensor in qops.weight_inputs(node)]
    layer = _Layer(node.name, node.op, name, weight, names)
    if not cpu and weight.layout == "bitmask":
        layer.decoded = np.ascontiguousarray(weight.dequantize().T)
    elif cpu and row_gemv:
        layer.layout = tvm_sparse.bitmask_row_layout(weight)
    elif cpu:
        layer.layout = tvm_sparse.cpu_layout(weight)
    else:
        layer.gpu_arrays = tvm_sparse.gpu_arrays(weight)
    return layer


class QuantizedImporter(onnx_frontend.ONNXGraphImporter):
    """The Relax ONNX importer plus our lowering of ``qcompile`` quantized ops."""

    def __init__(self, layers: dict[str, _Layer], *, cpu: bool, shape_dict: dict, dtype_dict: dict,
                 bcq_gemv: str = tvm_bcq.DEFAULT_GEMV, gather: bool = False, int8_activations: bool = False) -> None:
        super().__init__(shape_dict, dtype_dict, keep_params_in_input=True, sanitize=False)
        self._int8_activations = int8_activations
        self._layers = layers
        self._cpu = cpu
        self._bcq_gemv = bcq_gemv
        self._gather = gather
        self._weight_vars: dict[tuple[str, int], relax.Var] = {}
        self._array_counts: dict[str, int] = {}
        self._kernel_cache: dict[tuple, tvm.ir.GlobalVar] = {}
        self.kernel_names: dict[str, str] = {}
        self.row_gemv: set[str] = set()  # bitmask / bcq layers seen with GEMV rows (re-imported for that kernel)

    # -- seams of the base importer ----------------------------------------------

    def _parse_graph_initializers(self, graph: onnx.GraphProto) -> None:
        """Quantized weights become ``main`` parameters (in kernel layout); the rest constants."""
        owned = {name: layer for layer in self._layers.values() for name in layer.param_names}
        for init_tensor in graph.initializer:
            if init_tensor.name not in owned:
                self._nodes[init_tensor.name] = relax.const(self._parse_array(init_tensor))
        for layer in self._layers.values():
            arrays = layer.kernel_arrays()
            self._array_counts[layer.node_name] = len(arrays)
            for index, array in enumerate(arrays):
                name = layer.param_name(index)
                if (layer.node_name, index) in self._weight_vars:
                    continue
                var = relax.Var(name, relax.TensorType(array.shape, str(array.dtype)))
                self._weight_vars[(layer.node_name, index)] = var
                self._nodes[name] = var
                self._params[f"{layer.node_name}:{index}"] = (var, tvm.runtime.tensor(array))
        for name in owned:  # inputs a layer's kernel arrays replace (a decoded sparse weight): never read
            self._nodes.setdefault(name, relax.const(np.zeros(1, np.uint8)))

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        convert_map = onnx_frontend._get_convert_map()
        unsupported = sorted({node.op_type for node in graph.node
                              if node.op_type not in convert_map and node.op_type not in ("If", "Constant")
                              and not (node.domain == qops.DOMAIN and node.op_type in qops.QUANTIZED_OPS)})
        if unsupported:
            raise UnsupportedModelError(
                f"backend tvm: the Relax ONNX importer does not support {', '.join(unsupported)} "
                "(use --backend ort for this model)")

    def _convert_operator(self, op_name, inputs, attrs, opset):
        layer = self._layers.get(attrs.get("tvm_custom", {}).get("name", ""))
        if layer is None or op_name != layer.op:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        if op_name == "QMatMul":
            lower = self._qmatmul_bcq if layer.format == "bcq" else self._qmatmul
            lower = self._qmatmul_sparse if layer.format in SPARSE_FORMATS else lower
            return self.bb.normalize(lower(layer, inputs[0]))
        if op_name == "QGather":
            return self.bb.normalize(self._qgather(layer, inputs[1]))
        return self._qconv(layer, inputs, attrs, opset)

    # -- lowering -----------------------------------------------------------------

    def _vars(self, layer: _Layer) -> list[relax.Var]:
        owner = layer.reads or layer.node_name
        return [self._weight_vars[(owner, index)] for index in range(self._array_counts[owner])]

    def _check_input(self, layer: _Layer, x: relax.Expr) -> None:
        if not _static(x):
            raise UnsupportedModelError(f"backend tvm: {layer.node_name}: input shape is not static "
                                        "(pass --input-shape NAME=DxD for every model input)")
        if _dtype(x) != "float32":
            raise UnsupportedModelError(f"backend tvm: {layer.node_name}: input is {_dtype(x)}, "
                                        "expected float32")

    def _qmatmul_bcq(self, layer: _Layer, x: relax.Expr) -> relax.Expr:
        """``bcq`` QMatMul: the CPU kernels of :mod:`tvm_bcq` over the re-laid-out planes and
        alpha codes, or its tensor-expression kernel for dlight (CUDA)."""
        weight = layer.weight
        self._check_input(layer, x)
        flat, leading = self._flatten_rows(x, weight.cols)
        rows = _shape(flat)[0]
        args, corrections = self._split_corrections(layer)
        inputs = flat
        layout = layer.layout
        if (self._int8_activations and rows <= tvm_bcq.GEMV_MAX_ROWS and tvm_bcq.vnni_eligible(weight)
                and not isinstance(layout, tvm_bcq.BcqVnniLayout)):
            self.row_gemv.add(layer.node_name)  # rows are known here only: re-imported with that layout
        if layout is not None:
            if layout.padded_cols != weight.cols:
                flat = self.bb.normalize(relax.op.nn.pad(flat, [0, 0, 0, layout.padded_cols - weight.cols]))
            kind = tvm_bcq.kernel_kind(rows, layout, self._bcq_gemv)
            key = ("bcq", rows, layout.planes.shape, layout.alphas.shape, weight.row_group, weight.col_group, kind)
            if key not in self._kernel_cache:
                func = tvm_bcq.qmatmul_cpu(rows, layout, self._bcq_gemv, self._gather)
                name = f"qmatmul_bcq{weight.bits}_{'gemm' if kind.startswith('GEMM') else 'gemv'}"
                self._kernel_cache[key] = self.bb.add_func(func, name)
            out = relax.call_tir(self._kernel_cache[key], [flat, *args],
                                 relax.TensorType([rows, layout.padded_rows], "float32"))
            result = self.bb.normalize(out)
            if layout.padded_rows != weight.rows:
                result = self.bb.normalize(relax.op.strided_slice(result, [1], [0], [weight.rows]))
            self.kernel_names[layer.node_name] = (f"tvm decode-fused {kind} bcq{weight.bits} {_bcq_layout(weight)} "
                                                  f"(cpu, {layout.lanes} lanes)")
        else:
            result = self.bb.normalize(self.bb.call_te(
                tvm_bcq.qmatmul_split_te, flat, *args, bits=weight.bits, row_group=weight.row_group,
                col_group=weight.col_group, cols=weight.cols, primfunc_name_hint=f"qmatmul_bcq{weight.bits}"))
            self.kernel_names[layer.node_name] = (f"tvm decode-fused matmul bcq{weight.bits} {_bcq_layout(weight)} "
                                                  "(dlight)")
        if corrections:
            padded = -(-rows // 16) * 16
            if padded != rows:
                inputs = self.bb.normalize(relax.op.nn.pad(inputs, [0, padded - rows, 0, 0]))
            transposed = self.bb.normalize(relax.op.permute_dims(inputs, [1, 0]))
            correction = self._corrections(layer, "matmul", [transposed], [weight.rows, padded],
                                           (padded, weight.rows, weight.cols))
            if padded != rows:
                correction = self.bb.normalize(relax.op.strided_slice(correction, [1], [0], [rows]))
            result = self.bb.normalize(relax.op.add(result, relax.op.permute_dims(correction, [1, 0])))
            self.kernel_names[layer.node_name] += f" + {layer.corrections[0].shape[1]} sparse corrections per row"
        return relax.op.reshape(result, [*leading, weight.rows])

    def _corrections(self, layer: _Layer, kind: str, leading: list[relax.Expr], shape: list[int],
                     sizes: tuple[int, ...]) -> relax.Expr:
        """The bcq_outliers corrections of ``layer`` by a :mod:`tvm_bcq` kernel: ``kind`` matmul
        (``sizes`` = padded M, N, K; the correction term alone), gather or rows (``sizes`` =
        rows, C; the decoded rows with their corrections)."""
        _, corrections = self._split_corrections(layer)
        vocab, per_row = layer.corrections[0].shape
        key = ("bcq_outliers", kind, *sizes, vocab, per_row)
        if key not in self._kernel_cache:
            func = (tvm_bcq.outlier_matmul_cpu(*sizes, per_row) if kind == "matmul"
                    else tvm_bcq.outlier_rows_cpu(*sizes, vocab, per_row, gather=kind == "gather"))
            self._kernel_cache[key] = self.bb.add_func(func, f"bcq_outliers_{kind}")
        return self.bb.normalize(relax.call_tir(self._kernel_cache[key], [*leading, *corrections],
                                                relax.TensorType(shape, "float32")))

    def _split_corrections(self, layer: _Layer) -> tuple[list[relax.Var], list[relax.Var]]:
        """A layer's kernel arguments and its bcq_outliers corrections (none for other formats)."""
        args = self._vars(layer)
        return (args[:-2], args[-2:]) if layer.corrections is not None else (args, [])

    def _qmatmul_sparse(self, layer: _Layer, x: relax.Expr) -> relax.Expr:
        """Sparse ``int`` QMatMul (:mod:`tvm_sparse`): CPU kernels over the compact codes and
        metadata, the N:M tensor expression for dlight (CUDA), a float matmul of the decoded
        weight for a bitmask weight on GPUs."""
        weight = layer.weight
        self._check_input(layer, x)
        flat, leading = self._flatten_rows(x, weight.cols)
        rows = _shape(flat)[0]
        label = f"{'bitmask' if weight.layout == 'bitmask' else weight.pattern} int{weight.bits}"
        if layer.decoded is not None:
            (decoded,) = self._vars(layer)
            result = self.bb.normalize(relax.op.matmul(flat, decoded))
            self.kernel_names[layer.node_name] = (f"tvm float32 matmul, sparse {label} decoded at load "
                                                  "(no bitmask kernel on GPUs)")
            return relax.op.reshape(result, [*leading, weight.rows])
        if (self._gather and rows <= kernels.GEMV_MAX_ROWS and tvm_sparse.rows_eligible(weight)
                and not isinstance(layer.layout, tvm_sparse.BitmaskRowLayout)):
            self.row_gemv.add(layer.node_name)  # rows are known here only (not through QGather's shape)
        args = self._vars(layer)
        kind = tvm_sparse.kernel_kind(rows)
        layout = layer.layout
        if layout is not None:
            if layout.x_cols != weight.cols:
                flat = self.bb.normalize(relax.op.nn.pad(flat, [0, 0, 0, layout.x_cols - weight.cols]))
            key = ("sparse", rows, layout.layout, weight.rows, *(a.shape for a in layout.arrays()), weight.bits,
                   layout.group_size, getattr(layout, "n", 0), getattr(layout, "m", 0), str(args[1].ty.dtype))
            if key not in self._kernel_cache:
                func = tvm_sparse.qmatmul_cpu(rows, layout, self._gather)
                self._kernel_cache[key] = self.bb.add_func(func, f"qmatmul{weight.bits}_{layout.layout}_{kind.lower()}")
            out = relax.call_tir(self._kernel_cache[key], [flat, *args],
                                 relax.TensorType([rows, layout.padded_rows], "float32"))
            result = self.bb.normalize(out)
            if layout.padded_rows != weight.rows:
                result = self.bb.normalize(relax.op.strided_slice(result, [1], [0], [weight.rows]))
            how = ("one row per task, vcompressps" if isinstance(layout, tvm_sparse.BitmaskRowLayout)
                   else f"{layout.lanes} lanes")
            if kind == "GEMV" and self._gather and isinstance(layout, tvm_sparse.SparseCpuLayout) \
                    and tvm_sparse.permutes(layout):
                how += ", vpermilps"
            self.kernel_names[layer.node_name] = f"tvm sparse {kind} {label} (cpu, {how})"
        else:
            p = weight.placement
            result = self.bb.normalize(self.bb.call_te(
                tvm_sparse.qmatmul_nm_te, flat, *args, bits=weight.bits, group_size=weight.group_size, n=p.n, m=p.m,
                cols=weight.cols, primfunc_name_hint=f"qmatmul{weight.bits}_nm"))
            self.kernel_names[layer.node_name] = f"tvm sparse decode-fused matmul {label} (dlight)"
        return relax.op.reshape(result, [*leading, weight.rows])

    def _flatten_rows(self, x: relax.Expr, width: int) -> tuple[relax.Expr, list[int]]:
        shape = _shape(x)
        if shape[-1] != width:
            raise UnsupportedModelError(f"backend tvm: input width {shape[-1]} does not match the weight's {width}")
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        return self.bb.normalize(relax.op.reshape(x, [rows, width])), shape[:-1]

    def _qmatmul(self, layer: _Layer, x: relax.Expr) -> relax.Expr:
        weight = layer.weight
        self._check_input(layer, x)
        flat, leading = self._flatten_rows(x, weight.cols)
        rows = _shape(flat)[0]
        padded_cols = weight.n_groups * weight.group_size
        if layer.layout is not None or layer.gpu_arrays is None:
            packed, scales, zero_points = self._vars(layer)
        if layer.layout is not None:
            if padded_cols != weight.cols:
                flat = self.bb.normalize(relax.op.nn.pad(flat, [0, 0, 0, padded_cols - weight.cols]))
            key = ("cpu", rows, layer.layout.packed.shape, weight.bits, weight.group_size, padded_cols)
            if key not in self._kernel_cache:
                func = kernels.qmatmul_cpu(rows, layer.layout, weight.bits, weight.group_size, padded_cols)
                name = f"qmatmul{weight.bits}_{'gemv' if rows <= kernels.GEMV_MAX_ROWS else 'gemm'}"
                name += "_int8" if layer.layout.kind == "vnni" else ""
                self._kernel_cache[key] = self.bb.add_func(func, name)
            out = relax.call_tir(self._kernel_cache[key], [flat, packed, scales, zero_points],
                                 relax.TensorType([rows, layer.layout.padded_rows], "float32"))
            result = self.bb.normalize(out)
            if layer.layout.padded_rows != weight.rows:
                result = self.bb.normalize(relax.op.strided_slice(result, [1], [0], [weight.rows]))
            kind = "GEMV" if rows <= kernels.GEMV_MAX_ROWS else "GEMM"
            detail = "int8 activations, VNNI" if layer.layout.kind == "vnni" else f"{layer.layout.lanes} lanes"
            self.kernel_names[layer.node_name] = f"tvm decode-fused {kind} int{weight.bits} (cpu, {detail})"
        elif layer.gpu_arrays is not None:  # 3 bits as a 2-bit and a 1-bit plane
            result = self.bb.normalize(self.bb.call_te(
                kernels.qmatmul3_te, flat, *self._vars(layer), weight.group_size, weight.cols,
                primfunc_name_hint=f"qmatmul{weight.bits}"))
            self.kernel_names[layer.node_name] = f"tvm decode-fused matmul int{weight.bits} 2+1-bit planes (dlight)"
        else:
            result = self.bb.normalize(self.bb.call_te(
                kernels.qmatmul_te, flat, packed, scales, zero_points, weight.bits, weight.group_size, weight.cols,
                primfunc_name_hint=f"qmatmul{weight.bits}"))
            self.kernel_names[layer.node_name] = f"tvm decode-fused matmul int{weight.bits} (dlight)"
        return relax.op.reshape(result, [*leading, weight.rows])

    def _qgather(self, layer: _Layer, indices: relax.Expr) -> relax.Expr:
        weight = layer.weight
        if not _static(indices):
            raise UnsupportedModelError(f"backend tvm: {layer.node_name}: indices shape is not static "
                                        "(pass --input-shape NAME=DxD for every model input)")
        shape = _shape(indices)
        count = int(np.prod(shape, dtype=np.int64))
        flat = self.bb.normalize(relax.op.reshape(indices, [count]))
        if layer.format == "bcq":
            (planes, *rest), corrections = self._split_corrections(layer)
            if isinstance(layer.layout, tvm_bcq.BcqCpuLayout):
                result = self.bb.normalize(self.bb.call_te(
                    tvm_bcq.qgather_lanes_te, planes, flat, *rest, weight.rows, weight.row_group, weight.col_group,
                    weight.cols, primfunc_name_hint=f"qgather_bcq{weight.bits}"))
            elif isinstance(layer.layout, tvm_bcq.BcqVnniLayout):
                result = self.bb.normalize(self.bb.call_te(
                    tvm_bcq.qgather_vnni_rows_te, planes, flat, *rest, weight.rows, weight.col_group, weight.cols,
                    primfunc_name_hint=f"qgather_bcq{weight.bits}"))
            else:
                result = self.bb.normalize(self.bb.call_te(
                    tvm_bcq.qgather_te, planes, flat, *rest, weight.row_group, weight.col_group, weight.cols,
                    primfunc_name_hint=f"qgather_bcq{weight.bits}"))
            self.kernel_names[layer.node_name] = f"tvm decode-fused gather bcq{weight.bits}"
            if layer.reads:
                self.kernel_names[layer.node_name] += f" (reads {layer.reads}'s arrays: tied table stored once)"
            if corrections:
                result = self._corrections(layer, "gather", [result, flat], [count, weight.cols], (count, weight.cols))
                self.kernel_names[layer.node_name] += " + sparse corrections"
            return relax.op.reshape(result, [*shape, weight.cols])
        packed, scales, zero_points = self._vars(layer)
        if isinstance(layer.layout, kernels.CpuLayout):
            result = self.bb.normalize(self.bb.call_te(
                kernels.qgather_layout_te, packed, flat, scales, zero_points, layer.layout.kind, layer.layout.lanes,
                weight.rows, weight.bits, weight.group_size, weight.cols, primfunc_name_hint=f"qgather{weight.bits}"))
        else:
            result = self.bb.normalize(self.bb.call_te(
                kernels.qgather_te, packed, flat, scales, zero_points, weight.bits, weight.group_size, weight.cols,
                primfunc_name_hint=f"qgather{weight.bits}"))
        self.kernel_names[layer.node_name] = f"tvm decode-fused gather int{weight.bits}"
        if layer.reads:
            self.kernel_names[layer.node_name] += f" (reads {layer.reads}'s arrays: tied table stored once)"
        return relax.op.reshape(result, [*shape, weight.cols])

    def _qconv(self, layer: _Layer, inputs, attrs, opset) -> relax.Expr:
        weight = layer.weight
        if layer.format == "bcq":
            args, corrections = self._split_corrections(layer)
            decoded = self.bb.normalize(self.bb.call_te(
                tvm_bcq.dequantize_te, *args, weight.row_group, weight.col_group, weight.cols,
                primfunc_name_hint=f"dequantize_bcq{weight.bits}"))
            if corrections:
                decoded = self._corrections(layer, "rows", [decoded], [weight.rows, weight.cols],
                                            (weight.rows, weight.cols))
        else:
            packed, scales, zero_points = self._vars(layer)
            decoded = self.bb.normalize(self.bb.call_te(
                kernels.dequantize_te, packed, scales, zero_points, weight.bits, weight.group_size, weight.cols,
                primfunc_name_hint=f"dequantize{weight.bits}"))
        shape = [int(d) for d in attrs["weight_shape"]]
        kernel = self.bb.normalize(relax.op.reshape(decoded, shape))
        conv_attrs = {k: v for k, v in attrs.items() if k in qops.CONV_ATTRIBUTES or k == "tvm_custom"}
        conv_inputs = onnx_frontend.onnx_input()
        for value in (inputs[0], kernel, inputs[4] if len(inputs) > 4 else None):
            conv_inputs.append(value)
        self.kernel_names[layer.node_name] = f"tvm decode {layer.format}{weight.bits} + conv2d (decoded each call)"
        return super()._convert_operator("Conv", conv_inputs, conv_attrs, opset)


def _bcq_layout(weight: Any) -> str:
    if weight.col_group == 1:
        return "column"
    if weight.row_group == 1:
        return "row"
    return "block" if weight.col_group % 8 == 0 else f"col_group={weight.col_group}"


def _static(expr: relax.Expr) -> bool:
    info = expr.ty
    return isinstance(info, relax.TensorType) and info.shape is not None and all(
        isinstance(d, tvm.tirx.IntImm) for d in info.shape.values)


def _shape(expr: relax.Expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


def _dtype(expr: relax.Expr) -> str:
    dtype = expr.ty.dtype
    return str(getattr(dtype, "dtype", dtype))


def static_proto(model: Model, input_shapes: dict[str, tuple[int, ...]] | None) -> onnx.ModelProto:
    """``model`` with its inputs fixed to ``input_shapes`` (others as they are), shapes
    inferred and the shape computations folded: what the Relax importer needs."""
    proto = mapped.materialize(model.to_proto())  # TVM's importer reads every weight
    if not input_shapes and all(d.HasField("dim_value") for v in proto.graph.input
                                for d in v.type.tensor_type.shape.dim):
        return proto
    _set_input_shapes(proto, dict(input_shapes or {}))
    for _ in range(4):  # folding can reveal shapes that let the next round fold more
        graph = gs.import_onnx(infer_shapes(proto))
        before = len(graph.nodes)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fold_constants(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.functions = [f for f in graph.functions if f.domain != qops.DOMAIN]
        folded = Model(graph, metadata=model.metadata, provenance=model.provenance, source=model.source)
        proto = folded.to_proto()
        if len(graph.nodes) == before:
            break
    return infer_shapes(proto)


def to_relax(model: Model, *, cpu: bool, input_shapes: dict[str, tuple[int, ...]] | None = None,
             int8_activations: bool = False, bcq_gemv: str = tvm_bcq.DEFAULT_GEMV,
             gather: bool = False) -> ImportResult:
    """Import ``model`` (canonical IR) into Relax, with ``input_shapes`` fixing dynamic inputs.

    ``int8_activations``: QMatMul layers use the AVX-512 VNNI kernel where their shape
    allows (activations quantized to int8 on the fly, like ``MatMulNBits`` at
    ``accuracy_level=4``). ``bcq_gemv``: the GEMV kernel of ``bcq`` layers (``plain`` or
    ``lut``); ``gather``: the target has AVX-512 (the LUT look-ups use ``vgatherdps``)."""
    proto = static_proto(model, input_shapes)
    model = Model.from_proto(proto)
    shapes, dtypes = {}, {}
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise UnsupportedModelError(
                f"backend tvm: input {value.name!r} has a dynamic shape; pass --input-shape "
                f"{value.name}=DxD... (the TVM artifact is compiled for static shapes)")
        shapes[value.name] = [d.dim_value for d in dims]
        dtypes[value.name] = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17)
    row_gemv: set[str] = set()
    while True:  # again when a bitmask layer's rows (known only while importing) call for its GEMV layout
        layers = _quantized_layers(model, cpu, int8_activations, row_gemv)
        importer = QuantizedImporter(layers, cpu=cpu, shape_dict=shapes, dtype_dict=dtypes, bcq_gemv=bcq_gemv,
                                     gather=gather, int8_activations=int8_activations)
        try:
            module = importer.from_onnx(proto.graph, opset)
        except UnsupportedModelError:
            raise
        except Exception as exc:
            log.debug("Relax import failed", exc_info=True)
            raise UnsupportedModelError(
                f"backend tvm: the Relax ONNX importer failed ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'})") from None
        if importer.row_gemv <= row_gemv:
            break
        row_gemv |= importer.row_gemv
    params = {name: value.numpy() for name, (_, value) in importer._params.items()}
    return ImportResult(module, params, list(shapes), shapes, [o.name for o in proto.graph.output], importer.kernel_names)
