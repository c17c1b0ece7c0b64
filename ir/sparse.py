"""Sparse storage of quantized weights: only the non-zeros are stored, plus where they go.

A sparse weight wraps any quantized-weight format (``int`` today, ``bcq`` the same way):
the non-zeros of each row are moved to the front ("compacted", in column order) and the
compact matrix ``[rows, width]`` is stored by the inner format, with its own group
parameters; a metadata input says where each stored value goes:

* ``bitmask``: one bit per weight (``[rows, ceil(cols / 8)]`` bytes, low bit first); the
  value of column ``j`` is compact value number ``popcount(mask[:j])``. Any pattern.
  ``width`` is the largest non-zero count of a row (rows with fewer pad with zeros).
* ``nm`` (N:M, e.g. 2:4): in every run of ``m`` columns, ``n`` stored values and their
  ``n`` positions in the run, ``ceil(log2 m)`` bits each; ``width = ceil(cols / m) * n``.
  2:4 costs 1 bit per weight like the bitmask, 1:4 and 2:8 less; it is the layout N:M
  sparse kernels (Ampere sparse tensor cores) read.

On a node the wrapping shows as one extra attribute: ``format`` stays the inner format's
name (``int``) and ``sparse`` names the layout, so the format registry key is
``"int.bitmask"`` / ``"int.nm"`` (:func:`registry_name`; :func:`qcompile.ir.qops.node_format`
reads it). ``cols`` is the dense reduction length; ``nnz_cols`` the compact width, which
the inner format's decode body sees as its ``cols``. The metadata input comes after the
inner format's inputs, so tools that know the inner layout find its inputs where they
always are. Decoding scatters the compact values through the metadata, so pruned weights
are exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .formats import FORMATS, FunctionBody, Weight, WeightFormat, format_named, register
from .qformat import pack_codes, unpack_codes

LAYOUTS = ("bitmask", "nm")
NM_GROUPS = (4, 8, 16)  # run lengths m tried when a mask is checked for an N:M pattern


def registry_name(inner_format: str, layout: str) -> str:
    return f"{inner_format}.{layout}"


def index_bits(m: int) -> int:
    """Bits per N:M position: ``ceil(log2 m)``, at least 1."""
    return max(1, (m - 1).bit_length())


# ----------------------------------------------------------------------------------
# Layouts: where the compact values of each row go
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Compact slot -> dense column, per row: ``positions`` and ``valid`` are ``[rows, width]``."""

    layout: str
    positions: np.ndarray  # int64 dense column of each compact slot
    valid: np.ndarray  # bool: the slot holds a kept weight (else it stores zero)
    metadata: np.ndarray  # uint8 [rows, ...]: packed bitmask or N:M positions
    cols: int
    n: int = 0
    m: int = 0

    @property
    def width(self) -> int:
        return int(self.positions.shape[1])

    def compact(self, matrix: np.ndarray, fill: np.ndarray | float = 0.0) -> np.ndarray:
        """The compact ``[rows, width]`` form of dense ``matrix``; empty slots get ``fill``."""
        taken = np.take_along_axis(matrix, self.positions, axis=1)
        return np.where(self.valid, taken, fill).astype(matrix.dtype)

    def slot_of(self) -> np.ndarray:
        """``[rows, cols]``: the compact slot of every kept weight (-1 where pruned)."""
        slots = np.full((self.positions.shape[0], self.cols), -1, np.int64)
        rows, slot = np.nonzero(self.valid)
        slots[rows, self.positions[rows, slot]] = slot
        return slots


def nm_pattern(mask: np.ndarray, groups: Sequence[int] = NM_GROUPS) -> tuple[int, int] | None:
    """The cheapest N:M pattern ``mask`` (``[rows, cols]``, True = kept) follows, if its
    metadata is no larger than a bitmask (``n * index_bits(m) <= m``); else None."""
    best: tuple[int, int] | None = None
    for m in groups:
        n = int(_grouped(mask, m).sum(-1).max(initial=0))
        cost = n * index_bits(m) / m  # metadata bits per weight
        if 0 < n < m and cost <= 1 and (best is None or cost < best[0] * index_bits(best[1]) / best[1]):
            best = (n, m)
    return best


def _grouped(mask: np.ndarray, m: int) -> np.ndarray:
    rows, cols = mask.shape
    padded = np.zeros((rows, -(-cols // m) * m), bool)
    padded[:, :cols] = mask
    return padded.reshape(rows, -1, m)


def place(mask: np.ndarray, layout: str, n: int = 0, m: int = 0) -> Placement:
    """Where the kept weights of ``mask`` go in ``layout`` (``nm`` needs ``n`` and ``m``)."""
    mask = np.asarray(mask, bool)
    rows, cols = mask.shape
    if layout == "bitmask":
        width = max(1, int(mask.sum(1).max(initial=0)))
        order = np.argsort(~mask, axis=1, kind="stable")[:, :width]  # kept columns first, in order
        valid = np.arange(width)[None, :] < mask.sum(1, keepdims=True)
        positions = np.where(valid, order, 0)
        padded = np.zeros((rows, -(-cols // 8) * 8), np.uint8)
        padded[:, :cols] = mask
        return Placement(layout, positions.astype(np.int64), valid, pack_codes(padded, 1), cols)
    if layout != "nm" or not 0 < n < m:
        raise ValueError(f"bad sparse layout {layout!r} n={n} m={m}")
    grouped = _grouped(mask, m)
    if grouped.sum(-1).max(initial=0) > n:
        raise ValueError(f"mask does not follow the {n}:{m} pattern")
    order = np.sort(np.argsort(~grouped, axis=-1, kind="stable")[..., :n], axis=-1)  # [rows, G, n]
    valid = np.take_along_axis(grouped, order, axis=-1).reshape(rows, -1)
    base = (np.arange(grouped.shape[1]) * m)[None, :, None]
    positions = (order + base).reshape(rows, -1)
    positions = np.where(positions < cols, positions, 0)  # slots in the padding past cols are empty
    bits = index_bits(m)
    indices = np.zeros((rows, -(-order.shape[1] * n // 8) * 8), np.uint8)
    indices[:, : order.shape[1] * n] = order.reshape(rows, -1)
    return Placement(layout, positions.astype(np.int64), valid, pack_codes(indices, bits), cols, n, m)


def placement_from_metadata(layout: str, metadata: np.ndarray, cols: int, width: int, n: int = 0,
                            m: int = 0) -> Placement:
    """Rebuild the placement of a stored weight from its metadata."""
    if layout == "bitmask":
        mask = unpack_codes(metadata, 1)[:, :cols].astype(bool)
        placement = place(mask, "bitmask")
        if placement.width < width:  # the stored width may exceed the densest row (all-zero rows)
            extra = width - placement.width
            return Placement(layout, np.pad(placement.positions, ((0, 0), (0, extra))),
                             np.pad(placement.valid, ((0, 0), (0, extra))), metadata, cols)
        return Placement(layout, placement.positions, placement.valid, metadata, cols)
    offsets = unpack_codes(metadata, index_bits(m))[:, :width].astype(np.int64)
    positions = offsets + (np.arange(width) // n * m)[None, :]
    valid = positions < cols
    return Placement(layout, np.where(valid, positions, 0), valid, metadata, cols, n, m)


# ----------------------------------------------------------------------------------
# The weight and its format
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseWeight:
    """A quantized compact matrix ``inner`` ``[rows, width]`` and where its values go."""

    inner: Weight
    placement: Placement

    @property
    def format(self) -> str:
        return registry_name(self.inner.format, self.placement.layout)

    @property
    def layout(self) -> str:
        return self.placement.layout

    @property
    def pattern(self) -> str:
        """``"bitmask"`` or ``"N:M"``."""
        p = self.placement
        return f"{p.n}:{p.m}" if p.layout == "nm" else "bitmask"

    @property
    def bits(self) -> int:
        return self.inner.bits

    @property
    def group_size(self) -> int:
        return self.inner.group_size

    @property
    def sym(self) -> bool:
        return bool(getattr(self.inner, "sym", False))

    @property
    def cols(self) -> int:
        return self.placement.cols

    @property
    def rows(self) -> int:
        return self.inner.rows

    @property
    def nbytes(self) -> int:
        return int(self.inner.nbytes + self.placement.metadata.nbytes)

    def mask(self) -> np.ndarray:
        """``[rows, cols]``: True where a weight is stored."""
        return self.placement.slot_of() >= 0

    def dequantize(self) -> np.ndarray:
        values = self.inner.dequantize()[:, : self.placement.width]
        dense = np.zeros((self.rows, self.cols), np.float32)
        rows, slot = np.nonzero(self.placement.valid)
        dense[rows, self.placement.positions[rows, slot]] = values[rows, slot]
        return dense


class SparseFormat(WeightFormat):
    """``<inner>.<layout>``: the inner format's inputs over the compact matrix, then the metadata."""

    def __init__(self, inner: WeightFormat, layout: str) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown sparse layout {layout!r} (known: {', '.join(LAYOUTS)})")
        self.inner = inner
        self.layout = layout
        self.name = registry_name(inner.name, layout)
        metadata = "mask" if layout == "bitmask" else "nm_indices"
        self.inputs = (*inner.inputs, metadata)
        extra = ("sparse", "nnz_cols") + (("sparse_n", "sparse_m", "index_bits") if layout == "nm" else ())
        self.attributes = (*inner.attributes, *extra)

    def node_attributes(self, weight: Any) -> dict[str, Any]:
        attrs = self.inner.node_attributes(weight.inner)
        attrs.update(cols=weight.cols, sparse=self.layout, nnz_cols=weight.placement.width)
        if self.layout == "nm":
            p = weight.placement
            attrs.update(sparse_n=p.n, sparse_m=p.m, index_bits=index_bits(p.m))
        return attrs

    def constants(self, prefix: str, weight: Any) -> list[gs.Constant]:
        suffix = "mask" if self.layout == "bitmask" else "nm_indices"
        return [*self.inner.constants(prefix, weight.inner),
                gs.Constant(f"{prefix}.{suffix}", weight.placement.metadata)]

    def _inner_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        return {**attrs, "cols": int(attrs["nnz_cols"])}

    def from_arrays(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> SparseWeight:
        *inner_arrays, metadata = arrays
        inner = self.inner.from_arrays(self._inner_attrs(attrs), inner_arrays)
        placement = placement_from_metadata(self.layout, np.asarray(metadata), int(attrs["cols"]),
                                            int(attrs["nnz_cols"]), int(attrs.get("sparse_n", 0)),
                                            int(attrs.get("sparse_m", 0)))
        return SparseWeight(inner, placement)

    def check(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> str | None:
        missing = [a for a in self.attributes if a not in attrs]
        if missing:
            return f"missing attributes {', '.join(missing)}"
        *inner_arrays, metadata = arrays
        problem = self.inner.check(self._inner_attrs(attrs), inner_arrays)
        if problem:
            return f"compact values: {problem}"
        rows, cols, width = inner_arrays[0].shape[0], int(attrs["cols"]), int(attrs["nnz_cols"])
        if self.layout == "bitmask":
            expected = (rows, -(-cols // 8))
        else:
            n, m, bits = (int(attrs[k]) for k in ("sparse_n", "sparse_m", "index_bits"))
            if not 0 < n < m or bits != index_bits(m) or width != -(-cols // m) * n:
                return f"bad N:M attributes n={n} m={m} index_bits={bits} nnz_cols={width} for cols={cols}"
            expected = (rows, -(-width // 8) * bits)
        if metadata.dtype != np.uint8 or metadata.shape != expected:
            return f"{self.inputs[-1]} is {metadata.dtype}{list(metadata.shape)}, expected uint8{list(expected)}"
        if self.layout == "bitmask" and int(unpack_codes(metadata, 1)[:, :cols].sum(1).max(initial=0)) > width:
            return f"mask holds more weights per row than nnz_cols={width}"
        return None

    def decode(self, body: FunctionBody, inputs: Sequence[str]) -> str:
        *inner_inputs, metadata = inputs
        first = len(body.nodes)
        compact = self.inner.decode(body, inner_inputs)
        for node in body.nodes[first:]:  # the inner format's `cols` is the compact width
            for attribute in node.attribute:
                if attribute.ref_attr_name == "cols":
                    attribute.ref_attr_name = "nnz_cols"
        if self.layout == "bitmask":
            return _scatter_bitmask(body, compact, metadata)
        return _scatter_nm(body, compact, metadata)


def _unpack(body: FunctionBody, packed: str, bits: str) -> str:
    """Packed ``bits``-bit codes ``[R, P]`` (low bits first, as :func:`pack_codes`) to int64 ``[R, P*8/bits]``."""
    zero, one, minus_one, eight = body.const([0]), body.const([1]), body.const([-1]), body.const(8)
    rows = body.op("Slice", body.op("Shape", packed), zero, one)
    runs = body.op("Reshape", packed, body.op("Concat", rows, minus_one, body.op("Unsqueeze", bits, zero), axis=0))
    runs = body.op("Pad", body.op("Cast", runs, to=TensorProto.INT64), body.const([0, 0, 0, 0, 0, 1]))
    bit_offsets = body.op("Mul", body.op("Range", body.const(0), eight, body.const(1)), bits)
    first_byte = body.op("Div", bit_offsets, eight)
    low = body.op("Gather", runs, first_byte, axis=2)
    high = body.op("Gather", runs, body.op("Add", first_byte, body.const(1)), axis=2)
    window = body.op("Add", low, body.op("Mul", high, body.const(256)))
    two = body.const(2)
    shifted = body.op("Div", window, body.op("Pow", two, body.op("Mod", bit_offsets, eight)))
    codes = body.op("Mod", shifted, body.op("Pow", two, bits))
    return body.op("Reshape", codes, body.op("Concat", rows, minus_one, axis=0))


def _scatter_bitmask(body: FunctionBody, compact: str, metadata: str) -> str:
    """Column ``j`` takes compact value ``popcount(mask[:j])`` where its bit is set, else 0."""
    zero, one = body.const([0]), body.const([1])
    cols = body.op("Unsqueeze", body.attr_const("cols"), zero)
    mask = body.op("Slice", _unpack(body, metadata, body.const(1)), zero, cols, one)
    before = body.op("Sub", body.op("CumSum", mask, body.const(1)), mask)  # kept weights left of j
    padded = body.op("Pad", compact, body.const([0, 0, 0, 1]))  # a zero slot: `before` may reach width
    gathered = body.op("GatherElements", padded, before, axis=1)
    return body.op("Mul", gathered, body.op("Cast", mask, to=TensorProto.FLOAT))


def _scatter_nm(body: FunctionBody, compact: str, metadata: str) -> str:
    """Slot ``s`` goes to column ``(s // n) * m + offset[s]``; the rest of each run is 0."""
    zero, one = body.const([0]), body.const([1])
    n, m = body.attr_const("sparse_n"), body.attr_const("sparse_m")
    width = body.op("Unsqueeze", body.attr_const("nnz_cols"), zero)
    offsets = body.op("Slice", _unpack(body, metadata, body.attr_const("index_bits")), zero, width, one)
    slots = body.op("Range", body.const(0), body.attr_const("nnz_cols"), body.const(1))
    base = body.op("Mul", body.op("Div", slots, n), m)
    positions = body.op("Add", offsets, base)
    rows = body.op("Slice", body.op("Shape", compact), zero, one)
    dense_width = body.op("Unsqueeze", body.op("Mul", body.op("Div", body.attr_const("nnz_cols"), n), m), zero)
    zeros = body.op("ConstantOfShape", body.op("Concat", rows, dense_width, axis=0),
                    value=onnx.helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    compact = body.op("Slice", compact, zero, width, one)
    dense = body.op("ScatterElements", zeros, positions, compact, axis=1)
    return body.op("Slice", dense, zero, body.op("Unsqueeze", body.attr_const("cols"), zero), one)


def sparse_format(inner_format: str, layout: str) -> SparseFormat:
    """The sparse wrapper of ``inner_format`` in ``layout``, registered on first use."""
    name = registry_name(inner_format, layout)
    existing = FORMATS.get(name)
    if isinstance(existing, SparseFormat):
        return existing
    return register(SparseFormat(format_named(inner_format), layout))  # type: ignore[return-value]


def sparse_weight(inner: Weight, placement: Placement) -> SparseWeight:
    """Wrap ``inner`` (the quantized compact matrix), registering its sparse format if needed."""
    sparse_format(inner.format, placement.layout)
    return SparseWeight(inner, placement)


def choose_placement(mask: np.ndarray, value_bits: float = 4.0) -> Placement:
    """The smaller of the two layouts for ``mask`` with values of ``value_bits`` bits each
    (scales included): N:M positions when the mask follows a pattern (2:4, 1:4, 2:8, ...)
    whose metadata costs no more than a bitmask, else a bitmask. Ties go to N:M, the
    layout sparse kernels read."""
    bitmask = place(mask, "bitmask")
    pattern = nm_pattern(mask)
    if pattern is None:
        return bitmask
    nm = place(mask, "nm", *pattern)
    nm_bits = nm.width * value_bits + nm.metadata.shape[1] * 8
    bitmask_bits = bitmask.width * value_bits + bitmask.metadata.shape[1] * 8
    return nm if nm_bits <= bitmask_bits else bitmask


for _layout in LAYOUTS:
    sparse_format("int", _layout)
