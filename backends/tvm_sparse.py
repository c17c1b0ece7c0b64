"""TIR kernels for sparse ``int`` weights (``int.nm`` and ``int.bitmask``, :mod:`qcompile.ir.sparse`).

The kernels read the compact storage as the file holds it: the packed codes of the
non-zeros (``[rows, width]`` compact matrix, with its own group scales and zero points)
and the metadata (N:M positions or the bitmask). Only the byte order changes at compile
time: like the dense CPU kernels (:mod:`qcompile.backends.tvm_kernels`), every array is
re-laid out row-interleaved (``[rows / lanes, bytes, lanes]``) so each SIMD lane owns one
output row.

* ``int.nm`` GEMV (a few activation rows): the loop runs over the compact slots only
  (``n / m`` of the weights); slot ``s`` of a lane multiplies activation
  ``(s // n) * m + offset``, picked from the run's ``m`` activations by the decoded offset
  (``vpermilps`` for runs of 4 on AVX-512, else a select chain: vector compares and
  blends, no gather); scale and zero point are applied once per compact group
  (``s * (sum x*c - z * sum x)``, ``sum x`` over the activations actually picked).
* ``int.nm`` GEMM (more rows): each tile of 32 compact slots is decoded to a dense float
  tile in L1 (``m / n`` times as many columns: each dense column takes the slot whose
  offset matches) and reused by every activation row, as the dense int GEMM does.
* ``int.bitmask`` GEMV on AVX-512 (2/4/8 bits, :func:`bitmask_gemv_rows`): one output row
  per task instead of lanes: the activations are compressed through the row's mask
  (``vcompressps``) into compact order and dotted with the row's compact codes, re-packed
  so one vector load gives 16 consecutive slots.
* ``int.bitmask`` otherwise (lanes over rows): a lane's compact value for dense column
  ``j`` is number ``popcount(mask[:j])`` of its row, so every lane keeps its own running
  count and reads its code at its own position (per-lane loads: the rows of a vector do
  not advance together). Tiles of 64 columns whose mask bytes are zero for all the block's
  rows are skipped. GEMV: the decoded value meets the activation directly; GEMM: a dense
  tile is decoded once and reused per activation row.
* generic (CUDA): ``int.nm`` as a tensor expression that decodes each dense weight from
  its run's ``n`` slots inside the reduction (dlight schedules it); ``int.bitmask`` has no
  GPU kernel (the prefix count has no affine form): the backend decodes it to float.

The choice between them is made by the importer (:mod:`qcompile.backends.tvm_import`),
which knows the activation rows; ``benchmarks/sparse_gemv.py`` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

from qcompile.ir.sparse import SparseWeight, index_bits

from . import tvm_kernels as kernels
from .tvm_kernels import CpuLayout, _code

TILE_SLOTS = 32  # compact slots per decoded tile of the N:M GEMM
BITMASK_TILE = 64  # dense columns per tile of the bitmask kernels


@dataclass(frozen=True)
class SparseCpuLayout:
    """A sparse weight re-laid out for :func:`qmatmul_cpu`: the compact codes, scales and zero
    points as the dense int kernels take them, and the metadata ``[rows / lanes, bytes, lanes]``."""

    values: CpuLayout
    metadata: np.ndarray
    layout: str  # "nm" | "bitmask"
    bits: int
    group_size: int
    x_cols: int  # activation columns the kernel reads (zero-padded past the weight's cols)
    n: int = 0
    m: int = 0

    @property
    def lanes(self) -> int:
        return self.values.lanes

    @property
    def padded_rows(self) -> int:
        return self.values.padded_rows

    def arrays(self) -> list[np.ndarray]:
        return [self.values.packed, self.values.scales, self.values.zero_points, self.metadata]


def unsupported_reason(weight: SparseWeight) -> str | None:
    """Why the CPU kernels cannot take ``weight`` (None when they can)."""
    inner = weight.inner
    if inner.format != "int":
        return f"inner format {inner.format!r} (only int)"
    if inner.group_size % 8:
        return f"group size {inner.group_size} is not a multiple of 8"
    if weight.layout == "nm" and inner.group_size % weight.placement.n:
        return f"group size {inner.group_size} is not a multiple of N={weight.placement.n}"
    return None


def _interleave(values: np.ndarray, lanes: int, width: int) -> np.ndarray:
    """``[rows, w]`` uint8 -> ``[rows_pad / lanes, width, lanes]`` (zero padded rows and columns)."""
    rows = values.shape[0]
    padded = -(-rows // lanes) * lanes
    full = np.zeros((padded, width), np.uint8)
    full[:rows, : values.shape[1]] = values
    return np.ascontiguousarray(full.reshape(padded // lanes, lanes, width).transpose(0, 2, 1))


def cpu_layout(weight: SparseWeight) -> SparseCpuLayout:
    inner = weight.inner
    values = kernels.cpu_layout(inner)
    slots = inner.n_groups * inner.group_size  # compact slots the packed codes hold
    p = weight.placement
    if weight.layout == "nm":
        ib = index_bits(p.m)
        metadata = _interleave(p.metadata, values.lanes, slots // 8 * ib)
        return SparseCpuLayout(values, metadata, "nm", inner.bits, inner.group_size, slots // p.n * p.m, p.n, p.m)
    tile_bytes = BITMASK_TILE // 8
    mask_bytes = -(-p.metadata.shape[1] // tile_bytes) * tile_bytes
    metadata = _interleave(p.metadata, values.lanes, mask_bytes)
    return SparseCpuLayout(values, metadata, "bitmask", inner.bits, inner.group_size, mask_bytes * 8)


def qmatmul_cpu(rows_in: int, layout: SparseCpuLayout | BitmaskRowLayout, avx512: bool = False) -> tirx.PrimFunc:
    """``Y[M, N_pad] = X[M, x_cols] @ decode(W).T`` as a scheduled CPU PrimFunc (``avx512``:
    the target has AVX-512F, for the N:M GEMV's ``vpermilps``)."""
    if isinstance(layout, BitmaskRowLayout):
        return bitmask_gemv_rows(rows_in, layout)
    gemv = rows_in <= kernels.GEMV_MAX_ROWS
    if layout.layout == "nm":
        return _nm_gemv(rows_in, layout, avx512 and permutes(layout)) if gemv else _nm_gemm(rows_in, layout)
    return _bitmask_kernel(rows_in, layout, gemv)


def kernel_kind(rows_in: int) -> str:
    return "GEMV" if rows_in <= kernels.GEMV_MAX_ROWS else "GEMM"


def permutes(layout: SparseCpuLayout) -> bool:
    """The N:M GEMV picks activations with ``vpermilps`` (AVX-512): runs of 4, whole 16-lane vectors."""
    return layout.layout == "nm" and layout.m == 4 and layout.lanes % 16 == 0


def _permute_x(x, row, base, offsets):
    """``x[row, base + offsets]`` for an int32x16 vector of offsets in ``[0, 4)``: the run's 4
    activations repeated in every 128-bit lane, permuted by ``vpermilps`` (one instruction
    where the select chain takes three compares and three blends)."""
    table = tirx.Shuffle([x[row, T.ramp(base, 1, 4)]] * 4, list(range(16)))
    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.vpermilvar.ps.512", table, offsets)


def _offsets16(idx, nb, byte, shift: int, ib: int, v):
    """The N:M offsets of 16 lanes (``v``-th vector of the block) as int32x16."""
    packed = T.Cast("int32x16", idx[nb, byte, T.ramp(v * 16, 1, 16)])
    return T.bitwise_and(T.shift_right(packed, T.broadcast(shift, 16)), T.broadcast((1 << ib) - 1, 16))


def _pick_x(x, row, base, offset, m: int):
    """Activation ``x[row, base + offset]`` for a vector ``offset`` in ``[0, m)``: a select
    chain over the run's ``m`` (broadcast) activations, which vectorizes to compares and
    blends; past 8 a per-lane load."""
    if m > 8:
        return x[row, base + offset]
    value = x[row, base + m - 1]
    for k in range(m - 2, -1, -1):
        value = T.Select(offset == k, x[row, base + k], value)
    return value


def _nm_gemv(M: int, layout: SparseCpuLayout, permute: bool = False) -> tirx.PrimFunc:
    if permute:
        return _nm_gemv_permute(M, layout)
    values = layout.values
    L, NB, KB = values.lanes, values.packed.shape[0], values.packed.shape[1]
    G = values.scales.shape[1]
    gs, bits, n, m = layout.group_size, layout.bits, layout.n, layout.m
    ib = index_bits(m)
    MB = layout.metadata.shape[1]
    K = layout.x_cols
    RB, IB = gs * bits // 8, gs * ib // 8
    SD = str(values.scales.dtype)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, KB, L), "uint8"),
               s: T.Buffer((NB, G, L), SD), z: T.Buffer((NB, G, L), "uint8"),
               idx: T.Buffer((NB, MB, L), "uint8"), y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for nb in T.parallel(NB):
            acc = T.alloc_buffer((L,), "float32", scope="local")
            part = T.alloc_buffer((L,), "float32", scope="local")
            xs = T.alloc_buffer((L,), "float32", scope="local")
            xv = T.alloc_buffer((L,), "float32", scope="local")
            for mm in range(M):
                for lane in T.vectorized(L):
                    acc[lane] = T.float32(0)
                for g in range(G):
                    for lane in T.vectorized(L):
                        part[lane] = T.float32(0)
                        xs[lane] = T.float32(0)
                    for r in range(gs // 8):
                        for i in T.unroll(8):
                            for lane in T.vectorized(L):
                                xv[lane] = _pick_x(x, mm, ((g * gs + r * 8 + i) // n) * m,
                                                   _code(idx, nb, g * IB + r * ib, i, lane, ib), m)
                                part[lane] = part[lane] + xv[lane] * T.Cast(
                                    "float32", _code(w, nb, g * RB + r * bits, i, lane, bits))
                                xs[lane] = xs[lane] + xv[lane]
                    for lane in T.vectorized(L):
                        acc[lane] = acc[lane] + T.Cast("float32", s[nb, g, lane]) * (
                            part[lane] - T.Cast("float32", z[nb, g, lane]) * xs[lane])
                for lane in T.vectorized(L):
                    y[mm, nb * L + lane] = acc[lane]

    return kernel


def _nm_gemv_permute(M: int, layout: SparseCpuLayout) -> tirx.PrimFunc:
    """:func:`_nm_gemv` for runs of 4 on AVX-512: activations picked by :func:`_permute_x`
    (measured 1.4x faster than the select chain at 4096² 2:4)."""
    values = layout.values
    L, NB, KB = values.lanes, values.packed.shape[0], values.packed.shape[1]
    G = values.scales.shape[1]
    gs, bits, n = layout.group_size, layout.bits, layout.n
    ib = index_bits(4)
    MB = layout.metadata.shape[1]
    K = layout.x_cols
    RB, IB = gs * bits // 8, gs * ib // 8
    SD = str(values.scales.dtype)
    V = L // 16

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, KB, L), "uint8"),
               s: T.Buffer((NB, G, L), SD), z: T.Buffer((NB, G, L), "uint8"),
               idx: T.Buffer((NB, MB, L), "uint8"), y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for nb in T.parallel(NB):
            acc = T.alloc_buffer((L,), "float32", scope="local")
            part = T.alloc_buffer((L,), "float32", scope="local")
            xs = T.alloc_buffer((L,), "float32", scope="local")
            xv = T.alloc_buffer((L,), "float32", scope="local")
            for mm in range(M):
                for lane in T.vectorized(L):
                    acc[lane] = T.float32(0)
                for g in range(G):
                    for lane in T.vectorized(L):
                        part[lane] = T.float32(0)
                        xs[lane] = T.float32(0)
                    for r in range(gs // 8):
                        for i in T.unroll(8):
                            for v in T.unroll(V):
                                xv[T.ramp(v * 16, 1, 16)] = _permute_x(
                                    x, mm, ((g * gs + r * 8 + i) // n) * 4,
                                    _offsets16(idx, nb, g * IB + r * ib + (i * ib) // 8, (i * ib) % 8, ib, v))
                            for lane in T.vectorized(L):
                                part[lane] = part[lane] + xv[lane] * T.Cast(
                                    "float32", _code(w, nb, g * RB + r * bits, i, lane, bits))
                                xs[lane] = xs[lane] + xv[lane]
                    for lane in T.vectorized(L):
                        acc[lane] = acc[lane] + T.Cast("float32", s[nb, g, lane]) * (
                            part[lane] - T.Cast("float32", z[nb, g, lane]) * xs[lane])
                for lane in T.vectorized(L):
                    y[mm, nb * L + lane] = acc[lane]

    return kernel


def _tile_slots(gs: int) -> int:
    return next(t for t in (TILE_SLOTS, 16, 8) if gs % t == 0)


def _nm_value(vals, offs, run, c, lane, n: int):
    """The dense value at column ``c`` of run ``run``: the run's slot whose offset is ``c``, else 0."""
    value = T.Select(offs[run * n, lane] == c, vals[run * n, lane], T.float32(0))
    for u in range(1, n):
        value = T.Select(offs[run * n + u, lane] == c, vals[run * n + u, lane], value)
    return value


def _nm_gemm(M: int, layout: SparseCpuLayout) -> tirx.PrimFunc:
    values = layout.values
    L, NB, KB = values.lanes, values.packed.shape[0], values.packed.shape[1]
    G = values.scales.shape[1]
    gs, bits, n, m = layout.group_size, layout.bits, layout.n, layout.m
    ib = index_bits(m)
    MB = layout.metadata.shape[1]
    K = layout.x_cols
    TS = _tile_slots(gs)
    TC = TS // n * m
    NT = G * gs // TS
    MR = kernels._row_tile(M, L)
    SD = str(values.scales.dtype)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, KB, L), "uint8"),
               s: T.Buffer((NB, G, L), SD), z: T.Buffer((NB, G, L), "uint8"),
               idx: T.Buffer((NB, MB, L), "uint8"), y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for nb in T.parallel(NB):
            vals = T.alloc_buffer((TS, L), "float32", scope="local")
            offs = T.alloc_buffer((TS, L), "int32", scope="local")
            tile = T.alloc_buffer((TC, L), "float32", scope="local")
            acc = T.alloc_buffer((MR, L), "float32", scope="local")
            for mm in range(M):
                for lane in T.vectorized(L):
                    y[mm, nb * L + lane] = T.float32(0)
            for t in range(NT):
                for q in range(TS // 8):
                    for i in T.unroll(8):
                        for lane in T.vectorized(L):
                            vals[q * 8 + i, lane] = (
                                T.Cast("float32", _code(w, nb, (t * (TS // 8) + q) * bits, i, lane, bits))
                                - T.Cast("float32", z[nb, t * TS // gs, lane])) * T.Cast("float32", s[nb, t * TS // gs, lane])
                            offs[q * 8 + i, lane] = _code(idx, nb, (t * (TS // 8) + q) * ib, i, lane, ib)
                for run in range(TS // n):
                    for c in T.unroll(m):
                        for lane in T.vectorized(L):
                            tile[run * m + c, lane] = _nm_value(vals, offs, run, c, lane, n)
                for mb in range(M // MR):
                    for row in T.unroll(MR):
                        for lane in T.vectorized(L):
                            acc[row, lane] = y[mb * MR + row, nb * L + lane]
                    for kk in range(TC):
                        for row in T.unroll(MR):
                            for lane in T.vectorized(L):
                                acc[row, lane] = acc[row, lane] + x[mb * MR + row, t * TC + kk] * tile[kk, lane]
                    for row in T.unroll(MR):
                        for lane in T.vectorized(L):
                            y[mb * MR + row, nb * L + lane] = acc[row, lane]

    return kernel


def _code_at(w, nb, slot, lane, bits: int):
    """Code number ``slot`` (a per-lane vector) of a lane's compact row."""
    mask = (1 << bits) - 1
    base = (slot // 8) * bits
    bit = (slot % 8) * bits
    low = T.Cast("int32", w[nb, base + bit // 8, lane])
    if bits in (2, 4, 8):
        return T.bitwise_and(T.shift_right(low, bit % 8), mask)
    high = T.Cast("int32", w[nb, base + T.min(bit // 8 + 1, bits - 1), lane])
    return T.bitwise_and(T.shift_right(T.bitwise_or(low, T.shift_left(high, 8)), bit % 8), mask)


def _bitmask_kernel(M: int, layout: SparseCpuLayout, gemv: bool) -> tirx.PrimFunc:
    values = layout.values
    L, NB, KB = values.lanes, values.packed.shape[0], values.packed.shape[1]
    G = values.scales.shape[1]
    gs, bits = layout.group_size, layout.bits
    slots = G * gs
    MB = layout.metadata.shape[1]
    K = layout.x_cols
    TC = BITMASK_TILE
    TB = TC // 8
    NT = K // TC
    MR = 1 if gemv else kernels._row_tile(M, L)
    SD = str(values.scales.dtype)

    def value(w, s, z, nb, slot, lane):
        group = slot // gs
        return (T.Cast("float32", _code_at(w, nb, slot, lane, bits)) - T.Cast("float32", z[nb, group, lane])) * T.Cast(
            "float32", s[nb, group, lane])

    @T.prim_func(private=True, s_tir=True)
    def gemv_kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, KB, L), "uint8"),
                    s: T.Buffer((NB, G, L), SD), z: T.Buffer((NB, G, L), "uint8"),
                    mask: T.Buffer((NB, MB, L), "uint8"), y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for nb in T.parallel(NB):
            cnt = T.alloc_buffer((L,), "int32", scope="local")
            bit = T.alloc_buffer((L,), "int32", scope="local")
            wv = T.alloc_buffer((L,), "float32", scope="local")
            acc = T.alloc_buffer((M, L), "float32", scope="local")
            seen = T.alloc_buffer((1,), "int32", scope="local")
            for lane in T.vectorized(L):
                cnt[lane] = 0
            for mm in range(M):
                for lane in T.vectorized(L):
                    acc[mm, lane] = T.float32(0)
            for t in range(NT):
                seen[0] = 0
                for b in range(TB):
                    for lane in range(L):
                        seen[0] = T.bitwise_or(seen[0], T.Cast("int32", mask[nb, t * TB + b, lane]))
                if seen[0] != 0:
                    for j in range(TC):
                        for lane in T.vectorized(L):
                            bit[lane] = T.bitwise_and(T.shift_right(T.Cast("int32", mask[nb, t * TB + j // 8, lane]), j % 8), 1)
                            wv[lane] = T.Select(bit[lane] == 1, value(w, s, z, nb, T.min(cnt[lane], slots - 1), lane),
                                                T.float32(0))
                            cnt[lane] = cnt[lane] + bit[lane]
                        for mm in range(M):
                            for lane in T.vectorized(L):
                                acc[mm, lane] = acc[mm, lane] + x[mm, t * TC + j] * wv[lane]
            for mm in range(M):
                for lane in T.vectorized(L):
                    y[mm, nb * L + lane] = acc[mm, lane]

    @T.prim_func(private=True, s_tir=True)
    def gemm_kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, KB, L), "uint8"),
                    s: T.Buffer((NB, G, L), SD), z: T.Buffer((NB, G, L), "uint8"),
                    mask: T.Buffer((NB, MB, L), "uint8"), y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for nb in T.parallel(NB):
            cnt = T.alloc_buffer((L,), "int32", scope="local")
            bit = T.alloc_buffer((L,), "int32", scope="local")
            tile = T.alloc_buffer((TC, L), "float32", scope="local")
            acc = T.alloc_buffer((MR, L), "float32", scope="local")
            seen = T.alloc_buffer((1,), "int32", scope="local")
            for lane in T.vectorized(L):
                cnt[lane] = 0
            for mm in range(M):
                for lane in T.vectorized(L):
                    y[mm, nb * L + lane] = T.float32(0)
            for t in range(NT):
                seen[0] = 0
                for b in range(TB):
                    for lane in range(L):
                        seen[0] = T.bitwise_or(seen[0], T.Cast("int32", mask[nb, t * TB + b, lane]))
                if seen[0] != 0:
                    for j in range(TC):
                        for lane in T.vectorized(L):
                            bit[lane] = T.bitwise_and(T.shift_right(T.Cast("int32", mask[nb, t * TB + j // 8, lane]), j % 8), 1)
                            tile[j, lane] = T.Select(bit[lane] == 1,
                                                     value(w, s, z, nb, T.min(cnt[lane], slots - 1), lane), T.float32(0))
                            cnt[lane] = cnt[lane] + bit[lane]
                    for mb in range(M // MR):
                        for row in T.unroll(MR):
                            for lane in T.vectorized(L):
                                acc[row, lane] = y[mb * MR + row, nb * L + lane]
                        for kk in range(TC):
                            for row in T.unroll(MR):
                                for lane in T.vectorized(L):
                                    acc[row, lane] = acc[row, lane] + x[mb * MR + row, t * TC + kk] * tile[kk, lane]
                        for row in T.unroll(MR):
                            for lane in T.vectorized(L):
                                y[mb * MR + row, nb * L + lane] = acc[row, lane]

    return gemv_kernel if gemv else gemm_kernel


# ----------------------------------------------------------------------------------
# Bitmask GEMV, one output row at a time (AVX-512 ``vcompressps``)
# ----------------------------------------------------------------------------------

COMPRESS_BITS = (2, 4, 8)  # codes that fill 32-bit words exactly
ROW_TASK = 32  # output rows per parallel task (its buffers are allocated once per task)


@dataclass(frozen=True)
class BitmaskRowLayout:
    """A bitmask weight for :func:`bitmask_gemv_rows`: the mask as stored (``[rows, bytes]``,
    padded to 16-column chunks), scales and zero points as stored (``[rows, groups]``) and the
    compact codes re-packed into 32-bit words so that one vector load yields 16 consecutive
    compact slots: slot ``16 * (C * b + i) + lane`` is field ``i`` of word ``16 * b + lane``
    (``C = 32 / bits`` fields per word). Same bits per code, only their order changes."""

    words: np.ndarray  # uint32 [rows, slots / C]
    scales: np.ndarray
    zero_points: np.ndarray
    mask: np.ndarray  # uint8 [rows, x_cols / 8]
    bits: int
    group_size: int
    x_cols: int
    layout: str = "bitmask-rows"
    lanes: int = 16

    @property
    def padded_rows(self) -> int:
        return int(self.words.shape[0])

    def arrays(self) -> list[np.ndarray]:
        return [self.words, self.scales, self.zero_points, self.mask]


def rows_eligible(weight: SparseWeight) -> bool:
    """:func:`bitmask_gemv_rows` applies: bitmask, 2/4/8 bits, groups of whole 16-slot vectors."""
    inner = weight.inner
    return weight.layout == "bitmask" and inner.bits in COMPRESS_BITS and inner.group_size % 16 == 0


def bitmask_row_layout(weight: SparseWeight) -> BitmaskRowLayout:
    from qcompile.ir.qformat import unpack_codes

    inner = weight.inner
    bits, per_word = inner.bits, 32 // inner.bits
    codes = unpack_codes(inner.packed, bits).astype(np.uint32)  # [rows, slots]
    rows, slots = codes.shape
    block = 16 * per_word
    padded = np.zeros((rows, -(-slots // block) * block), np.uint32)
    padded[:, :slots] = codes
    fields = padded.reshape(rows, -1, per_word, 16)  # [rows, blocks, field i, lane]
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :, None]
    words = np.bitwise_or.reduce(fields << shifts, axis=2).reshape(rows, -1)
    mask = weight.placement.metadata
    chunk_bytes = -(-mask.shape[1] // 2) * 2
    full = np.zeros((rows, chunk_bytes), np.uint8)
    full[:, : mask.shape[1]] = mask
    return BitmaskRowLayout(np.ascontiguousarray(words), inner.scales, inner.zero_points, full, bits,
                            inner.group_size, chunk_bytes * 8)


def bitmask_gemv_rows(M: int, layout: BitmaskRowLayout) -> tirx.PrimFunc:
    """``Y[M, N] = X[M, x_cols] @ decode(W).T`` for a bitmask weight, one output row per task:
    each activation row is first compressed through the row's mask (``vcompressps``, 16
    columns per instruction: the activations of the kept weights, in compact order), then
    dotted with the row's compact codes, 16 slots per vector, scale and zero point once per
    group. Work and reads scale with the kept weights, as for a dense row of that width."""
    N, NW = layout.words.shape
    G = layout.scales.shape[1]
    gs, bits = layout.group_size, layout.bits
    C = 32 // bits
    slots = NW * C
    K = layout.x_cols
    Q, MB = K // 16, layout.mask.shape[1]
    code_mask = (1 << bits) - 1
    SD = str(layout.scales.dtype)
    ramp = T.ramp(0, 1, 16)

    def kept(chunk):
        return T.bitwise_and(T.shift_right(T.broadcast(chunk, 16), ramp), T.broadcast(1, 16)) != T.broadcast(0, 16)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((N, NW), "uint32"), s: T.Buffer((N, G), SD),
               z: T.Buffer((N, G), "uint8"), mask: T.Buffer((N, MB), "uint8"), y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for task in T.parallel(-(-N // ROW_TASK)):
            xc = T.alloc_buffer((M, slots + 16), "float32", scope="local")
            acc = T.alloc_buffer((M, 16), "float32", scope="local")
            part = T.alloc_buffer((M, 16), "float32", scope="local")
            xs = T.alloc_buffer((M, 16), "float32", scope="local")
            code = T.alloc_buffer((16,), "float32", scope="local")
            cnt = T.alloc_buffer((1,), "int32", scope="local")
            for r in range(task * ROW_TASK, T.min(N, task * ROW_TASK + ROW_TASK)):
                for mm in range(M):
                    for v in range(slots // 16 + 1):
                        for lane in T.vectorized(16):
                            xc[mm, v * 16 + lane] = T.float32(0)
                    cnt[0] = 0
                    for q in range(Q):
                        xc[mm, T.ramp(cnt[0], 1, 16)] = T.call_llvm_pure_intrin(
                            "float32x16", "llvm.x86.avx512.mask.compress", x[mm, T.ramp(q * 16, 1, 16)],
                            T.broadcast(T.float32(0), 16),
                            kept(T.bitwise_or(T.Cast("int32", mask[r, q * 2]),
                                              T.shift_left(T.Cast("int32", mask[r, q * 2 + 1]), 8))))
                        cnt[0] = cnt[0] + T.popcount(T.bitwise_or(T.Cast("int32", mask[r, q * 2]),
                                                                  T.shift_left(T.Cast("int32", mask[r, q * 2 + 1]), 8)))
                    for lane in T.vectorized(16):
                        acc[mm, lane] = T.float32(0)
                for g in range(G):
                    for mm in range(M):
                        for lane in T.vectorized(16):
                            part[mm, lane] = T.float32(0)
                            xs[mm, lane] = T.float32(0)
                    for vv in range(gs // 16):
                        for lane in T.vectorized(16):
                            code[lane] = T.Cast("float32", T.bitwise_and(
                                T.shift_right(w[r, ((g * (gs // 16) + vv) // C) * 16 + lane],
                                              T.Cast("uint32", ((g * (gs // 16) + vv) % C) * bits)), T.uint32(code_mask)))
                        for mm in range(M):
                            for lane in T.vectorized(16):
                                part[mm, lane] = part[mm, lane] + xc[mm, (g * (gs // 16) + vv) * 16 + lane] * code[lane]
                                xs[mm, lane] = xs[mm, lane] + xc[mm, (g * (gs // 16) + vv) * 16 + lane]
                    for mm in range(M):
                        for lane in T.vectorized(16):
                            acc[mm, lane] = acc[mm, lane] + T.Cast("float32", s[r, g]) * (
                                part[mm, lane] - T.Cast("float32", z[r, g]) * xs[mm, lane])
                for mm in range(M):
                    y[mm, r] = T.float32(0)
                    for lane in range(16):
                        y[mm, r] = y[mm, r] + acc[mm, lane]

    return kernel


# ----------------------------------------------------------------------------------
# Generic (tensor expression) kernel: N:M for dlight (CUDA)
# ----------------------------------------------------------------------------------


def gpu_arrays(weight: SparseWeight) -> list[np.ndarray]:
    inner = weight.inner
    return [inner.packed, inner.scales, inner.zero_points, weight.placement.metadata]


def _offset_te(metadata, row, slot, ib: int):
    base = (slot // 8) * ib
    bit = (slot % 8) * ib
    low = metadata[row, base + bit // 8].astype("int32")
    if ib in (2, 4, 8):
        return (low >> (bit % 8)) & ((1 << ib) - 1)
    high = metadata[row, base + tirx.min(bit // 8 + 1, ib - 1)].astype("int32")
    return ((low | (high << 8)) >> (bit % 8)) & ((1 << ib) - 1)


def qmatmul_nm_te(x, packed, scales, zero_points, metadata, bits: int, group_size: int, n: int, m: int, cols: int):
    """``Y[M, N] = X[M, cols] @ decode(W).T`` for ``int.nm``: each dense weight is decoded
    inside the reduction from the ``n`` compact slots of its run (the one whose offset
    matches, else 0). ``x`` has ``cols`` columns (the weight's dense width)."""
    rows = packed.shape[0]
    ib = index_bits(m)

    def dense(row, k):
        run, c = k // m, k % m
        value = tirx.const(0.0, "float32")
        for u in range(n):
            slot = run * n + u
            decoded = kernels._decode_te(packed, scales, zero_points, row, slot, bits, group_size)
            value = tirx.Select(_offset_te(metadata, row, slot, ib) == c, decoded, value)
        return value

    weight = te.compute((rows, cols), dense, name="decode")
    k = te.reduce_axis((0, cols), name="k")
    return te.compute((x.shape[0], rows), lambda i, j: te.sum(x[i, k] * weight[j, k], axis=k), name="qmatmul")

