"""TIR kernels for the ``bcq`` quantized ops (binary planes x power-of-two alphas).

A ``bcq`` weight (:mod:`qcompile.ir.bcq`) is ``W[n, k] = sum_q alpha_q[n // rg, k // cg] *
s_q[n, k]`` with signs ``s = +-1`` packed 8 to a byte and every alpha a sum of at most
``terms`` signed powers of two stored as int8 exponent codes. The kernels read exactly
those bytes (no float copy of the weight exists): an alpha is rebuilt from its codes by
integer ops on the float's exponent field (``(|v| - 64 + 127) << 23``: a shift, no
multiplication), and a sign bit selects ``+x`` or ``-x``.

CPU (``qmatmul_cpu``), over :class:`BcqCpuLayout` (planes re-laid out so each SIMD lane
owns one output row, the alpha codes so that input columns are contiguous; same bytes,
reordered at compile time):

* **GEMV** (few activation rows), when every vector of rows shares its alphas
  (``row_group`` a multiple of the lanes): the activations are first *shifted*, per
  block of rows, ``x'_q[k] = alpha_q[g, k // cg] * x[k]`` (ShiftAddLLM's column-wise
  order), then ``y = sum_q (2 sum_{s=+1} x'_q - sum x'_q)``: per weight bit one masked add.
  Two inner loops, measured against each other by ``benchmarks/gemv.py``:

  - ``plain``: the masked adds, straight from the packed bits;
  - ``lut``: ShiftAddLLM's query-and-add: per block of 8 columns a 256-entry table
    ``LUT[c] = sum_t (2 c_t - 1) x'_t`` (255 additions), then one table look-up per
    byte of a plane (8 weights) and lane (:mod:`qcompile.ir.lut`). With AVX-512 the
    look-up is one ``vgatherdps`` per 16 rows.

* **GEMM** (more activation rows, or alphas that differ inside a vector of rows): one
  chunk of columns is decoded into a float tile in L1 (``sum_q +-alpha_q``, alphas
  rebuilt from their codes), reused by every activation row in a register-blocked,
  vectorized loop; blocks of rows run in parallel.

Generic (``qmatmul_te`` / ``qgather_te`` / ``dequantize_te``): tensor-expression compute
with the same decode written inline over the format's own arrays, scheduled by dlight's
GPU rules on CUDA (and used for ``QGather`` / ``QConv`` everywhere).

The format's inputs are read by name through :data:`qcompile.ir.bcq.BCQ` (``planes``,
``alphas``); an extra per-group input (an offset, say) would enter the decode in
:func:`_decode_te` and, in the CPU kernels, as a per-group term
``offset[g, c] * sum_{k in c} x[k]`` added with the ``- sum x'`` correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

from qcompile.ir.bcq import EXPONENT_BIAS, BCQWeight

from .tvm_kernels import gather_rows_te

GEMV_MAX_ROWS = 4  # activation rows up to which the GEMV kernels are used
GEMV_KERNELS = ("plain", "lut")
DEFAULT_GEMV = "plain"  # the faster of the two on this project's CPUs (benchmarks/gemv.py)
_FLOAT_EXPONENT = 127 - EXPONENT_BIAS  # code magnitude -> IEEE float32 biased exponent


@dataclass(frozen=True)
class _BcqLayout:
    """A ``bcq`` weight's planes and alpha codes re-laid out for a kernel (numpy arrays)."""

    planes: np.ndarray
    alphas: np.ndarray
    rows: int
    cols: int
    row_group: int
    col_group: int

    @property
    def bits(self) -> int:
        return int(self.planes.shape[1])

    @property
    def terms(self) -> int:
        return int(self.alphas.shape[2])

    def arrays(self) -> list[np.ndarray]:
        return [self.planes, self.alphas]


@dataclass(frozen=True)
class BcqCpuLayout(_BcqLayout):
    """A ``bcq`` weight re-laid out for the CPU kernels (numpy arrays).

    ``planes``: uint8 ``[rows / lanes, bits, bytes, lanes]`` (rows padded with zero bytes).
    ``alphas``: the int8 codes ``[row_groups, bits, terms, col_groups']`` with the column
    groups padded (code 0 = no term) to cover the padded columns.
    """

    lanes: int = 16

    @property
    def padded_rows(self) -> int:
        return int(self.planes.shape[0]) * self.lanes

    @property
    def padded_cols(self) -> int:
        return int(self.planes.shape[2]) * 8

    @property
    def aligned(self) -> bool:
        """Every vector of ``lanes`` rows shares its alphas (a scalar broadcast per column)."""
        return self.row_group % self.lanes == 0 or self.alphas.shape[0] == 1


def cpu_layout(weight: BCQWeight) -> BcqCpuLayout:
    """Lanes: the widest of 64/32/16 that divides the alpha row group (then alphas are a
    broadcast), else the widest that divides the rows."""
    lanes = next((n for n in (64, 32, 16) if weight.row_group % n == 0), 0)
    if not lanes:
        lanes = next((n for n in (64, 32, 16, 8) if weight.rows % n == 0), 16)
    padded = -(-weight.rows // lanes) * lanes
    planes = np.zeros((padded, weight.bits, weight.planes.shape[2]), np.uint8)
    planes[: weight.rows] = weight.planes
    planes = np.ascontiguousarray(planes.reshape(padded // lanes, lanes, weight.bits, -1).transpose(0, 2, 3, 1))
    return BcqCpuLayout(planes, _column_major_codes(weight), weight.rows, weight.cols, weight.row_group,
                        weight.col_group, lanes=lanes)


def _column_major_codes(weight: BCQWeight) -> np.ndarray:
    """The alpha codes ``[row_groups, bits, terms, col_groups']``, column groups padded (code 0 =
    no term) to cover the planes' padded columns: input columns contiguous."""
    col_groups = -(-weight.planes.shape[2] * 8 // weight.col_group)
    codes = np.zeros((weight.alphas.shape[0], col_groups, weight.bits, weight.terms), np.int8)
    codes[:, : weight.alphas.shape[1]] = weight.alphas
    return np.ascontiguousarray(codes.transpose(0, 2, 3, 1))


def _term(code):
    """``sign(v) * 2 ** (|v| - 64)`` for an int32 code ``v`` (0 = no term), built in the
    float's exponent field."""
    magnitude = T.reinterpret("float32", T.shift_left(T.abs(code) + _FLOAT_EXPONENT, 23))
    return T.Select(code > 0, magnitude, T.Select(code < 0, -magnitude, T.float32(0)))


def _chunk(cols: int, widths: tuple[int, ...]) -> int:
    return next(w for w in widths if cols % w == 0)


def qmatmul_cpu(rows_in: int, layout: BcqCpuLayout | BcqVnniLayout, gemv: str = DEFAULT_GEMV,
                gather: bool = False) -> tirx.PrimFunc:
    """``Y[M, N_pad] = X[M, K_pad] @ decode(W).T`` as a scheduled CPU PrimFunc.

    ``gemv``: which GEMV inner loop (``plain`` or ``lut``) serves few activation rows;
    ``gather``: the LUT look-ups use AVX-512 ``vgatherdps``."""
    if gemv not in GEMV_KERNELS:
        raise ValueError(f"gemv kernel {gemv!r}: expected one of {', '.join(GEMV_KERNELS)}")
    if isinstance(layout, BcqVnniLayout):
        return _vnni(rows_in, layout)
    if rows_in <= GEMV_MAX_ROWS and layout.aligned:
        return _gemv_lut(rows_in, layout, gather) if gemv == "lut" else _gemv_plain(rows_in, layout)
    return _gemm(rows_in, layout)


def kernel_kind(rows_in: int, layout: BcqCpuLayout | BcqVnniLayout, gemv: str = DEFAULT_GEMV) -> str:
    """What :func:`qmatmul_cpu` builds, in words (for the manifest)."""
    if isinstance(layout, BcqVnniLayout):
        return "GEMV int8 activations, VNNI"
    if rows_in <= GEMV_MAX_ROWS and layout.aligned:
        return "GEMV lookup-table" if gemv == "lut" else "GEMV"
    return "GEMM"


def _shifter(layout: BcqCpuLayout, KC: int):
    """A TIR macro: ``xs[q, :] = alpha_q[g, chunk] * x[m, chunk]`` for one chunk of ``KC``
    columns, the alphas rebuilt from their codes (vectorized over columns when every
    column has its own; one scalar per 8 columns when ``col_group`` is a multiple of 8)."""
    TT, cg = layout.terms, layout.col_group

    if cg == 1 or cg % 8 != 0:
        @T.macro
        def shift(x, a, xs, alpha, m, c, q, g):
            for kk in T.vectorized(KC):
                alpha[kk] = T.float32(0)
            for t in range(TT):
                for kk in T.vectorized(KC):
                    alpha[kk] = alpha[kk] + _term(T.Cast("int32", a[g, q, t, (c * KC + kk) // cg]))
            for kk in T.vectorized(KC):
                xs[q, kk] = alpha[kk] * x[m, c * KC + kk]
    else:
        @T.macro
        def shift(x, a, xs, alpha, m, c, q, g):
            for kb in range(KC // 8):
                alpha[kb] = T.float32(0)
                for t in range(TT):
                    alpha[kb] = alpha[kb] + _term(T.Cast("int32", a[g, q, t, (c * KC + kb * 8) // cg]))
                for kk in T.vectorized(8):
                    xs[q, kb * 8 + kk] = alpha[kb] * x[m, c * KC + kb * 8 + kk]
    return shift


def _gemv_plain(M: int, layout: BcqCpuLayout) -> tirx.PrimFunc:
    L, Q, TT = layout.lanes, layout.bits, layout.terms
    NB, KB = layout.planes.shape[0], layout.planes.shape[2]
    RG, CG = layout.alphas.shape[0], layout.alphas.shape[3]
    K = KB * 8
    KC = _chunk(K, (256, 128, 64, 32, 16, 8))
    rg = layout.row_group
    _shift_activations = _shifter(layout, KC)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, Q, KB, L), "uint8"),
               a: T.Buffer((RG, Q, TT, CG), "int8"), y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for nb in T.parallel(NB):
            xs = T.alloc_buffer((Q, KC), "float32", scope="local")
            alpha = T.alloc_buffer((KC,), "float32", scope="local")
            total = T.alloc_buffer((KC,), "float32", scope="local")
            sum_all = T.alloc_buffer((1,), "float32", scope="local")
            acc = T.alloc_buffer((L,), "float32", scope="local")
            byte = T.alloc_buffer((L,), "int32", scope="local")
            for m in range(M):
                for kk in T.vectorized(KC):
                    total[kk] = T.float32(0)
                for lane in T.vectorized(L):
                    acc[lane] = T.float32(0)
                for c in range(K // KC):
                    # shift the activations: x'_q = alpha_q * x, doubled for the masked adds
                    for q in range(Q):
                        _shift_activations(x, a, xs, alpha, m, c, q, T.min(nb * L // rg, RG - 1))
                        for kk in T.vectorized(KC):
                            total[kk] = total[kk] + xs[q, kk]
                        for kk in T.vectorized(KC):
                            xs[q, kk] = xs[q, kk] + xs[q, kk]
                    for q in range(Q):
                        for kb in range(KC // 8):
                            for lane in T.vectorized(L):
                                byte[lane] = T.Cast("int32", w[nb, q, c * (KC // 8) + kb, lane])
                            for t in T.unroll(8):
                                for lane in T.vectorized(L):
                                    acc[lane] = T.Select(T.bitwise_and(byte[lane], T.int32(1 << t)) != 0,
                                                         acc[lane] + xs[q, kb * 8 + t], acc[lane])
                sum_all[0] = T.float32(0)
                for kk in range(KC):
                    sum_all[0] = sum_all[0] + total[kk]
                for lane in T.vectorized(L):
                    y[m, nb * L + lane] = acc[lane] - sum_all[0]

    return kernel


def _tasks(layout: BcqCpuLayout) -> int:
    """Row blocks per LUT task: as many as share one alpha row group, up to 4 (256 rows),
    so each table serves many rows."""
    NB, L = layout.planes.shape[0], layout.lanes
    for blocks in (4, 2, 1):
        if NB % blocks == 0 and (layout.alphas.shape[0] == 1 or layout.row_group % (blocks * L) == 0):
            return blocks
    return 1


def _gemv_lut(M: int, layout: BcqCpuLayout, gather: bool) -> tirx.PrimFunc:
    L, Q, TT = layout.lanes, layout.bits, layout.terms
    NB, KB = layout.planes.shape[0], layout.planes.shape[2]
    RG, CG = layout.alphas.shape[0], layout.alphas.shape[3]
    K = KB * 8
    KC = _chunk(K, (64, 32, 16, 8))
    KCB = KC // 8
    BT = _tasks(layout)
    rg = layout.row_group
    _shift_activations = _shifter(layout, KC)
    V = 16  # lanes per gather

    def lookup(tables, q, kb, codes, b, v):
        index = T.Cast("int32x16", codes.vload([b, v * V], "uint8x16"))
        if gather:
            return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.gather.dps.512", T.broadcast(T.float32(0), V),
                                      T.address_of(tables[q, kb, 0]), index, T.int16(-1), T.int32(4))
        return tables[q, kb, index]

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, Q, KB, L), "uint8"),
               a: T.Buffer((RG, Q, TT, CG), "int8"), y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for task in T.parallel(NB // BT):
            xs = T.alloc_buffer((Q, KC), "float32", scope="local")
            alpha = T.alloc_buffer((KC,), "float32", scope="local")
            tables = T.alloc_buffer((Q, KCB, 256), "float32", scope="local")
            codes = T.alloc_buffer((BT, L), "uint8", scope="local")
            acc = T.alloc_buffer((BT, L), "float32", scope="local")
            for m in range(M):
                for b in range(BT):
                    for lane in T.vectorized(L):
                        acc[b, lane] = T.float32(0)
                for c in range(K // KC):
                    for q in range(Q):
                        _shift_activations(x, a, xs, alpha, m, c, q, T.min(task * BT * L // rg, RG - 1))
                    # the query: LUT[c] = sum_t (2 c_t - 1) x'_t, built by doubling
                    for q, kb in T.grid(Q, KCB):
                        tables[q, kb, 0] = -(xs[q, kb * 8] + xs[q, kb * 8 + 1] + xs[q, kb * 8 + 2]
                                             + xs[q, kb * 8 + 3] + xs[q, kb * 8 + 4] + xs[q, kb * 8 + 5]
                                             + xs[q, kb * 8 + 6] + xs[q, kb * 8 + 7])
                        for t in range(4):  # the first 16 entries: short runs, scalar
                            for j in range(1 << t):
                                tables[q, kb, (1 << t) + j] = tables[q, kb, j] + (xs[q, kb * 8 + t]
                                                                                  + xs[q, kb * 8 + t])
                        for t in range(4, 8):  # then whole vectors of 16
                            for jo in range((1 << t) // 16):
                                for ji in T.vectorized(16):
                                    tables[q, kb, (1 << t) + jo * 16 + ji] = tables[q, kb, jo * 16 + ji] + (
                                        xs[q, kb * 8 + t] + xs[q, kb * 8 + t])
                    # the adds: one look-up per plane byte (8 weights) and row
                    for q, kb in T.grid(Q, KCB):
                        for b in range(BT):
                            for lane in T.vectorized(L):
                                codes[b, lane] = w[task * BT + b, q, c * KCB + kb, lane]
                        for b in range(BT):
                            for v in T.unroll(L // V):
                                acc[b, T.ramp(v * V, 1, V)] = acc[b, T.ramp(v * V, 1, V)] + lookup(
                                    tables, q, kb, codes, b, v)
                for b in range(BT):
                    for lane in T.vectorized(L):
                        y[m, (task * BT + b) * L + lane] = acc[b, lane]

    return kernel


def _row_tile(M: int, L: int) -> int:
    for rows in (8, 4, 2, 1):
        if rows * L <= 256 and M % rows == 0:
            return rows
    return 1


def _gemm(M: int, layout: BcqCpuLayout) -> tirx.PrimFunc:
    L, Q, TT = layout.lanes, layout.bits, layout.terms
    NB, KB = layout.planes.shape[0], layout.planes.shape[2]
    RG, CG = layout.alphas.shape[0], layout.alphas.shape[3]
    K = KB * 8
    KC = _chunk(K, (64, 32, 16, 8))
    MR = _row_tile(M, L)
    rg, cg = layout.row_group, layout.col_group
    aligned = layout.aligned

    def group(nb, lane):
        return T.min(nb * L // rg, RG - 1) if aligned else T.min((nb * L + lane) // rg, RG - 1)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, Q, KB, L), "uint8"),
               a: T.Buffer((RG, Q, TT, CG), "int8"), y: T.Buffer((M, NB * L), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for nb in T.parallel(NB):
            tile = T.alloc_buffer((KC, L), "float32", scope="local")
            alpha = T.alloc_buffer((L,), "float32", scope="local")
            acc = T.alloc_buffer((MR, L), "float32", scope="local")
            for m in range(M):
                for lane in T.vectorized(L):
                    y[m, nb * L + lane] = T.float32(0)
            for c in range(K // KC):
                for kb in range(KC // 8):
                    for t in T.unroll(8):
                        for lane in T.vectorized(L):
                            tile[kb * 8 + t, lane] = T.float32(0)
                    for q in range(Q):
                        for t in T.unroll(8):
                            for lane in T.vectorized(L):
                                alpha[lane] = T.float32(0)
                            for term in range(TT):
                                for lane in T.vectorized(L):
                                    alpha[lane] = alpha[lane] + _term(T.Cast("int32", a[
                                        group(nb, lane), q, term, (c * KC + kb * 8 + t) // cg]))
                            for lane in T.vectorized(L):
                                tile[kb * 8 + t, lane] = tile[kb * 8 + t, lane] + T.Select(
                                    T.bitwise_and(T.Cast("int32", w[nb, q, c * (KC // 8) + kb, lane]),
                                                  T.int32(1 << t)) != 0, alpha[lane], -alpha[lane])
                for mb in range(M // MR):
                    for row in T.unroll(MR):
                        for lane in T.vectorized(L):
                            acc[row, lane] = y[mb * MR + row, nb * L + lane]
                    for kk in range(KC):
                        for row in T.unroll(MR):
                            for lane in T.vectorized(L):
                                acc[row, lane] = acc[row, lane] + x[mb * MR + row, c * KC + kk] * tile[kk, lane]
                    for row in T.unroll(MR):
                        for lane in T.vectorized(L):
                            y[mb * MR + row, nb * L + lane] = acc[row, lane]

    return kernel


# ----------------------------------------------------------------------------------
# int8 activations (AVX-512 VNNI)
# ----------------------------------------------------------------------------------

VNNI_ROWS = 64  # output rows per task: four 16-lane accumulators
VNNI_COLS = 32  # columns per 32-bit word of a 1-bit plane, and per activation scale


@dataclass(frozen=True)
class BcqVnniLayout(_BcqLayout):
    """A ``bcq`` weight for :func:`_vnni`: each binary plane word-major like the 1-bit plane
    of the ``int`` VNNI kernels, ``planes`` uint8 ``[rows / 16, bits, cols / 32, 16, 4]``
    (bit ``t`` of byte ``j`` of a lane's 32-bit word is column ``4t + j`` of the word's 32, rows
    padded to a multiple of 64), ``alphas`` the codes as :class:`BcqCpuLayout` has them. Same
    bits, reordered."""

    lanes: int = 16
    per_row: bool = False  # row-wise alphas (a table tied to an LM head): codes [rows / 16, bits, terms, groups, 16]

    @property
    def padded_rows(self) -> int:
        return int(self.planes.shape[0]) * 16

    @property
    def padded_cols(self) -> int:
        return int(self.planes.shape[2]) * VNNI_COLS


def vnni_eligible(weight: BCQWeight) -> bool:
    """The int8-activation kernel applies: whole 32-column words, and either the rows of a
    task share their alphas (row groups of a multiple of 64 rows, or one group) or the alphas
    are row-wise over whole words (``row_group=1``, ``col_group`` a multiple of 32)."""
    return weight.planes.shape[2] % 4 == 0 and (
        weight.row_group % VNNI_ROWS == 0 or weight.alphas.shape[0] == 1
        or (weight.row_group == 1 and weight.col_group % VNNI_COLS == 0))


def vnni_layout(weight: BCQWeight) -> BcqVnniLayout:
    padded = -(-weight.rows // VNNI_ROWS) * VNNI_ROWS
    words = weight.planes.shape[2] // 4
    # within each 32-column word, bit t of byte j becomes column 4t + j (it was 8j + t): the
    # 4 bytes that one shift by t yields then meet 4 consecutive activations
    bits = np.unpackbits(weight.planes, axis=2, bitorder="little").reshape(weight.rows, weight.bits, words, 8, 4)
    repacked = np.packbits(bits.transpose(0, 1, 2, 4, 3), axis=4, bitorder="little").reshape(weight.rows, weight.bits, -1)
    planes = np.zeros((padded, weight.bits, weight.planes.shape[2]), np.uint8)
    planes[: weight.rows] = repacked
    planes = np.ascontiguousarray(planes.reshape(padded // 16, 16, weight.bits, words, 4).transpose(0, 2, 3, 1, 4))
    if weight.row_group == 1 and weight.alphas.shape[0] > 1:  # row-wise: 16 rows' codes side by side
        codes = np.zeros((padded, weight.alphas.shape[1], weight.bits, weight.terms), np.int8)
        codes[: weight.rows] = weight.alphas
        alphas = np.ascontiguousarray(codes.reshape(padded // 16, 16, *codes.shape[1:]).transpose(0, 3, 4, 2, 1))
        return BcqVnniLayout(planes, alphas, weight.rows, weight.cols, 1, weight.col_group, per_row=True)
    return BcqVnniLayout(planes, _column_major_codes(weight), weight.rows, weight.cols, weight.row_group,
                         weight.col_group)


_VNNI_BLOCKS = VNNI_ROWS // 16  # 16-lane accumulators per task


@T.macro
def _plane_word(acci, w, xq, task, q, wi, m, xg, xp):
    """``acci[rb, lane] = sum of the word's 32 columns of plane q where the bit is set``, in
    int8 activation units (``xq[m, xg, xp, wi * 32 ...]``): 8 shifts, 8 ``vpdpbusd`` per block."""
    for rb in T.unroll(_VNNI_BLOCKS):
        for lane in T.vectorized(16):
            acci[rb, lane] = 0
    for t in T.unroll(8):
        for rb in T.unroll(_VNNI_BLOCKS):
            acci[rb, T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                "int32x16", "llvm.x86.avx512.vpdpbusd.512", acci[rb, T.ramp(0, 1, 16)],
                T.reinterpret("int8x64", T.bitwise_and(T.shift_right(
                    T.reinterpret("int32x16", w.vload([task * _VNNI_BLOCKS + rb, q, wi, 0, 0], "uint8x64")),
                    T.broadcast(T.int32(t), 16)), T.broadcast(T.int32(0x01010101), 16))),
                T.reinterpret("int8x64", T.broadcast(
                    T.reinterpret("int32", xq.vload([m, xg, xp, wi * VNNI_COLS + t * 4], "int8x4")), 16)))


def _vnni(M: int, layout: BcqVnniLayout) -> tirx.PrimFunc:
    """``Y = X @ decode(W).T`` with int8 activations on AVX-512 VNNI, as the ``int`` kernels at
    ``accuracy_level=4``. ShiftAddLLM's order: the activations are first *shifted* per plane
    and alpha row group, ``x'_q[k] = alpha_q[g, k // cg] * x[k]`` (alphas rebuilt from their
    codes), then quantized to int8 per 32 columns (``scale = max|x'| / 127``); each 32-bit
    word of a plane then yields 4 columns x 16 rows of 0/1 bits per shift and mask, summed
    against the int8 activations by one ``vpdpbusd``: ``sum_k s_k x'_k = 2 sum_{s=+1} x'_k -
    sum_k x'_k`` per word, scaled back in float32."""
    if layout.per_row:
        return _vnni_rows(M, layout)
    Q, TT = layout.bits, layout.terms
    NB, W = layout.planes.shape[0], layout.planes.shape[2]
    RG, CG = layout.alphas.shape[0], layout.alphas.shape[3]
    K = W * VNNI_COLS
    RB = _VNNI_BLOCKS
    rg, cg = layout.row_group, layout.col_group
    tasks = NB // RB

    if cg % 8 == 0:  # (block layout) one alpha per 8 columns: rebuilt once, broadcast
        @T.macro
        def _shift_word(x, a, alpha, shifted, m, g, q, wi):
            for kb in range(VNNI_COLS // 8):
                alpha[kb] = T.float32(0)
                for t in range(TT):
                    alpha[kb] = alpha[kb] + _term(T.Cast("int32", a[g, q, t, (wi * VNNI_COLS + kb * 8) // cg]))
                for kk in T.vectorized(8):
                    shifted[kb * 8 + kk] = alpha[kb] * x[m, wi * VNNI_COLS + kb * 8 + kk]
    else:  # (column layout) one alpha per column: rebuilt 32 at a time
        @T.macro
        def _shift_word(x, a, alpha, shifted, m, g, q, wi):
            for kk in T.vectorized(VNNI_COLS):
                alpha[kk] = T.float32(0)
            for t in range(TT):
                for kk in T.vectorized(VNNI_COLS):
                    alpha[kk] = alpha[kk] + _term(T.Cast("int32", a[g, q, t, (wi * VNNI_COLS + kk) // cg]))
            for kk in T.vectorized(VNNI_COLS):
                shifted[kk] = alpha[kk] * x[m, wi * VNNI_COLS + kk]

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, Q, W, 16, 4), "uint8"),
               a: T.Buffer((RG, Q, TT, CG), "int8"), y: T.Buffer((M, NB * 16), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        xq = T.alloc_buffer((M, RG, Q, K), "int8")
        xscale = T.alloc_buffer((M, RG, Q, W), "float32")
        xsum = T.alloc_buffer((M, RG, Q, W), "float32")
        for mgq in T.parallel(M * RG * Q):
            shifted = T.alloc_buffer((VNNI_COLS,), "float32", scope="local")
            alpha = T.alloc_buffer((VNNI_COLS,), "float32", scope="local")
            part = T.alloc_buffer((8,), "float32", scope="local")
            peak = T.alloc_buffer((1,), "float32", scope="local")
            total = T.alloc_buffer((1,), "float32", scope="local")
            m = mgq // (RG * Q)
            g = mgq // Q % RG
            q = mgq % Q
            for wi in range(W):
                _shift_word(x, a, alpha, shifted, m, g, q, wi)
                for kk in T.vectorized(8):  # max |x'| over the word: 8 lanes, then 8 scalars
                    part[kk] = T.max(T.max(T.fabs(shifted[kk]), T.fabs(shifted[kk + 8])),
                                     T.max(T.fabs(shifted[kk + 16]), T.fabs(shifted[kk + 24])))
                peak[0] = T.float32(1e-30)
                for kk in range(8):
                    peak[0] = T.max(peak[0], part[kk])
                xscale[m, g, q, wi] = peak[0] / T.float32(127)
                for kk in T.vectorized(VNNI_COLS):
                    shifted[kk] = T.round(shifted[kk] * (T.float32(127) / peak[0]))
                    xq[m, g, q, wi * VNNI_COLS + kk] = T.Cast("int8", shifted[kk])
                for kk in T.vectorized(8):
                    part[kk] = shifted[kk] + shifted[kk + 8] + shifted[kk + 16] + shifted[kk + 24]
                total[0] = T.float32(0)
                for kk in range(8):
                    total[0] = total[0] + part[kk]
                xsum[m, g, q, wi] = total[0]
        for task in T.parallel(tasks):
            accf = T.alloc_buffer((RB, 16), "float32", scope="local")
            acci = T.alloc_buffer((RB, 16), "int32", scope="local")
            g = T.min(task * VNNI_ROWS // rg, RG - 1)
            for m in range(M):
                for rb in T.unroll(RB):
                    for lane in T.vectorized(16):
                        accf[rb, lane] = T.float32(0)
                for q in range(Q):
                    for wi in range(W):
                        _plane_word(acci, w, xq, task, q, wi, m, g, q)
                        for rb in T.unroll(RB):
                            for lane in T.vectorized(16):
                                accf[rb, lane] = accf[rb, lane] + (
                                    T.Cast("float32", acci[rb, lane] * 2) - xsum[m, g, q, wi]) * xscale[m, g, q, wi]
                for rb in T.unroll(RB):
                    for lane in T.vectorized(16):
                        y[m, (task * RB + rb) * 16 + lane] = accf[rb, lane]

    return kernel


def _vnni_rows(M: int, layout: BcqVnniLayout) -> tirx.PrimFunc:
    """:func:`_vnni` for row-wise alphas (``alpha_q[n, k // cg]``, a tied table read as an LM
    head): the activations are quantized once per 32 columns (no shift: the alpha does not
    change along a word), each word's integer sum is scaled back and summed over the
    column group, and then multiplied by the 16 rows' alphas (rebuilt from codes laid out
    16 rows side by side)."""

    Q, TT = layout.bits, layout.terms
    NB, W = layout.planes.shape[0], layout.planes.shape[2]
    CG = layout.alphas.shape[3]
    K = W * VNNI_COLS
    RB = _VNNI_BLOCKS
    WG = layout.col_group // VNNI_COLS

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((M, K), "float32"), w: T.Buffer((NB, Q, W, 16, 4), "uint8"),
               a: T.Buffer((NB, Q, TT, CG, 16), "int8"), y: T.Buffer((M, NB * 16), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        xq = T.alloc_buffer((M, 1, 1, K), "int8")  # (the shape of _vnni's, one group and plane)
        xscale = T.alloc_buffer((M, W), "float32")
        xsum = T.alloc_buffer((M, W), "float32")
        for m, wi in T.grid(M, W):
            peak = T.alloc_buffer((1,), "float32", scope="local")
            total = T.alloc_buffer((1,), "float32", scope="local")
            rounded = T.alloc_buffer((VNNI_COLS,), "float32", scope="local")
            peak[0] = T.float32(1e-30)
            for kk in range(VNNI_COLS):
                peak[0] = T.max(peak[0], T.fabs(x[m, wi * VNNI_COLS + kk]))
            xscale[m, wi] = peak[0] / T.float32(127)
            for kk in T.vectorized(VNNI_COLS):
                rounded[kk] = T.round(x[m, wi * VNNI_COLS + kk] * (T.float32(127) / peak[0]))
                xq[m, 0, 0, wi * VNNI_COLS + kk] = T.Cast("int8", rounded[kk])
            total[0] = T.float32(0)
            for kk in range(VNNI_COLS):
                total[0] = total[0] + rounded[kk]
            xsum[m, wi] = total[0]
        for task in T.parallel(NB // RB):
            accf = T.alloc_buffer((RB, 16), "float32", scope="local")
            part = T.alloc_buffer((RB, 16), "float32", scope="local")
            alpha = T.alloc_buffer((RB, 16), "float32", scope="local")
            acci = T.alloc_buffer((RB, 16), "int32", scope="local")
            for m in range(M):
                for rb in T.unroll(RB):
                    for lane in T.vectorized(16):
                        accf[rb, lane] = T.float32(0)
                for q in range(Q):
                    for g in range(CG):
                        for rb in T.unroll(RB):
                            for lane in T.vectorized(16):
                                part[rb, lane] = T.float32(0)
                        for wj in range(WG):
                            _plane_word(acci, w, xq, task, q, g * WG + wj, m, 0, 0)
                            for rb in T.unroll(RB):
                                for lane in T.vectorized(16):
                                    part[rb, lane] = part[rb, lane] + (
                                        T.Cast("float32", acci[rb, lane] * 2) - xsum[m, g * WG + wj]
                                    ) * xscale[m, g * WG + wj]
                        for rb in T.unroll(RB):
                            for lane in T.vectorized(16):
                                alpha[rb, lane] = T.float32(0)
                            for t in range(TT):
                                for lane in T.vectorized(16):
                                    alpha[rb, lane] = alpha[rb, lane] + _term(
                                        T.Cast("int32", a[task * RB + rb, q, t, g, lane]))
                            for lane in T.vectorized(16):
                                accf[rb, lane] = accf[rb, lane] + alpha[rb, lane] * part[rb, lane]
                for rb in T.unroll(RB):
                    for lane in T.vectorized(16):
                        y[m, (task * RB + rb) * 16 + lane] = accf[rb, lane]

    return kernel


# ----------------------------------------------------------------------------------
# Generic (tensor expression) kernels over the format's own arrays
# ----------------------------------------------------------------------------------


def _term_te(code):
    magnitude = tirx.reinterpret("float32", (tirx.abs(code) + _FLOAT_EXPONENT) << 23)
    return tirx.Select(code > 0, magnitude, tirx.Select(code < 0, -magnitude, tirx.const(0, "float32")))


def _signed_alphas_te(bits: int, terms: int, code, bit):
    """``sum_q (bit(q) ? alpha_q : -alpha_q)`` with ``alpha_q = sum_t term(code(q, t))``."""
    total = None
    for q in range(bits):
        alpha = None
        for t in range(terms):
            term = _term_te(code(q, t).astype("int32"))
            alpha = term if alpha is None else alpha + term
        signed = tirx.Select(bit(q) != 0, alpha, -alpha)
        total = signed if total is None else total + signed
    return total


def _decode_te(planes, alphas, row, col, row_group: int, col_group: int):
    """The float value of weight ``[row, col]`` from planes ``[R, Q, B]`` and codes ``[RG, CG, Q, T]``."""
    return _signed_alphas_te(int(planes.shape[1]), int(alphas.shape[3]),
                             lambda q, t: alphas[row // row_group, col // col_group, q, t],
                             lambda q: (planes[row, q, col // 8].astype("int32") >> (col % 8)) & 1)


def qmatmul_te(x, planes, alphas, row_group: int, col_group: int, cols: int):
    """``Y[M, N] = X[M, cols] @ decode(W).T`` (decode inlined in the reduction)."""
    rows = planes.shape[0]
    weight = te.compute((rows, cols), lambda n, k: _decode_te(planes, alphas, n, k, row_group, col_group),
                        name="decode")
    k = te.reduce_axis((0, cols), name="k")
    return te.compute((x.shape[0], rows), lambda m, n: te.sum(x[m, k] * weight[n, k], axis=k), name="qmatmul")


def gpu_arrays(weight: BCQWeight) -> list[np.ndarray]:
    """The weight for :func:`qmatmul_split_te`: one uint8 ``[rows, bytes]`` array per plane,
    then one int8 ``[row_groups, col_groups]`` array of alpha codes per (plane, term) (the
    same bytes, split). dlight's GEMV rule needs every weight read to touch one element:
    with the planes and terms as axes of one array, a row's decode reads a range of them
    and the rule gives up (one thread per output row, a serial loop over K)."""
    planes = [np.ascontiguousarray(weight.planes[:, q]) for q in range(weight.bits)]
    codes = [np.ascontiguousarray(weight.alphas[:, :, q, t]) for q in range(weight.bits) for t in range(weight.terms)]
    return planes + codes


def qmatmul_split_te(x, *arrays, bits: int, row_group: int, col_group: int, cols: int):
    """``qmatmul_te`` over :func:`gpu_arrays`: the decode reads one element of each array."""
    planes, codes = arrays[:bits], arrays[bits:]
    terms = len(codes) // bits

    def value(n, k):
        total = None
        for q in range(bits):
            alpha = None
            for t in range(terms):
                term = _term_te(codes[q * terms + t][n // row_group, k // col_group].astype("int32"))
                alpha = term if alpha is None else alpha + term
            bit = (planes[q][n, k // 8].astype("int32") >> (k % 8)) & 1
            signed = tirx.Select(bit != 0, alpha, -alpha)
            total = signed if total is None else total + signed
        return total

    weight = te.compute((planes[0].shape[0], cols), value, name="decode")
    k = te.reduce_axis((0, cols), name="k")
    return te.compute((x.shape[0], planes[0].shape[0]), lambda m, n: te.sum(x[m, k] * weight[n, k], axis=k),
                      name="qmatmul")


def qgather_te(planes, indices, alphas, row_group: int, col_group: int, cols: int):
    """``Y[I, cols] = decode(W)[indices]`` for flat int64 ``indices`` (negative ones wrap)."""
    return gather_rows_te(indices, planes.shape[0], cols,
                          lambda row, d: _decode_te(planes, alphas, row, d, row_group, col_group))


def qgather_lanes_te(planes, indices, alphas, vocab: int, row_group: int, col_group: int, cols: int):
    """:func:`qgather_te` reading a :class:`BcqCpuLayout` in place (a table tied to an LM head
    whose GEMV/GEMM kernel takes that layout, so the artifact holds the table once): row
    ``r``'s byte ``b`` of plane ``q`` at ``planes[r / lanes, q, b, r % lanes]``, its alpha codes
    at ``alphas[r / row_group, q, term, col / col_group]``."""
    lanes = int(planes.shape[3])
    return gather_rows_te(indices, vocab, cols, lambda row, d: _signed_alphas_te(
        int(planes.shape[1]), int(alphas.shape[2]),
        lambda q, t: alphas[row // row_group, q, t, d // col_group],
        lambda q: (planes[row // lanes, q, d // 8, row % lanes].astype("int32") >> (d % 8)) & 1))


def qgather_vnni_rows_te(planes, indices, alphas, vocab: int, col_group: int, cols: int):
    """:func:`qgather_te` reading a row-wise :class:`BcqVnniLayout` in place (the tied table of
    an LM head that runs the int8-activation GEMV): row ``r``'s column ``d`` of plane ``q`` is
    bit ``(d % 32) / 4`` of byte ``d % 4`` at ``planes[r / 16, q, d / 32, r % 16]``, its alpha
    codes at ``alphas[r / 16, q, term, d / col_group, r % 16]``."""
    return gather_rows_te(indices, vocab, cols, lambda row, d: _signed_alphas_te(
        int(planes.shape[1]), int(alphas.shape[2]),
        lambda q, t: alphas[row // 16, q, t, d // col_group, row % 16],
        lambda q: (planes[row // 16, q, d // VNNI_COLS, row % 16, d % 4].astype("int32") >> (d % VNNI_COLS // 4)) & 1))


def dequantize_te(planes, alphas, row_group: int, col_group: int, cols: int):
    """The float matrix ``[rows, cols]`` (QConv's filter, decoded once per call)."""
    return te.compute((planes.shape[0], cols),
                      lambda n, k: _decode_te(planes, alphas, n, k, row_group, col_group), name="dequantize")


# -- bcq_outliers: the sparse corrections (qcompile.ir.bcq_outliers) ---------------------
# The dense part runs in the kernels above; the ``J`` corrections of every weight row (their
# APoT codes decoded to float32 at build time, columns as int32) are added by one more small
# scheduled kernel (CPU only: dlight's rules cannot analyse the indirect reads). Opaque to
# Relax's operator fusion, which would otherwise merge the read-modify-write into its producer.

OPAQUE = 8  # relax OpPatternKind.kOpaque


def outlier_matmul_cpu(MP: int, N: int, K: int, J: int) -> tirx.PrimFunc:
    """``C = S X^T`` ``[N, MP]`` for the ELL corrections ``S`` of ``N`` weight rows and the
    activations transposed and padded, ``X^T [K, MP]`` (``MP`` a multiple of 16): per weight
    row, ``J`` activation rows gathered by column and accumulated 16 activation rows at a time
    in a vector register (weight rows in parallel). The caller adds ``C^T`` to the dense
    output. A scalar version (one gathered activation per multiply-add) cost MiniLM at 8 x 64
    more than the whole model in FP32: 1.5% of the weights, but 16x slower per operation."""

    @T.prim_func(private=True, s_tir=True)
    def kernel(xt: T.Buffer((K, MP), "float32"), cols: T.Buffer((N, J), "int32"),
               values: T.Buffer((N, J), "float32"), out: T.Buffer((N, MP), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": OPAQUE})
        for n in T.parallel(N):
            acc = T.alloc_buffer((16,), "float32", scope="local")
            for mb in range(MP // 16):
                for lane in T.vectorized(16):
                    acc[lane] = T.float32(0)
                for j in range(J):
                    for lane in T.vectorized(16):
                        acc[lane] = acc[lane] + xt[cols[n, j], mb * 16 + lane] * values[n, j]
                for lane in T.vectorized(16):
                    out[n, mb * 16 + lane] = acc[lane]

    return kernel


def outlier_rows_cpu(R: int, C: int, V: int, J: int, gather: bool) -> tirx.PrimFunc:
    """``y[i] = base[i] + S[row(i)]``: decoded weight rows ``base [R, C]`` with their
    corrections scattered in; ``row(i)`` = ``indices[i]`` (negative ones wrap) for a gather
    (the call passes ``indices`` int64 ``[R]`` before ``cols``), else ``i``."""

    @T.prim_func(private=True, s_tir=True)
    def rows_kernel(base: T.Buffer((R, C), "float32"), cols: T.Buffer((V, J), "int32"),
                    values: T.Buffer((V, J), "float32"), y: T.Buffer((R, C), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": OPAQUE})
        for i in T.parallel(R):
            for c in range(C):
                y[i, c] = base[i, c]
            for j in range(J):
                y[i, cols[i, j]] = y[i, cols[i, j]] + values[i, j]

    @T.prim_func(private=True, s_tir=True)
    def gather_kernel(base: T.Buffer((R, C), "float32"), indices: T.Buffer((R,), "int64"),
                      cols: T.Buffer((V, J), "int32"), values: T.Buffer((V, J), "float32"),
                      y: T.Buffer((R, C), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": OPAQUE})
        for i in T.parallel(R):
            for c in range(C):
                y[i, c] = base[i, c]
            for j in range(J):
                y[i, cols[T.if_then_else(indices[i] < 0, indices[i] + V, indices[i]), j]] = y[
                    i, cols[T.if_then_else(indices[i] < 0, indices[i] + V, indices[i]), j]] + values[
                    T.if_then_else(indices[i] < 0, indices[i] + V, indices[i]), j]

    return gather_kernel if gather else rows_kernel
