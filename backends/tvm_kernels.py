"""TIR kernels for the ``int`` quantized ops, with the weight decode fused into them.

Two families, one per kind of target:

* **CPU** (``qmatmul_cpu``): hand-scheduled TIR. The packed bytes are re-laid out at
  compile time from ``[rows, bytes]`` to ``[rows / lanes, bytes, lanes]`` (same bytes,
  still packed: only their order changes), scales and zero points to
  ``[rows / lanes, groups, lanes]``. Each SIMD lane then owns one output row and every
  decode step (shift, mask, convert) is one vector instruction on ``lanes`` rows at
  once; the activation element is a broadcast scalar. For a few rows of activations
  (GEMV, batch-1 decoding) the kernel accumulates codes times activations per group and
  applies scale and zero point once per group (``s * (sum x*c - z * sum x)``); for many
  rows it decodes one group of weights into a small float tile in L1 and reuses it
  for every activation row, so the decode cost is paid once per weight.
* **generic** (``qmatmul_te`` / ``qgather_te`` / ``dequantize_te``): tensor-expression
  compute with the decode written inline over the original packed layout, the form
  the dlight GPU rules (``GEMV``, ``Matmul``, ``Fallback``) recognise as a decode-fused
  GEMV/GEMM, as MLC-LLM does. Used for CUDA, for ``QGather`` and ``QConv`` everywhere.

Code ``i`` of a run of 8 codes starts at bit ``i * bits`` of the run's ``bits``
bytes (:mod:`qcompile.ir.qformat`); for 3 bits a code may straddle two bytes, so the
decode reads a 16-bit window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

from qcompile.ir.qformat import QuantizedWeight, pack_codes, unpack_codes

GEMV_MAX_ROWS = 4  # activation rows up to which the per-group factored GEMV kernel is used
VNNI_ROW_BLOCKS = 4  # 16-row blocks per task of the int8 GEMV: four independent accumulators


@dataclass(frozen=True)
class CpuLayout:
    """A quantized weight re-laid out for :func:`qmatmul_cpu` (numpy arrays).

    ``float``: packed ``[rows / lanes, bytes, lanes]``. ``vnni``: packed
    ``[rows / 16, bytes / 4, 16, 4]`` (each 32-bit lane holds 4 consecutive bytes of
    one row, the operand layout of ``vpdpbusd``). Scales (float16 or float32, as stored)
    and zero points (uint8) are ``[rows / lanes, groups, lanes]`` in both: the artifact
    holds the IR's bytes, reordered.
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    lanes: int
    rows: int  # true output rows (N)
    kind: str = "float"

    @property
    def padded_rows(self) -> int:
        return self.packed.shape[0] * self.lanes


def choose_lanes(rows: int) -> int:
    """Rows per vector: 64 (four AVX-512 registers in flight) unless that pads a lot."""
    for lanes in (64, 32, 16, 8):
        if rows % lanes == 0:
            return lanes
    return 16


def vnni_eligible(weight: QuantizedWeight) -> bool:
    """The int8-activation kernel applies: 2/3/4/8 bits, whole 4-byte words per group
    (3 bits: 32-code groups, see :func:`vnni_layout`), and output rows in blocks of 64
    (four 16-lane accumulators). Any number of activation rows: each weight word, loaded
    once per row from L1/L2, feeds 64 multiply-adds per instruction, which measured 2x
    faster than decoding to float even for MiniLM's 512-row GEMMs."""
    codes_per_word = 32 if weight.bits == 3 else 32 // weight.bits
    return (weight.bits in (2, 3, 4, 8) and weight.rows % (16 * VNNI_ROW_BLOCKS) == 0
            and weight.group_size % codes_per_word == 0)


def _word_major(packed: np.ndarray) -> np.ndarray:
    """``[rows, bytes]`` -> ``[rows / 16, bytes / 4, 16, 4]``."""
    rows, width = packed.shape
    return np.ascontiguousarray(packed.reshape(rows // 16, 16, width // 4, 4).transpose(0, 2, 1, 3))


def vnni_layout(weight: QuantizedWeight) -> CpuLayout:
    """Word-major bytes for :func:`_gemv_vnni`. A 3-bit code is split into a 2-bit and a
    1-bit plane (``c = lo + 4 * hi``), each packed like the 2- and 1-bit layouts and laid
    end to end: still 3 bits per weight, but every plane yields whole bytes per lane."""
    blocks = weight.rows // 16

    def interleave(values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(values.reshape(blocks, 16, -1).transpose(0, 2, 1))

    if weight.bits == 3:
        codes = unpack_codes(weight.packed, 3)
        planes = [pack_codes(codes & 3, 2), pack_codes(codes >> 2, 1)]
        packed = np.concatenate([_word_major(plane) for plane in planes], axis=1)
    else:
        packed = _word_major(weight.packed)
    return CpuLayout(packed, interleave(weight.scales), interleave(weight.zero_points), 16, weight.rows, "vnni")


def cpu_layout(weight: QuantizedWeight) -> CpuLayout:
    lanes = choose_lanes(weight.rows)
    padded = -(-weight.rows // lanes) * lanes

    def interleave(values: np.ndarray, dtype) -> np.ndarray:
        full = np.zeros((padded, values.shape[1]), dtype)
        full[: weight.rows] = values
        return np.ascontiguousarray(full.reshape(padded // lanes, lanes, -1).transpose(0, 2, 1))

    return CpuLayout(
        packed=interleave(weight.packed, np.uint8),
        scales=interleave(weight.scales, weight.scales.dtype),
        zero_points=interleave(weight.zero_points, np.uint8),
        lanes=lanes,
        rows=weight.rows,
    )


def _code(packed, block, byte_base, i, lane, bits: int):
    """Code ``i`` (0..7) of the run of 8 starting at byte ``byte_base``, for one lane."""
    mask = (1 << bits) - 1
    low = T.Cast("int32", packed[block, byte_base + (i * bits) // 8, lane])
    if bits in (2, 4, 8):  # codes never straddle a byte
        return T.bitwise_and(T.shift_right(low, (i * bits) % 8), mask)
    high = T.Cast("int32", packed[block, byte_base + T.min((i * bits) // 8 + 1, bits - 1), lane])
    return T.bitwise_and(T.shift_right(T.bitwise_or(low, T.shift_left(high, 8)), (i * bits) % 8), mask)


def qmatmul_cpu(rows_in: int, layout: CpuLayout, bits: int, group_size: int, padded_cols: int) -> tirx.PrimFunc:
    """``Y[M, N_pad] = X[M, K_pad] @ decode(W).T`` as a scheduled CPU PrimFunc."""
    if layout.kind == "vnni":
        if bits == 3:
            return _gemv_vnni3(rows_in, layout, group_size, padded_cols)
        return _gemv_vnni(rows_in, layout, bits, group_size, padded_cols)
    if rows_in <= GEMV_MAX_ROWS:
        return _gemv_cpu(rows_in, layout, bits, group_size, padded_cols)
    return _gemm_cpu(rows_in, layout, bits, group_size, padded_cols)


def _gemv_cpu(M: int, layout: CpuLayout, bits: int, gs: int, K: int) -> tirx.PrimFunc:
    L = layout.lanes
    NB = layout.packed.shape[0]
    KB = layout.packed.shape[1]
    G = K // gs
    RB = gs * bits // 8
    SD = str(layout.scales.dtype)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, KB, L), "uint8"),
               s: T.Buffer((NB, G, L), SD), z: T.Buffer((NB, G, L), "uint8"),
               y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        xs = T.alloc_buffer((M, G), "float32")
        for m, g in T.grid(M, G):
            xs[m, g] = T.float32(0)
            for kk in range(gs):
                xs[m, g] = xs[m, g] + x[m, g * gs + kk]
        for nb in T.parallel(NB):
            acc = T.alloc_buffer((L,), "float32", scope="local")
            part = T.alloc_buffer((L,), "float32", scope="local")
            for m in range(M):
                for lane in T.vectorized(L):
                    acc[lane] = T.float32(0)
                for g in range(G):
                    for lane in T.vectorized(L):
                        part[lane] = T.float32(0)
                    for r in range(gs // 8):
                        for i in T.unroll(8):
                            for lane in T.vectorized(L):
                                part[lane] = part[lane] + x[m, g * gs + r * 8 + i] * T.Cast(
                                    "float32", _code(w, nb, g * RB + r * bits, i, lane, bits))
                    for lane in T.vectorized(L):
                        acc[lane] = acc[lane] + T.Cast("float32", s[nb, g, lane]) * (part[lane] - T.Cast("float32", z[nb, g, lane]) * xs[m, g])
                for lane in T.vectorized(L):
                    y[m, nb * L + lane] = acc[lane]

    return kernel


def _gemv_vnni(M: int, layout: CpuLayout, bits: int, gs: int, K: int) -> tirx.PrimFunc:
    """GEMV (one activation row after another) with int8 activations on AVX-512 VNNI (``vpdpbusd``: 64 u8 x s8 products per
    instruction), as ONNX Runtime's ``MatMulNBits`` does with ``accuracy_level=4``.

    The activations are quantized per group (symmetric int8, ``scale = max|x| / 127``)
    and laid out so one broadcast 32-bit word holds the 4 activation bytes that meet the
    4 codes a weight word yields after a shift and a byte mask; the integer group sums
    are then scaled: ``y += (sum_i32 - z * sum(xq)) * s * x_scale``.
    """
    codes_per_byte = 8 // bits
    codes_per_word = 4 * codes_per_byte
    NB = layout.packed.shape[0]
    W = layout.packed.shape[1]
    G = K // gs
    WG = gs // codes_per_word
    C = codes_per_byte
    RB = VNNI_ROW_BLOCKS
    N = NB * 16
    byte_mask = int.from_bytes(bytes([(1 << bits) - 1]) * 4, "little")
    byte_mask = byte_mask - (1 << 32) if byte_mask >= 1 << 31 else byte_mask
    SD = str(layout.scales.dtype)

    def codes(word, t: int):
        if bits == 8:
            return word
        return T.bitwise_and(T.shift_right(word, T.broadcast(T.int32(t * bits), 16)),
                             T.broadcast(T.int32(byte_mask), 16))

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, W, 16, 4), "uint8"),
               s: T.Buffer((NB, G, 16), SD), z: T.Buffer((NB, G, 16), "uint8"),
               y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        xq = T.alloc_buffer((M, W, C, 4), "int8")
        xscale = T.alloc_buffer((M, G), "float32")
        xsum = T.alloc_buffer((M, G), "float32")
        for m, g in T.grid(M, G):
            xscale[m, g] = T.float32(0)
            for kk in range(gs):
                xscale[m, g] = T.max(xscale[m, g], T.fabs(x[m, g * gs + kk]))
            xscale[m, g] = T.max(xscale[m, g], T.float32(1e-30)) / T.float32(127)
            xsum[m, g] = T.float32(0)
            for kk in range(gs):
                xq[m, (g * gs + kk) // codes_per_word, (g * gs + kk) % C, (g * gs + kk) % codes_per_word // C] = (
                    T.Cast("int8", T.round(x[m, g * gs + kk] / xscale[m, g])))
                xsum[m, g] = xsum[m, g] + T.round(x[m, g * gs + kk] / xscale[m, g])
        for task in T.parallel(NB // RB):
            accf = T.alloc_buffer((RB, 16), "float32", scope="local")
            acci = T.alloc_buffer((RB, 16), "int32", scope="local")
            for m in range(M):
                for rb in T.unroll(RB):
                    for lane in T.vectorized(16):
                        accf[rb, lane] = T.float32(0)
                for g in range(G):
                    for rb in T.unroll(RB):
                        for lane in T.vectorized(16):
                            acci[rb, lane] = 0
                    for wi in T.unroll(WG):
                        for t in T.unroll(C):
                            for rb in T.unroll(RB):
                                acci[rb, T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                                    "int32x16", "llvm.x86.avx512.vpdpbusd.512",
                                    acci[rb, T.ramp(0, 1, 16)],
                                    T.reinterpret("int8x64", codes(T.reinterpret(
                                        "int32x16", w.vload([task * RB + rb, g * WG + wi, 0, 0], "uint8x64")), t)),
                                    T.reinterpret("int8x64", T.broadcast(
                                        T.reinterpret("int32", xq.vload([m, g * WG + wi, t, 0], "int8x4")), 16)))
                    for rb in T.unroll(RB):
                        for lane in T.vectorized(16):
                            accf[rb, lane] = accf[rb, lane] + (
                                T.Cast("float32", acci[rb, lane]) - T.Cast("float32", z[task * RB + rb, g, lane]) * xsum[m, g]
                            ) * (T.Cast("float32", s[task * RB + rb, g, lane]) * xscale[m, g])
                for rb in T.unroll(RB):
                    for lane in T.vectorized(16):
                        y[m, (task * RB + rb) * 16 + lane] = accf[rb, lane]

    return kernel


def _dpbusd(acc, codes, activations):
    """``acc += sum of 4 u8 x s8 products per 32-bit lane`` (AVX-512 VNNI ``vpdpbusd``)."""
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                   T.reinterpret("int8x64", codes), T.reinterpret("int8x64", activations))


def _gemv_vnni3(M: int, layout: CpuLayout, gs: int, K: int) -> tirx.PrimFunc:
    """:func:`_gemv_vnni` for 3 bits over the two planes of :func:`vnni_layout`: the 2-bit
    plane as the 2-bit kernel does, the 1-bit plane with 8 shifts per word, and
    ``sum = sum_lo + 4 * sum_hi`` per group."""
    NB = layout.packed.shape[0]
    WT = layout.packed.shape[1]
    G = K // gs
    WL, WLG, WHG = K // 16, gs // 16, gs // 32
    WH = K // 32
    RB = VNNI_ROW_BLOCKS
    N = NB * 16
    SD = str(layout.scales.dtype)

    def plane(word, shift: int, mask: int):
        return T.bitwise_and(T.shift_right(word, T.broadcast(T.int32(shift), 16)), T.broadcast(T.int32(mask), 16))

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, WT, 16, 4), "uint8"),
               s: T.Buffer((NB, G, 16), SD), z: T.Buffer((NB, G, 16), "uint8"),
               y: T.Buffer((M, N), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        xlo = T.alloc_buffer((M, WL, 4, 4), "int8")
        xhi = T.alloc_buffer((M, WH, 8, 4), "int8")
        xscale = T.alloc_buffer((M, G), "float32")
        xsum = T.alloc_buffer((M, G), "float32")
        for m, g in T.grid(M, G):
            xscale[m, g] = T.float32(0)
            for kk in range(gs):
                xscale[m, g] = T.max(xscale[m, g], T.fabs(x[m, g * gs + kk]))
            xscale[m, g] = T.max(xscale[m, g], T.float32(1e-30)) / T.float32(127)
            xsum[m, g] = T.float32(0)
            for kk in range(gs):
                xlo[m, (g * gs + kk) // 16, (g * gs + kk) % 4, (g * gs + kk) % 16 // 4] = (
                    T.Cast("int8", T.round(x[m, g * gs + kk] / xscale[m, g])))
                xhi[m, (g * gs + kk) // 32, (g * gs + kk) % 8, (g * gs + kk) % 32 // 8] = (
                    T.Cast("int8", T.round(x[m, g * gs + kk] / xscale[m, g])))
                xsum[m, g] = xsum[m, g] + T.round(x[m, g * gs + kk] / xscale[m, g])
        for task in T.parallel(NB // RB):
            accf = T.alloc_buffer((RB, 16), "float32", scope="local")
            acclo = T.alloc_buffer((RB, 16), "int32", scope="local")
            acchi = T.alloc_buffer((RB, 16), "int32", scope="local")
            for m in range(M):
                for rb in T.unroll(RB):
                    for lane in T.vectorized(16):
                        accf[rb, lane] = T.float32(0)
                for g in range(G):
                    for rb in T.unroll(RB):
                        for lane in T.vectorized(16):
                            acclo[rb, lane] = 0
                            acchi[rb, lane] = 0
                    for wi in T.unroll(WLG):
                        for t in T.unroll(4):
                            for rb in T.unroll(RB):
                                acclo[rb, T.ramp(0, 1, 16)] = _dpbusd(
                                    acclo[rb, T.ramp(0, 1, 16)],
                                    plane(T.reinterpret("int32x16", w.vload([task * RB + rb, g * WLG + wi, 0, 0],
                                                                           "uint8x64")), t * 2, 0x03030303),
                                    T.broadcast(T.reinterpret("int32", xlo.vload([m, g * WLG + wi, t, 0], "int8x4")),
                                                16))
                    for wi in T.unroll(WHG):
                        for t in T.unroll(8):
                            for rb in T.unroll(RB):
                                acchi[rb, T.ramp(0, 1, 16)] = _dpbusd(
                                    acchi[rb, T.ramp(0, 1, 16)],
                                    plane(T.reinterpret("int32x16", w.vload([task * RB + rb, WL + g * WHG + wi, 0, 0],
                                                                           "uint8x64")), t, 0x01010101),
                                    T.broadcast(T.reinterpret("int32", xhi.vload([m, g * WHG + wi, t, 0], "int8x4")),
                                                16))
                    for rb in T.unroll(RB):
                        for lane in T.vectorized(16):
                            accf[rb, lane] = accf[rb, lane] + (
                                T.Cast("float32", acclo[rb, lane] + acchi[rb, lane] * 4)
                                - T.Cast("float32", z[task * RB + rb, g, lane]) * xsum[m, g]
                            ) * (T.Cast("float32", s[task * RB + rb, g, lane]) * xscale[m, g])
                for rb in T.unroll(RB):
                    for lane in T.vectorized(16):
                        y[m, (task * RB + rb) * 16 + lane] = accf[rb, lane]

    return kernel


def _row_tile(M: int, L: int) -> int:
    """Activation rows per register tile: about 16 vector accumulators (AVX-512 has 32)."""
    for rows in (8, 4, 2, 1):
        if rows * L <= 256 and M % rows == 0:
            return rows
    return 1


def _gemm_cpu(M: int, layout: CpuLayout, bits: int, gs: int, K: int) -> tirx.PrimFunc:
    L = layout.lanes
    NB = layout.packed.shape[0]
    KB = layout.packed.shape[1]
    G = K // gs
    RB = gs * bits // 8
    MR = _row_tile(M, L)
    SD = str(layout.scales.dtype)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, KB, L), "uint8"),
               s: T.Buffer((NB, G, L), SD), z: T.Buffer((NB, G, L), "uint8"),
               y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for nb in T.parallel(NB):
            tile = T.alloc_buffer((gs, L), "float32", scope="local")
            acc = T.alloc_buffer((MR, L), "float32", scope="local")
            for m in range(M):
                for lane in T.vectorized(L):
                    y[m, nb * L + lane] = T.float32(0)
            for g in range(G):
                for r in range(gs // 8):
                    for i in T.unroll(8):
                        for lane in T.vectorized(L):
                            tile[r * 8 + i, lane] = (T.Cast("float32", _code(w, nb, g * RB + r * bits, i, lane, bits))
                                                     - T.Cast("float32", z[nb, g, lane])) * T.Cast("float32", s[nb, g, lane])
                for mb in range(M // MR):
                    for row in T.unroll(MR):
                        for lane in T.vectorized(L):
                            acc[row, lane] = y[mb * MR + row, nb * L + lane]
                    for kk in range(gs):
                        for row in T.unroll(MR):
                            for lane in T.vectorized(L):
                                acc[row, lane] = acc[row, lane] + x[mb * MR + row, g * gs + kk] * tile[kk, lane]
                    for row in T.unroll(MR):
                        for lane in T.vectorized(L):
                            y[mb * MR + row, nb * L + lane] = acc[row, lane]

    return kernel


# ----------------------------------------------------------------------------------
# Generic (tensor expression) kernels over the original packed layout
# ----------------------------------------------------------------------------------


def _code_te(byte, col, bits: int):
    """Code ``col`` of a row in the packed layout, its bytes read through ``byte(b)`` (int32)."""
    mask = (1 << bits) - 1
    run, bit = col // 8, (col % 8) * bits
    low = byte(run * bits + bit // 8)
    if bits in (2, 4, 8):
        return (low >> (bit % 8)) & mask
    high = byte(run * bits + tirx.min(bit // 8 + 1, bits - 1))
    return ((low | (high << 8)) >> (bit % 8)) & mask


def _decode_te(packed, scales, zero_points, row, col, bits: int, group_size: int):
    """The float value of weight ``[row, col]`` read from the packed ``[rows, bytes]`` layout."""
    code = _code_te(lambda b: packed[row, b].astype("int32"), col, bits)
    group = col // group_size
    return (code.astype("float32") - zero_points[row, group].astype("float32")) * scales[row, group].astype("float32")


def gather_rows_te(indices, vocab: int, cols: int, value):
    """``Y[I, cols] = value(row, d)`` for the rows ``indices`` (flat int64; negative ones wrap)."""

    def at(i, d):
        index = indices[i].astype("int64")
        return value(tirx.Select(index < 0, index + vocab, index), d)

    return te.compute((indices.shape[0], cols), at, name="qgather")


def split3_planes(weight: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """3-bit codes as a 2-bit plane ``[rows, bytes / 4]`` and a 1-bit plane ``[rows, bytes / 8]``
    (``c = lo + 4 * hi``, packed like 2- and 1-bit codes): still 3 bits per weight, but no
    code straddles a byte, so each plane is read at an affine byte index."""
    codes = unpack_codes(weight.packed, 3)
    return pack_codes(codes & 3, 2), pack_codes(codes >> 2, 1)


def qmatmul3_te(x, low, high, scales, zero_points, group_size: int, cols: int):
    """``qmatmul_te`` for 3 bits over :func:`split3_planes`. The packed layout's decode reads
    a byte pair at ``run * 3 + min(i * 3 // 8 + 1, 2)``, which dlight's GEMV rule cannot
    analyse: CUDA then got its one-thread-per-row fallback (a serial loop over K, ~100x
    slower than 4 bits on an H200). Here both planes are read at ``[row, col // 4]`` and
    ``[row, col // 8]``, the access pattern of the 2- and 4-bit kernels."""

    def value(n, k):
        lo = (low[n, k // 4].astype("int32") >> ((k % 4) * 2)) & 3
        hi = (high[n, k // 8].astype("int32") >> (k % 8)) & 1
        group = k // group_size
        code = lo | (hi << 2)
        return (code.astype("float32") - zero_points[n, group].astype("float32")) * scales[n, group].astype("float32")

    weight = te.compute((low.shape[0], cols), value, name="decode")
    k = te.reduce_axis((0, cols), name="k")
    return te.compute((x.shape[0], low.shape[0]), lambda m, n: te.sum(x[m, k] * weight[n, k], axis=k),
                      name="qmatmul")


def qmatmul_te(x, packed, scales, zero_points, bits: int, group_size: int, cols: int):
    """``Y[M, N] = X[M, cols] @ decode(W)[:, :cols].T`` (decode inlined in the reduction)."""
    rows = packed.shape[0]
    weight = te.compute((rows, cols), lambda n, k: _decode_te(packed, scales, zero_points, n, k, bits, group_size),
                        name="decode")
    k = te.reduce_axis((0, cols), name="k")
    return te.compute((x.shape[0], rows), lambda m, n: te.sum(x[m, k] * weight[n, k], axis=k), name="qmatmul")


def qgather_te(packed, indices, scales, zero_points, bits: int, group_size: int, cols: int):
    """``Y[I, cols] = decode(W)[indices]`` for flat int64 ``indices`` (negative ones wrap)."""
    return gather_rows_te(indices, packed.shape[0], cols,
                          lambda row, d: _decode_te(packed, scales, zero_points, row, d, bits, group_size))


def qgather_layout_te(packed, indices, scales, zero_points, kind: str, lanes: int, vocab: int, bits: int,
                      group_size: int, cols: int):
    """:func:`qgather_te` reading a :class:`CpuLayout` (``float`` or ``vnni``) in place: the rows of
    a table tied to an LM head are decoded from the GEMV kernel's arrays, so the artifact holds
    the table once. Row ``r``'s byte ``b`` sits at ``[r / lanes, b, r % lanes]`` (``float``) or
    ``[r / 16, b / 4, r % 16, b % 4]`` (``vnni``; 3 bits there: the 2-bit plane's words, then
    the 1-bit plane's, see :func:`vnni_layout`); scales and zero points at ``[r / lanes, g, r % lanes]``."""

    step = 16 if kind == "vnni" else lanes

    def value(row, d):
        def byte(b):
            if kind == "vnni":
                return packed[row // 16, b // 4, row % 16, b % 4].astype("int32")
            return packed[row // lanes, b, row % lanes].astype("int32")

        if kind == "vnni" and bits == 3:
            low_words = packed.shape[1] * 2 // 3  # 2-bit plane: 2 of every 3 bits
            code = ((byte(d // 4) >> ((d % 4) * 2)) & 3) | (((byte(low_words * 4 + d // 8) >> (d % 8)) & 1) << 2)
        else:
            code = _code_te(byte, d, bits)
        group = d // group_size
        scale = scales[row // step, group, row % step].astype("float32")
        zero = zero_points[row // step, group, row % step].astype("float32")
        return (code.astype("float32") - zero) * scale

    return gather_rows_te(indices, vocab, cols, value)


def dequantize_te(packed, scales, zero_points, bits: int, group_size: int, cols: int):
    """The float matrix ``[rows, cols]`` (QConv's filter, decoded once per call)."""
    return te.compute((packed.shape[0], cols),
                      lambda n, k: _decode_te(packed, scales, zero_points, n, k, bits, group_size),
                      name="dequantize")
